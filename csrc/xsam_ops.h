// Shared by the CPU and CUDA implementations of the xsam op set: the argument checks, the
// addresses the kernels walk, and the scalar and empty-list rules of the contract
// (xsam/ops/contract.py).
#pragma once

#include "kernel_constants.h"

#include <ATen/ATen.h>

#include <vector>

namespace xsam {

// A checked group of aligned lists, as the kernels address it: list(l)[t] is the address of
// tensor t of list l (taken with mutable_data_ptr for written lists, so copy-on-write storage is
// materialised before anything is written), numel[t] its element count in every list.
struct Group {
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  int64_t num_tensors = 0;
  std::vector<void*> addr;  // list-major: addr[l * num_tensors + t]
  std::vector<int64_t> numel;

  bool empty() const { return num_tensors == 0; }
  void* const* list(int l) const { return addr.data() + l * num_tensors; }
};

// Validates one call's lists, the op's Tensor[] arguments in schema order (an absent optional list
// left out at the end), and returns their addresses: tensor i of every list has the device, dtype
// and shape of lists[0][i] and is dense with the same element order (the kernels walk them as flat
// arrays with one index), and no two written tensors share memory. Which lists are written, and
// their names in messages, come from the op's registered schema.
Group check_lists(const char* op, c10::ArrayRef<at::TensorList> lists);

// `dots` gets its lists concatenated: checks the layout and the pairs, and returns the group
// with one list per list of the call.
struct DotsCall {
  Group group;
  int num_lists = 0;
  std::vector<int> pair_a, pair_b;
};
DotsCall check_dots(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs);

// The value of a CPU scalar argument in the accumulation dtype: a plain load, no dispatch.
template <typename acc_t>
acc_t cpu_scalar(const char* op, const char* name, const at::Tensor& scalar);

// A scalar argument as a 0-d tensor of `acc` on `device` (converted there, never through the
// host), for kernels that read it from device memory.
at::Tensor device_scalar(const char* op, const char* name, const at::Tensor& scalar, const at::Device& device,
                         at::ScalarType acc);

// The result of a reduction over empty lists: zeros, float32 on the CPU (no tensor says
// otherwise; the fake implementations in xsam/ops/fakes.py agree).
at::Tensor sums_of_nothing(int64_t n);

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace xsam
