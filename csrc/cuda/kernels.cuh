// Launchers of the CUDA kernels, in plain C types so that the .cu file needs no ATen headers
// (they pull in cusparse.h, which the toolkit here lacks; see build-notes) and compiles fast.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace xsam {
namespace cuda {

// Elements of one tensor handled by one block; every reduction partial covers exactly one
// such chunk, so results do not depend on how the chunks are spread over launches.
constexpr int64_t kCudaChunk = 32768;

enum class DType { kFloat, kDouble, kHalf, kBFloat16 };

enum class Elementwise {
  kPerturb,           // lists: params (rw), grads (r), saved (w); s1 = scale
  kPerturbAdaptive,   // same, w += s * w * w * g
  kCorrectRestore,    // lists: params (w), grads (rw), saved (r), vecs (r); s1 = a, s2 = b
  kCorrectNoVecs,     // lists: params (w), grads (rw), saved (r); s1 = a
  kAxpy,              // lists: ys (rw), xs (r); s1 = alpha
  kScaleCopy,         // lists: dsts (w), srcs (r); s1 = scale
};

// lists[d][t]: address of tensor t of list d (d < the op's list count). Scalars s1/s2 are
// device pointers to one value in the accumulation dtype, read by the kernels.
cudaError_t launch_elementwise(Elementwise op, DType dtype, void* const* const* lists, const int64_t* numels,
                               int64_t num_tensors, const void* s1, const void* s2, cudaStream_t stream);

// Number of first-stage blocks (= partial slots per pair) a reduction over these tensors uses.
int64_t reduction_blocks(const int64_t* numels, int64_t num_tensors);

// out[k] = sum_i <lists[a[k]][i], lists[b[k]][i]> (weighted: sum_i ||lists[a][i] * lists[b][i]||^2).
// lists is list-major: lists[l * num_tensors + t]. partials holds reduction_blocks() * num_pairs
// accumulation-dtype values. Deterministic: fixed chunks, fixed-order second stage.
cudaError_t launch_dots(DType dtype, const void* const* lists, int num_lists, const int64_t* numels,
                        int64_t num_tensors, const int64_t* a, const int64_t* b, int num_pairs, bool weighted,
                        void* partials, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace xsam
