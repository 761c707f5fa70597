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

// Each function is the contract's op of the same name (xsam/ops/contract.py) over `lists` in schema
// order; scalars are device pointers to one value of the accumulation dtype (fp64 for fp64 storage,
// else fp32), read by the kernels.
cudaError_t perturb(DType dtype, const Lists& lists, const void* scale, bool adaptive, cudaStream_t stream);
cudaError_t tilted_perturb(DType dtype, const Lists& lists, const void* a, const void* b, cudaStream_t stream);
cudaError_t correct_restore(DType dtype, const Lists& lists, bool with_vecs, const void* a, const void* b,
                            cudaStream_t stream);
cudaError_t axpy(DType dtype, const Lists& lists, const void* alpha, cudaStream_t stream);
cudaError_t scale_copy(DType dtype, const Lists& lists, const void* scale, cudaStream_t stream);

// Reductions are two-stage: one partial per chunk and sum into `scratch`, then a fixed-order sum
// per output. `scratch` holds reduction_scratch_size() accumulation-dtype values.
int64_t reduction_scratch_size(const int64_t* numel, int64_t num_tensors);

// dots: out[k] = sum_t <lists[pair_a[k]][t], lists[pair_b[k]][t]> for k < num_pairs (num_lists lists).
cudaError_t dots(DType dtype, const Lists& lists, int num_lists, const int* pair_a, const int* pair_b,
                 int num_pairs, void* scratch, void* out, cudaStream_t stream);
cudaError_t weighted_sumsq(DType dtype, const Lists& lists, void* scratch, void* out, cudaStream_t stream);
cudaError_t residual_sumsq(DType dtype, const Lists& lists, const void* lam, void* scratch, void* out,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace xsam
