// CUDA registrations of the xsam op set: checks, scratch buffers and the current stream on the
// host side; the kernels are in elementwise.cu and reductions.cu. Only c10/cuda headers here
// (ATen/cuda pulls in cusparse.h, absent from the toolkit on the build machines).
// Nothing here waits for the device: scalars stay device tensors that the kernels read, and
// temporaries go back to the caching allocator after the launches, which orders their reuse on the stream.
#include "../xsam_ops.h"
#include "kernels.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace xsam {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "xsam: unsupported dtype ", t);
  }
}

// One checked call on its device: the device guard, the current stream, and the lists as the
// kernels take them.
class Call {
 public:
  Call(const char* op, Group group) : op_(op), group_(std::move(group)) {
    if (group_.empty()) return;
    TORCH_INTERNAL_ASSERT(group_.device.is_cuda(), "xsam::", op, ": CUDA kernel called with ", group_.device,
                          " tensors");
    guard_.set_device(group_.device);
    const size_t num_lists = group_.addr.size() / group_.num_tensors;
    for (size_t l = 0; l < num_lists; ++l) rows_.push_back(group_.list(static_cast<int>(l)));
  }

  bool empty() const { return group_.empty(); }
  cuda::DType dtype() const { return kernel_dtype(group_.dtype); }
  cuda::Lists lists() const { return {rows_.data(), group_.numel.data(), group_.num_tensors}; }
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(group_.device.index()).stream(); }

  // A scalar argument as a device tensor of the accumulation dtype (alive until the launch is queued).
  at::Tensor scalar(const char* name, const at::Tensor& value) const {
    return device_scalar(op_, name, value, group_.device, accumulation_type(group_.dtype));
  }

  // Runs launch(scratch, out) for a reduction with `num_sums` results.
  template <typename Launch>
  at::Tensor reduce(int64_t num_sums, const Launch& launch) const {
    if (group_.empty()) return sums_of_nothing(num_sums);
    const auto options = at::TensorOptions().device(group_.device).dtype(accumulation_type(group_.dtype));
    at::Tensor out = at::empty({num_sums}, options);
    if (num_sums == 0) return out;
    const int64_t scratch_size = cuda::reduction_scratch_size(group_.numel.data(), group_.num_tensors);
    at::Tensor scratch = at::empty({std::max<int64_t>(scratch_size, 1)}, options);
    C10_CUDA_CHECK(launch(scratch.data_ptr(), out.data_ptr()));
    return out;
  }

 private:
  const char* op_;
  Group group_;
  c10::cuda::OptionalCUDAGuard guard_;
  std::vector<void* const*> rows_;
};

at::Tensor dots_cuda(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs) {
  DotsCall checked = check_dots(tensors, num_lists, pairs);
  const Call call("dots", std::move(checked.group));
  return call.reduce(static_cast<int64_t>(checked.pair_a.size()), [&](void* scratch, void* out) {
    return cuda::dots(call.dtype(), call.lists(), checked.num_lists, checked.pair_a.data(), checked.pair_b.data(),
                      static_cast<int>(checked.pair_a.size()), scratch, out, call.stream());
  });
}

at::Tensor weighted_sumsq_cuda(at::TensorList weights, at::TensorList xs) {
  const Call call("weighted_sumsq", check_lists("weighted_sumsq", {weights, xs}));
  return call.reduce(1, [&](void* scratch, void* out) {
    return cuda::weighted_sumsq(call.dtype(), call.lists(), scratch, out, call.stream());
  });
}

at::Tensor residual_sumsq_cuda(at::TensorList us, at::TensorList vs, const at::Tensor& lam) {
  const Call call("residual_sumsq", check_lists("residual_sumsq", {us, vs}));
  if (call.empty()) return sums_of_nothing(1);
  const at::Tensor l = call.scalar("lam", lam);
  return call.reduce(1, [&](void* scratch, void* out) {
    return cuda::residual_sumsq(call.dtype(), call.lists(), l.data_ptr(), scratch, out, call.stream());
  });
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList saved, const at::Tensor& scale,
                  bool adaptive) {
  const Call call("perturb_", check_lists("perturb_", {params, grads, saved}));
  if (call.empty()) return;
  const at::Tensor s = call.scalar("scale", scale);
  C10_CUDA_CHECK(cuda::perturb(call.dtype(), call.lists(), s.data_ptr(), adaptive, call.stream()));
}

void tilted_perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList saved, at::TensorList vecs,
                         const at::Tensor& a, const at::Tensor& b) {
  const Call call("tilted_perturb_", check_lists("tilted_perturb_", {params, grads, saved, vecs}));
  if (call.empty()) return;
  const at::Tensor av = call.scalar("a", a), bv = call.scalar("b", b);
  C10_CUDA_CHECK(cuda::tilted_perturb(call.dtype(), call.lists(), av.data_ptr(), bv.data_ptr(), call.stream()));
}

void correct_restore_cuda(at::TensorList params, at::TensorList grads, at::TensorList saved,
                          const std::optional<at::TensorList>& vecs, const at::Tensor& a, const at::Tensor& b) {
  const at::TensorList lists[] = {params, grads, saved, vecs.value_or(at::TensorList())};
  const Call call("correct_restore_",
                  check_lists("correct_restore_", c10::ArrayRef<at::TensorList>(lists, vecs.has_value() ? 4 : 3)));
  if (call.empty()) return;
  const at::Tensor av = call.scalar("a", a), bv = call.scalar("b", b);
  C10_CUDA_CHECK(cuda::correct_restore(call.dtype(), call.lists(), vecs.has_value(), av.data_ptr(), bv.data_ptr(),
                                       call.stream()));
}

void axpy_cuda(at::TensorList ys, at::TensorList xs, const at::Tensor& alpha) {
  const Call call("axpy_", check_lists("axpy_", {ys, xs}));
  if (call.empty()) return;
  const at::Tensor al = call.scalar("alpha", alpha);
  C10_CUDA_CHECK(cuda::axpy(call.dtype(), call.lists(), al.data_ptr(), call.stream()));
}

void scale_copy_cuda(at::TensorList dsts, at::TensorList srcs, const at::Tensor& scale) {
  const Call call("scale_copy_", check_lists("scale_copy_", {dsts, srcs}));
  if (call.empty()) return;
  const at::Tensor s = call.scalar("scale", scale);
  C10_CUDA_CHECK(cuda::scale_copy(call.dtype(), call.lists(), s.data_ptr(), call.stream()));
}

}  // namespace
}  // namespace xsam

TORCH_LIBRARY_IMPL(xsam, CUDA, m) {
  m.impl("dots", &xsam::dots_cuda);
  m.impl("weighted_sumsq", &xsam::weighted_sumsq_cuda);
  m.impl("residual_sumsq", &xsam::residual_sumsq_cuda);
  m.impl("perturb_", &xsam::perturb_cuda);
  m.impl("tilted_perturb_", &xsam::tilted_perturb_cuda);
  m.impl("correct_restore_", &xsam::correct_restore_cuda);
  m.impl("axpy_", &xsam::axpy_cuda);
  m.impl("scale_copy_", &xsam::scale_copy_cuda);
}
