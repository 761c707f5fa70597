// CUDA kernels of the xsam op set: multi-tensor apply (tensor addresses, sizes and the
// block -> (tensor, chunk) map travel in a kernel-argument struct; more tensors than fit are
// launched in batches), fp32/fp64 arithmetic with one rounding on store, and deterministic
// two-stage reductions (one partial per chunk, then a fixed-order sum; no float atomics).
// Scalars are read from device memory inside the kernels, so nothing waits for the device.
#include "kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <vector>

namespace xsam {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;  // elements per thread per step; one 4-wide load when aligned
constexpr int kMaxBlocks = 320;

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccType<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ----- elementwise ops ---------------------------------------------------------------------
// Each op names the lists it reads (kLoad) and writes (kStore) as bit masks, so a list that is
// only written (the restored weights) is never read from memory.

template <typename T>
struct Perturb {
  static constexpr int kDepth = 3, kLoad = 0b011, kStore = 0b101;
  using acc_t = typename AccType<T>::type;
  acc_t s;
  bool adaptive;
  __device__ void operator()(T* v) const {
    const acc_t w = to_acc(v[0]), g = to_acc(v[1]);
    v[2] = v[0];
    v[0] = from_acc<T>(adaptive ? w + s * w * w * g : w + s * g);
  }
};

template <typename T>
struct CorrectRestore {
  static constexpr int kDepth = 4, kLoad = 0b1110, kStore = 0b0011;
  using acc_t = typename AccType<T>::type;
  acc_t a, b;
  __device__ void operator()(T* v) const {
    v[1] = from_acc<T>(a * to_acc(v[1]) - b * to_acc(v[3]));
    v[0] = v[2];
  }
};

template <typename T>
struct CorrectNoVecs {
  static constexpr int kDepth = 3, kLoad = 0b110, kStore = 0b011;
  using acc_t = typename AccType<T>::type;
  acc_t a, b;
  __device__ void operator()(T* v) const {
    v[1] = from_acc<T>(a * to_acc(v[1]));
    v[0] = v[2];
  }
};

// ys may alias xs: both are loaded before the store, element by element.
template <typename T>
struct Axpy {
  static constexpr int kDepth = 2, kLoad = 0b11, kStore = 0b01;
  using acc_t = typename AccType<T>::type;
  acc_t a, unused;
  __device__ void operator()(T* v) const { v[0] = from_acc<T>(to_acc(v[0]) + a * to_acc(v[1])); }
};

template <typename T>
struct ScaleCopy {
  static constexpr int kDepth = 2, kLoad = 0b10, kStore = 0b01;
  using acc_t = typename AccType<T>::type;
  acc_t a, unused;
  __device__ void operator()(T* v) const { v[0] = from_acc<T>(a * to_acc(v[1])); }
};

template <int DEPTH> struct MaxTensors;
template <> struct MaxTensors<2> { static constexpr int value = 64; };
template <> struct MaxTensors<3> { static constexpr int value = 48; };
template <> struct MaxTensors<4> { static constexpr int value = 36; };

// Passed by value as a kernel argument (under the 4 KiB limit for every depth).
template <int DEPTH>
struct ListMeta {
  static constexpr int kMaxTensors = MaxTensors<DEPTH>::value;
  void* addr[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Packet {
  T v[N];
};

template <typename T, template <typename> class Op>
__global__ void __launch_bounds__(kThreads)
elementwise_kernel(ListMeta<Op<T>::kDepth> meta, const typename AccType<T>::type* s1,
                   const typename AccType<T>::type* s2, bool flag) {
  using F = Op<T>;
  constexpr int D = F::kDepth;
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kCudaChunk;
  const int64_t n = min(kCudaChunk, meta.numel[t] - start);
  T* p[D];
  bool aligned = n % kIlp == 0;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    p[d] = static_cast<T*>(meta.addr[d][t]) + start;
    aligned = aligned && reinterpret_cast<uintptr_t>(p[d]) % sizeof(Packet<T, kIlp>) == 0;
  }
  F f;
  // Scalars: one device-memory read per block (no host round trip anywhere).
  if constexpr (D == 3 && F::kStore == 0b101) {
    f = F{*s1, flag};
  } else {
    f = F{*s1, s2 ? *s2 : typename F::acc_t(0)};
  }
  if (aligned) {
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kIlp; i < n; i += static_cast<int64_t>(blockDim.x) * kIlp) {
      T r[kIlp][D];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (F::kLoad & (1 << d)) {
          const Packet<T, kIlp> pk = *reinterpret_cast<const Packet<T, kIlp>*>(p[d] + i);
#pragma unroll
          for (int j = 0; j < kIlp; ++j) r[j][d] = pk.v[j];
        }
      }
#pragma unroll
      for (int j = 0; j < kIlp; ++j) f(r[j]);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (F::kStore & (1 << d)) {
          Packet<T, kIlp> pk;
#pragma unroll
          for (int j = 0; j < kIlp; ++j) pk.v[j] = r[j][d];
          *reinterpret_cast<Packet<T, kIlp>*>(p[d] + i) = pk;
        }
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      T r[D];
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (F::kLoad & (1 << d)) r[d] = p[d][i];
      }
      f(r);
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (F::kStore & (1 << d)) p[d][i] = r[d];
      }
    }
  }
}

// Packs tensors and chunks into argument structs and launches whenever one is full; a tensor
// whose chunks straddle two launches is carried over into the next struct.
template <int DEPTH, typename Launch>
cudaError_t for_each_batch(void* const* const* lists, const int64_t* numels, int64_t num_tensors, Launch launch) {
  using Meta = ListMeta<DEPTH>;
  Meta meta;
  int nt = 0, nb = 0;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (numels[t] == 0) continue;
    for (int d = 0; d < DEPTH; ++d) meta.addr[d][nt] = lists[d][t];
    meta.numel[nt] = numels[t];
    ++nt;
    const int64_t chunks = (numels[t] + kCudaChunk - 1) / kCudaChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == Meta::kMaxTensors && last_chunk)) {
        launch(meta, nb);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {
          for (int d = 0; d < DEPTH; ++d) meta.addr[d][0] = meta.addr[d][nt - 1];
          meta.numel[0] = meta.numel[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) {
    launch(meta, nb);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T, template <typename> class Op>
cudaError_t run_elementwise(void* const* const* lists, const int64_t* numels, int64_t num_tensors,
                            const void* s1, const void* s2, bool flag, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  constexpr int D = Op<T>::kDepth;
  return for_each_batch<D>(lists, numels, num_tensors, [&](const ListMeta<D>& meta, int blocks) {
    elementwise_kernel<T, Op><<<blocks, kThreads, 0, stream>>>(meta, static_cast<const acc_t*>(s1),
                                                               static_cast<const acc_t*>(s2), flag);
  });
}

template <typename T>
cudaError_t elementwise_for(Elementwise op, void* const* const* lists, const int64_t* numels, int64_t n,
                            const void* s1, const void* s2, cudaStream_t stream) {
  switch (op) {
    case Elementwise::kPerturb: return run_elementwise<T, Perturb>(lists, numels, n, s1, nullptr, false, stream);
    case Elementwise::kPerturbAdaptive: return run_elementwise<T, Perturb>(lists, numels, n, s1, nullptr, true, stream);
    case Elementwise::kCorrectRestore: return run_elementwise<T, CorrectRestore>(lists, numels, n, s1, s2, false, stream);
    case Elementwise::kCorrectNoVecs: return run_elementwise<T, CorrectNoVecs>(lists, numels, n, s1, nullptr, false, stream);
    case Elementwise::kAxpy: return run_elementwise<T, Axpy>(lists, numels, n, s1, nullptr, false, stream);
    case Elementwise::kScaleCopy: return run_elementwise<T, ScaleCopy>(lists, numels, n, s1, nullptr, false, stream);
  }
  return cudaErrorInvalidValue;
}

// ----- reductions ---------------------------------------------------------------------------

constexpr int kMaxPairs = 8;    // pairs per launch; more are processed in further batches
constexpr int kMaxPtrs = 128;   // tensor addresses per launch (tensors x lists)
constexpr int kMaxDotTensors = 64;

struct DotMeta {
  const void* addr[kMaxPtrs];  // [slot * num_lists + list]
  int64_t numel[kMaxDotTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
  signed char a[kMaxPairs], b[kMaxPairs];
  int num_lists, num_pairs;
  int64_t block_offset;  // index of this launch's first block among all partial slots
};

// A fixed tree over the block (warp shuffles, then one warp over the warp sums): the same
// inputs give the same bits on every run.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? shared[lane] : acc_t(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // valid in thread 0
}

template <typename T, bool WEIGHTED>
__global__ void __launch_bounds__(kThreads) dots_kernel(DotMeta meta, typename AccType<T>::type* partials) {
  using acc_t = typename AccType<T>::type;
  __shared__ acc_t shared[kThreads / 32];
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kCudaChunk;
  const int64_t n = min(kCudaChunk, meta.numel[t] - start);
  const int L = meta.num_lists, P = meta.num_pairs;
  acc_t sum[kMaxPairs];
#pragma unroll
  for (int k = 0; k < kMaxPairs; ++k) sum[k] = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
#pragma unroll
    for (int k = 0; k < kMaxPairs; ++k) {
      if (k < P) {
        const acc_t x = to_acc(static_cast<const T*>(meta.addr[t * L + meta.a[k]])[start + i]);
        const acc_t y = to_acc(static_cast<const T*>(meta.addr[t * L + meta.b[k]])[start + i]);
        if (WEIGHTED) {
          const acc_t p = x * y;
          sum[k] += p * p;
        } else {
          sum[k] += x * y;
        }
      }
    }
  }
  const int64_t slot = meta.block_offset + blockIdx.x;
#pragma unroll
  for (int k = 0; k < kMaxPairs; ++k) {
    if (k < P) {
      const acc_t total = block_sum(sum[k], shared);
      if (threadIdx.x == 0) partials[slot * P + k] = total;
    }
  }
}

// One block per pair sums that pair's partials in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(const acc_t* partials, int64_t slots, int num_pairs,
                                                          acc_t* out) {
  __shared__ acc_t shared[kThreads / 32];
  const int k = blockIdx.x;
  acc_t s = 0;
  for (int64_t j = threadIdx.x; j < slots; j += blockDim.x) s += partials[j * num_pairs + k];
  s = block_sum(s, shared);
  if (threadIdx.x == 0) out[k] = s;
}

template <typename T>
cudaError_t dots_for(const void* const* lists, int num_lists, const int64_t* numels, int64_t num_tensors,
                     const int64_t* pa, const int64_t* pb, int num_pairs, bool weighted, void* partials_v,
                     void* out_v, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  acc_t* partials = static_cast<acc_t*>(partials_v);
  acc_t* out = static_cast<acc_t*>(out_v);
  const int64_t slots = reduction_blocks(numels, num_tensors);
  for (int first = 0; first < num_pairs; first += kMaxPairs) {
    const int np = std::min(kMaxPairs, num_pairs - first);
    // The lists this batch of pairs reads, renumbered 0..used-1.
    std::vector<int64_t> used;
    DotMeta meta;
    for (int k = 0; k < np; ++k) {
      for (int side = 0; side < 2; ++side) {
        const int64_t l = side == 0 ? pa[first + k] : pb[first + k];
        auto it = std::find(used.begin(), used.end(), l);
        if (it == used.end()) { used.push_back(l); it = used.end() - 1; }
        (side == 0 ? meta.a : meta.b)[k] = static_cast<signed char>(it - used.begin());
      }
    }
    const int L = static_cast<int>(used.size());
    const int max_tensors = std::min<int>(kMaxDotTensors, kMaxPtrs / L);
    meta.num_lists = L;
    meta.num_pairs = np;
    meta.block_offset = 0;
    int nt = 0, nb = 0;
    auto go = [&]() -> cudaError_t {
      if (weighted) {
        dots_kernel<T, true><<<nb, kThreads, 0, stream>>>(meta, partials);
      } else {
        dots_kernel<T, false><<<nb, kThreads, 0, stream>>>(meta, partials);
      }
      meta.block_offset += nb;
      nb = 0;
      return cudaGetLastError();
    };
    for (int64_t t = 0; t < num_tensors; ++t) {
      if (numels[t] == 0) continue;
      for (int l = 0; l < L; ++l) meta.addr[nt * L + l] = lists[used[l] * num_tensors + t];
      meta.numel[nt] = numels[t];
      ++nt;
      const int64_t chunks = (numels[t] + kCudaChunk - 1) / kCudaChunk;
      for (int64_t c = 0; c < chunks; ++c) {
        meta.block_tensor[nb] = static_cast<unsigned char>(nt - 1);
        meta.block_chunk[nb] = static_cast<int>(c);
        ++nb;
        const bool last_chunk = c == chunks - 1;
        if (nb == kMaxBlocks || (nt == max_tensors && last_chunk)) {
          const cudaError_t err = go();
          if (err != cudaSuccess) return err;
          if (last_chunk) {
            nt = 0;
          } else {
            for (int l = 0; l < L; ++l) meta.addr[l] = meta.addr[(nt - 1) * L + l];
            meta.numel[0] = meta.numel[nt - 1];
            nt = 1;
          }
        }
      }
    }
    if (nb > 0) {
      const cudaError_t err = go();
      if (err != cudaSuccess) return err;
    }
    finish_kernel<acc_t><<<np, kThreads, 0, stream>>>(partials, slots, np, out + first);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t reduction_blocks(const int64_t* numels, int64_t num_tensors) {
  int64_t blocks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) blocks += (numels[t] + kCudaChunk - 1) / kCudaChunk;
  return blocks;
}

cudaError_t launch_elementwise(Elementwise op, DType dtype, void* const* const* lists, const int64_t* numels,
                               int64_t num_tensors, const void* s1, const void* s2, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return elementwise_for<float>(op, lists, numels, num_tensors, s1, s2, stream);
    case DType::kDouble: return elementwise_for<double>(op, lists, numels, num_tensors, s1, s2, stream);
    case DType::kHalf: return elementwise_for<__half>(op, lists, numels, num_tensors, s1, s2, stream);
    case DType::kBFloat16: return elementwise_for<__nv_bfloat16>(op, lists, numels, num_tensors, s1, s2, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dots(DType dtype, const void* const* lists, int num_lists, const int64_t* numels,
                        int64_t num_tensors, const int64_t* a, const int64_t* b, int num_pairs, bool weighted,
                        void* partials, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return dots_for<float>(lists, num_lists, numels, num_tensors, a, b, num_pairs, weighted, partials, out, stream);
    case DType::kDouble: return dots_for<double>(lists, num_lists, numels, num_tensors, a, b, num_pairs, weighted, partials, out, stream);
    case DType::kHalf: return dots_for<__half>(lists, num_lists, numels, num_tensors, a, b, num_pairs, weighted, partials, out, stream);
    case DType::kBFloat16: return dots_for<__nv_bfloat16>(lists, num_lists, numels, num_tensors, a, b, num_pairs, weighted, partials, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace xsam
