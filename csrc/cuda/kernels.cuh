// The CUDA op set as ops_cuda.cpp calls it, in plain C types so that the .cu files need no ATen
// headers (they pull in cusparse.h, which the toolkit here lacks; see build-notes) and compile
// fast. Every function enqueues its kernels on `stream` and returns the first launch error; none
// of them waits for the device.
#pragma once

#include "../kernel_constants.h"

#include <cuda_runtime_api.h>

#include <cstdint>

namespace xsam {
namespace cuda {

constexpr int64_t kChunk = kCudaChunk;  // elements of one tensor per block (kernel_constants.h)

enum class DType { kFloat, kDouble, kHalf, kBFloat16 };

// One call's aligned lists: addr[l][t] is the address of tensor t of list l, numel[t] its
// element count (the same in every list). Empty tensors are skipped.
struct Lists {
  void* const* const* addr;
  const int64_t* numel;
  int64_t num_tensors;
};

// Scalars are device pointers to one value of the accumulation dtype (fp64 for fp64 storage,
// else fp32), read by the kernels.

// params (rw), grads, saved (w): saved = w; w += scale * g (adaptive: scale * w * w * g).
cudaError_t perturb(DType dtype, const Lists& lists, const void* scale, bool adaptive, cudaStream_t stream);
// params (rw), grads, saved (w), vecs: saved = w; w += a * g + b * v.
cudaError_t tilted_perturb(DType dtype, const Lists& lists, const void* a, const void* b, cudaStream_t stream);
// params (w), grads (rw), saved, [vecs]: g = a * g - b * v (a * g without vecs); w = saved.
cudaError_t correct_restore(DType dtype, const Lists& lists, bool with_vecs, const void* a, const void* b,
                            cudaStream_t stream);
// ys (rw), xs: y += alpha * x.
cudaError_t axpy(DType dtype, const Lists& lists, const void* alpha, cudaStream_t stream);
// dsts (w), srcs: dst = scale * src.
cudaError_t scale_copy(DType dtype, const Lists& lists, const void* scale, cudaStream_t stream);

// Reductions are two-stage: one partial per chunk and sum into `scratch`, then a fixed-order sum
// per output. `scratch` holds reduction_scratch_size() accumulation-dtype values.
int64_t reduction_scratch_size(const int64_t* numel, int64_t num_tensors);

// out[k] = sum_t <lists[pair_a[k]][t], lists[pair_b[k]][t]> for k < num_pairs (num_lists lists).
cudaError_t dots(DType dtype, const Lists& lists, int num_lists, const int* pair_a, const int* pair_b,
                 int num_pairs, void* scratch, void* out, cudaStream_t stream);
// weights, xs: out[0] = sum ||w * x||^2.
cudaError_t weighted_sumsq(DType dtype, const Lists& lists, void* scratch, void* out, cudaStream_t stream);
// us, vs: out[0] = sum ||u - lam * v||^2, element by element.
cudaError_t residual_sumsq(DType dtype, const Lists& lists, const void* lam, void* scratch, void* out,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace xsam
