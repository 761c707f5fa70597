// CUDA registrations of the xsam op set: checks, scratch buffers and the current stream on
// the host side, kernels in kernels.cu. Only c10/cuda headers here (ATen/cuda pulls in
// cusparse.h, absent from the toolkit on the build machines).
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

std::vector<int64_t> numels_of(at::TensorList ts) {
  std::vector<int64_t> out;
  for (const auto& t : ts) out.push_back(t.numel());
  return out;
}

std::vector<void*> addresses(at::TensorList ts) {
  std::vector<void*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr());
  return out;
}

void run_elementwise(const char* op, cuda::Elementwise kind, const std::vector<NamedList>& lists,
                     const at::Tensor& s1, const char* s1_name, const at::Tensor* s2, const char* s2_name) {
  check_group(op, lists);
  const at::TensorList first = lists[0].tensors;
  if (first.empty()) return;
  const auto device = first[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto acc = accumulation_type(first[0].scalar_type());
  // Kept alive until the launch is enqueued; the caching allocator orders reuse on the stream.
  const at::Tensor a = check_scalar(op, s1_name, s1, device, acc);
  const at::Tensor b = s2 ? check_scalar(op, s2_name, *s2, device, acc) : at::Tensor();
  std::vector<std::vector<void*>> ptrs;
  std::vector<void* const*> table;
  for (const auto& list : lists) ptrs.push_back(addresses(list.tensors));
  for (const auto& p : ptrs) table.push_back(p.data());
  const auto numels = numels_of(first);
  C10_CUDA_CHECK(cuda::launch_elementwise(kind, kernel_dtype(first[0].scalar_type()), table.data(), numels.data(),
                                          static_cast<int64_t>(numels.size()), a.data_ptr(),
                                          b.defined() ? b.data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream(device.index()).stream()));
}

at::Tensor reduce(const std::vector<NamedList>& lists, const std::vector<int64_t>& pa, const std::vector<int64_t>& pb,
                  bool weighted) {
  const at::TensorList first = lists[0].tensors;
  const auto device = first[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto dtype = first[0].scalar_type();
  const auto options = first[0].options().dtype(accumulation_type(dtype));
  const int64_t np = static_cast<int64_t>(pa.size());
  at::Tensor out = at::zeros({np}, options);
  if (np == 0) return out;
  const auto numels = numels_of(first);
  const int64_t n = static_cast<int64_t>(numels.size());
  const int64_t slots = cuda::reduction_blocks(numels.data(), n);
  at::Tensor partials = at::empty({std::max<int64_t>(slots * np, 1)}, options);
  std::vector<void*> flat;
  for (const auto& list : lists) {
    for (void* p : addresses(list.tensors)) flat.push_back(p);
  }
  C10_CUDA_CHECK(cuda::launch_dots(kernel_dtype(dtype), const_cast<const void* const*>(flat.data()),
                                   static_cast<int>(lists.size()), numels.data(), n, pa.data(), pb.data(),
                                   static_cast<int>(np), weighted, partials.data_ptr(), out.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  return out;
}

at::Tensor dots_cuda(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs) {
  const DotsLayout layout = check_dots(tensors, num_lists, pairs);
  TORCH_CHECK(layout.per_list > 0, "xsam::dots: the lists are empty");
  return reduce(layout.lists, layout.a, layout.b, false);
}

at::Tensor weighted_sumsq_cuda(at::TensorList weights, at::TensorList xs) {
  const std::vector<NamedList> lists = {{"weights", weights}, {"xs", xs}};
  check_group("weighted_sumsq", lists);
  TORCH_CHECK(!xs.empty(), "xsam::weighted_sumsq: the lists are empty");
  return reduce(lists, {0}, {1}, true);
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList saved, const at::Tensor& scale,
                  bool adaptive) {
  run_elementwise("perturb_", adaptive ? cuda::Elementwise::kPerturbAdaptive : cuda::Elementwise::kPerturb,
                  {{"params", params}, {"grads", grads}, {"saved", saved}}, scale, "scale", nullptr, nullptr);
}

void correct_restore_cuda(at::TensorList params, at::TensorList grads, at::TensorList saved,
                          const std::optional<at::TensorList>& vecs, const at::Tensor& a, const at::Tensor& b) {
  if (vecs.has_value()) {
    run_elementwise("correct_restore_", cuda::Elementwise::kCorrectRestore,
                    {{"params", params}, {"grads", grads}, {"saved", saved}, {"vecs", *vecs}}, a, "a", &b, "b");
  } else {
    run_elementwise("correct_restore_", cuda::Elementwise::kCorrectNoVecs,
                    {{"params", params}, {"grads", grads}, {"saved", saved}}, a, "a", nullptr, nullptr);
  }
}

void axpy_cuda(at::TensorList ys, at::TensorList xs, const at::Tensor& alpha) {
  run_elementwise("axpy_", cuda::Elementwise::kAxpy, {{"ys", ys}, {"xs", xs}}, alpha, "alpha", nullptr, nullptr);
}

void scale_copy_cuda(at::TensorList dsts, at::TensorList srcs, const at::Tensor& scale) {
  run_elementwise("scale_copy_", cuda::Elementwise::kScaleCopy, {{"dsts", dsts}, {"srcs", srcs}}, scale, "scale",
                  nullptr, nullptr);
}

}  // namespace
}  // namespace xsam

TORCH_LIBRARY_IMPL(xsam, CUDA, m) {
  m.impl("dots", &xsam::dots_cuda);
  m.impl("weighted_sumsq", &xsam::weighted_sumsq_cuda);
  m.impl("perturb_", &xsam::perturb_cuda);
  m.impl("correct_restore_", &xsam::correct_restore_cuda);
  m.impl("axpy_", &xsam::axpy_cuda);
  m.impl("scale_copy_", &xsam::scale_copy_cuda);
}
