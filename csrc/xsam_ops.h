// Shared by the CPU and CUDA implementations of the xsam op set: argument checks and the
// chunking rule that makes reductions independent of the thread count.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace xsam {

// Work is split into fixed-size chunks of each tensor. Every chunk reduces into its own slot
// and the slots are summed in chunk order, so the bits of a reduction depend only on the
// inputs, never on how many threads (or blocks) took part.
constexpr int64_t kCpuChunk = 16384;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t len;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels, int64_t chunk);

// Validates one aligned group: every list has as many tensors as `lists[0]`, and tensor i of
// every list has the device, dtype, shape and strides of `lists[0][i]` and is dense, so the
// kernels may walk all of them as flat arrays with the same index. Throws a c10::Error that
// names the op, the argument and the fix.
struct NamedList {
  std::string name;
  at::TensorList tensors;
};
void check_group(const char* op, const std::vector<NamedList>& lists);

// Scalars are 0-d (or 1-element) tensors on the group's device; the kernels read them in the
// accumulation dtype. Returns the scalar converted (on its device) to `acc`.
// `dots` gets its lists concatenated; checks the layout and splits the pairs.
struct DotsLayout {
  int64_t per_list;  // tensors per list
  std::vector<int64_t> a, b;
  std::vector<NamedList> lists;
};
DotsLayout check_dots(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs);

at::Tensor check_scalar(const char* op, const char* name, const at::Tensor& scalar,
                        const at::Device& device, at::ScalarType acc);

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace xsam
