// The one multi-tensor apply of the CUDA op set: the launch metadata, its capacity, the
// pack-and-launch loop, the element walk and the two-stage reduction. Every kernel goes through
// it; an op is a functor (what to do with one element of each list) plus a few lines of launcher
// (elementwise.cu, reductions.cu). Modelled on apex/ATen MultiTensorApply.cuh.
//
// NOTE [launch sizing]
// The metadata of a launch is a table of TENSORS (each list's address, the size, and the running
// count of chunks), not of blocks: block b finds its tensor by a binary search of the chunk
// counts. One launch therefore covers every chunk of up to kMaxTensors tensors however large they
// are, with one block per chunk: no SM-count query, and as the split depends on the sizes alone, a
// reduction adds the same partials in the same order whatever the size of the GPU.
// The table travels in the kernel parameters (up to 32 KiB on sm_70+ with CUDA 12.1+): copied with
// the launch itself, so no host buffer has to outlive it, nothing waits for the device, launches on
// several streams share nothing, and a CUDA graph records each launch with its own copy.
#pragma once

#include "kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "xsam's CUDA kernels need sm_70 or newer (32 KiB kernel parameters, __grid_constant__): set TORCH_CUDA_ARCH_LIST"
#endif

namespace xsam {
namespace cuda {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// One 128-bit access per thread and list: 8 halves, 4 floats or 2 doubles.
constexpr int kAccessBytes = 16;
// Elements of each list a thread loads before it stores, where accesses are element by element.
constexpr int kElementsPerStep = 4;

#if CUDART_VERSION >= 12010
constexpr int kKernelParamBytes = 32764;  // see NOTE [launch sizing]
#else
constexpr int kKernelParamBytes = 4096;
#endif
// Kept for the op's functor and the kernel's other arguments.
constexpr int kOtherParamBytes = 256;
// A launch's grid and chunk counts are int32.
constexpr int64_t kMaxChunksPerLaunch = INT32_MAX;

// The capacity table: tensors per launch by number of lists (32 KiB: 1624, 1160, 902, 738).
constexpr int max_tensors_per_launch(int lists) {
  return (kKernelParamBytes - kOtherParamBytes - 16) / (lists * 8 + 8 + 4);
}

template <int kLists>
struct TensorListMeta {
  static constexpr int kMaxTensors = max_tensors_per_launch(kLists);
  void* addr[kLists][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_end[kMaxTensors];  // chunks of tensors 0..t of this launch
  int32_t num_tensors;
  int64_t first_chunk;  // chunks of the call before this launch: the reduction slot of block 0
};

// 32 KiB parameters also need a driver for CUDA 12.1 or newer (r530+); a CUDA 13 runtime already
// requires r580, so only a CUDA 12.x build asks the driver (once).
inline cudaError_t check_driver_supports_kernel_params() {
#if CUDART_VERSION >= 12010 && CUDART_VERSION < 13000
  static const cudaError_t status = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess && version >= 12010 ? cudaSuccess
                                                                                : cudaErrorInsufficientDriver;
  }();
  return status;
#else
  return cudaSuccess;
#endif
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

inline int64_t count_chunks(const Lists& lists) {
  int64_t chunks = 0;
  for (int64_t t = 0; t < lists.num_tensors; ++t) chunks += chunks_of(lists.numel[t]);
  return chunks;
}

// The pack-and-launch loop: fills the table tensor by tensor and calls launch(meta, blocks)
// whenever it is full, then once for the rest; checks every launch (cudaGetLastError, which does
// not synchronise) and returns the first error.
template <int kLists, typename Launch>
cudaError_t multi_tensor_apply(const Lists& lists, const Launch& launch) {
  static_assert(sizeof(TensorListMeta<kLists>) + kOtherParamBytes <= kKernelParamBytes, "metadata too large");
  if (const cudaError_t err = check_driver_supports_kernel_params(); err != cudaSuccess) return err;
  TensorListMeta<kLists> meta;
  meta.num_tensors = 0;
  meta.first_chunk = 0;
  int64_t chunks = 0;
  const auto flush = [&]() -> cudaError_t {
    if (meta.num_tensors == 0) return cudaSuccess;
    launch(meta, static_cast<unsigned>(chunks));
    const cudaError_t err = cudaGetLastError();
    meta.first_chunk += chunks;
    meta.num_tensors = 0;
    chunks = 0;
    return err;
  };
  for (int64_t t = 0; t < lists.num_tensors; ++t) {
    const int64_t n = lists.numel[t];
    if (n == 0) continue;
    const int64_t c = chunks_of(n);
    if (c > kMaxChunksPerLaunch) return cudaErrorInvalidValue;  // 7e13 elements in one tensor
    if (meta.num_tensors == TensorListMeta<kLists>::kMaxTensors || chunks + c > kMaxChunksPerLaunch) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int k = meta.num_tensors++;
    for (int l = 0; l < kLists; ++l) meta.addr[l][k] = lists.addr[l][t];
    meta.numel[k] = n;
    chunks += c;
    meta.chunk_end[k] = static_cast<int32_t>(chunks);
  }
  return flush();
}

// ----- storage and accumulation types ---------------------------------------------------------

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(Acc<T> x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> struct StorageType { using type = T; };

// Calls f(StorageType<T>{}) with the CUDA storage type of `dtype`.
template <typename F>
cudaError_t with_storage_type(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat: return f(StorageType<float>{});
    case DType::kDouble: return f(StorageType<double>{});
    case DType::kHalf: return f(StorageType<__half>{});
    case DType::kBFloat16: return f(StorageType<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// ----- the device side ------------------------------------------------------------------------

struct ChunkRef {
  int tensor;
  int64_t start;
  int len;
};

// Block blockIdx.x's tensor and chunk (see NOTE [launch sizing]); the same for every thread.
template <int kLists>
__device__ __forceinline__ ChunkRef locate_chunk(const TensorListMeta<kLists>& meta) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = meta.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (meta.chunk_end[mid] <= block) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t start = static_cast<int64_t>(block - (lo > 0 ? meta.chunk_end[lo - 1] : 0)) * kChunk;
  return {lo, start, static_cast<int>(min(kChunk, meta.numel[lo] - start))};
}

template <typename T>
constexpr int kPerAccess = kAccessBytes / sizeof(T);

template <typename T>
struct alignas(kAccessBytes) Packet {
  T v[kPerAccess<T>];
};

// Calls f(v) for each of the n elements of one chunk, v[l] the element of list l: loads the lists
// in kLoads (bit l: list l), and after f stores those in kStores. A thread loads everything it
// handles in one step before it stores any of it, and no two threads share an element, so a
// written list may be a read list at the same index.
// When every list of the chunk is 16-byte aligned, thread i takes the packets of kPerAccess<T>
// elements i, i + kThreads, ...: one 128-bit access per list and packet. Otherwise (a view that
// starts at an odd element) the accesses are element by element, in one of two orders:
// - kPacketOrder (reductions): the same elements per thread, in the same order, as the aligned
//   path, so a sum's bits do not depend on the alignment of its inputs (the loads coalesce in L1);
// - otherwise (element-wise ops): thread i takes elements i, i + kThreads, ..., so that every warp
//   store covers whole sectors.
template <typename T, int kLists, unsigned kLoads, unsigned kStores, bool kPacketOrder, typename F>
__device__ __forceinline__ void for_each_element(T* const (&p)[kLists], int n, const F& f) {
  constexpr int V = kPerAccess<T>;
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < kLists; ++l) aligned = aligned && reinterpret_cast<uintptr_t>(p[l]) % kAccessBytes == 0;
  // Element j of this thread's step starting at `base`, and whether it exists.
  const auto element = [&](int base, int j) {
    return aligned || kPacketOrder ? base + static_cast<int>(threadIdx.x) * V + j
                                   : base + j * kThreads + static_cast<int>(threadIdx.x);
  };
  for (int base = 0; base < n; base += kThreads * V) {
    T v[V][kLists];
    if (aligned && base + (static_cast<int>(threadIdx.x) + 1) * V <= n) {
      const int first = element(base, 0);
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if (kLoads >> l & 1u) {
          const Packet<T> packet = *reinterpret_cast<const Packet<T>*>(p[l] + first);
#pragma unroll
          for (int j = 0; j < V; ++j) v[j][l] = packet.v[j];
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) f(v[j]);
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if (kStores >> l & 1u) {
          Packet<T> packet;
#pragma unroll
          for (int j = 0; j < V; ++j) packet.v[j] = v[j][l];
          *reinterpret_cast<Packet<T>*>(p[l] + first) = packet;
        }
      }
    } else {
      // At most kElementsPerStep loads of each list before the stores: enough in flight, and few
      // registers (8 elements of 4 lists would cost the 16-bit kernels half their occupancy).
      constexpr int W = V < kElementsPerStep ? V : kElementsPerStep;
#pragma unroll
      for (int j0 = 0; j0 < V; j0 += W) {
#pragma unroll
        for (int j = j0; j < j0 + W; ++j) {
          if (element(base, j) < n) {
#pragma unroll
            for (int l = 0; l < kLists; ++l) {
              if (kLoads >> l & 1u) v[j][l] = p[l][element(base, j)];
            }
          }
        }
#pragma unroll
        for (int j = j0; j < j0 + W; ++j) {
          if (element(base, j) < n) f(v[j]);
        }
#pragma unroll
        for (int j = j0; j < j0 + W; ++j) {
          if (element(base, j) < n) {
#pragma unroll
            for (int l = 0; l < kLists; ++l) {
              if (kStores >> l & 1u) p[l][element(base, j)] = v[j][l];
            }
          }
        }
      }
    }
  }
}

// An element-wise op: Op::storage_t, kLists, kLoads, kStores, load_scalars() (reads its device
// scalars once per block) and operator()(storage_t (&v)[kLists]).
template <typename Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const __grid_constant__ TensorListMeta<Op::kLists> meta, Op op) {
  using T = typename Op::storage_t;
  const ChunkRef c = locate_chunk(meta);
  T* p[Op::kLists];
#pragma unroll
  for (int l = 0; l < Op::kLists; ++l) p[l] = static_cast<T*>(meta.addr[l][c.tensor]) + c.start;
  op.load_scalars();
  for_each_element<T, Op::kLists, Op::kLoads, Op::kStores, false>(p, c.len, op);
}

template <typename Op>
cudaError_t launch_elementwise(const Lists& lists, Op op, cudaStream_t stream) {
  static_assert(sizeof(Op) + 16 <= kOtherParamBytes, "functor too large for the kernel parameters");
  return multi_tensor_apply<Op::kLists>(lists, [&](const TensorListMeta<Op::kLists>& meta, unsigned blocks) {
    elementwise_kernel<Op><<<blocks, kThreads, 0, stream>>>(meta, op);
  });
}

// ----- reductions -----------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums v[s] over the block for each s in `wanted`, with a fixed tree (warp shuffles, then one
// warp over the warp sums): the results, valid in thread 0, have the same bits on every run.
template <typename acc_t, int S>
__device__ __forceinline__ void block_sums(acc_t (&v)[S], unsigned wanted) {
  __shared__ acc_t shared[S][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int s = 0; s < S; ++s) {
    if (wanted >> s & 1u) {
      v[s] = warp_sum(v[s]);
      if (lane == 0) shared[s][warp] = v[s];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if (wanted >> s & 1u) v[s] = warp_sum(lane < kWarps ? shared[s][lane] : acc_t(0));
    }
  }
}

// A reduction op: storage_t, kLists, kSums, `wanted` (bit s: sum s is needed), load_scalars()
// and accumulate(storage_t (&v)[kLists], Acc (&sums)[kSums]). First stage: the block of chunk c
// writes its wanted sums to partials[c * popcount(wanted) ...], one slot per chunk of the call.
template <typename Op>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const __grid_constant__ TensorListMeta<Op::kLists> meta,
                                                          Op op, Acc<typename Op::storage_t>* partials) {
  using T = typename Op::storage_t;
  using acc_t = Acc<T>;
  const ChunkRef c = locate_chunk(meta);
  T* p[Op::kLists];
#pragma unroll
  for (int l = 0; l < Op::kLists; ++l) p[l] = static_cast<T*>(meta.addr[l][c.tensor]) + c.start;
  op.load_scalars();
  acc_t sums[Op::kSums];
#pragma unroll
  for (int s = 0; s < Op::kSums; ++s) sums[s] = acc_t(0);
  constexpr unsigned kAll = (1u << Op::kLists) - 1;
  for_each_element<T, Op::kLists, kAll, 0u, true>(p, c.len, [&](T (&v)[Op::kLists]) { op.accumulate(v, sums); });
  block_sums(sums, op.wanted);
  if (threadIdx.x == 0) {
    acc_t* slot = partials + (meta.first_chunk + blockIdx.x) * __popc(op.wanted);
    int e = 0;
#pragma unroll
    for (int s = 0; s < Op::kSums; ++s) {
      if (op.wanted >> s & 1u) slot[e++] = sums[s];
    }
  }
}

// Second stage: output k = the sum of column column[k] of the partials over all slots, in slot
// order. A block per output; duplicated outputs (pairs (a, b) and (b, a)) get identical bits.
constexpr int kMaxOutputsPerFinish = 32;
struct FinishPlan {
  int sums_per_slot;
  int num_outputs;
  int column[kMaxOutputsPerFinish];
};

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const acc_t* partials, int64_t slots, FinishPlan plan, acc_t* out) {
  acc_t total[1] = {acc_t(0)};
  for (int64_t j = threadIdx.x; j < slots; j += kThreads) {
    total[0] += partials[j * plan.sums_per_slot + plan.column[blockIdx.x]];
  }
  block_sums(total, 1u);
  if (threadIdx.x == 0) out[blockIdx.x] = total[0];
}

// Both stages of one reduction pass; `scratch` holds count_chunks(lists) * popcount(op.wanted)
// values and may be reused by the next pass on the same stream (stream order).
template <typename Op>
cudaError_t launch_reduction(const Lists& lists, Op op, const FinishPlan& plan, Acc<typename Op::storage_t>* scratch,
                             Acc<typename Op::storage_t>* out, cudaStream_t stream) {
  static_assert(sizeof(Op) + 16 <= kOtherParamBytes, "functor too large for the kernel parameters");
  const cudaError_t err =
      multi_tensor_apply<Op::kLists>(lists, [&](const TensorListMeta<Op::kLists>& meta, unsigned blocks) {
        reduce_kernel<Op><<<blocks, kThreads, 0, stream>>>(meta, op, scratch);
      });
  if (err != cudaSuccess) return err;
  finish_kernel<<<plan.num_outputs, kThreads, 0, stream>>>(scratch, count_chunks(lists), plan, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace xsam
