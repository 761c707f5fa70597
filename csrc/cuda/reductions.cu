// The reductions of the CUDA op set: dots, weighted_sumsq and residual_sumsq, as functors over
// the two-stage reduction of multi_tensor_apply.cuh (one partial per chunk, then a fixed-order
// sum per output; no float atomics, so the same inputs give the same bits on every run).
#include "multi_tensor_apply.cuh"

#include <algorithm>
#include <cstring>
#include <vector>

namespace xsam {
namespace cuda {
namespace {

// A pass of `dots` loads at most this many distinct lists per element (in registers, with 128-bit
// accesses) and computes every pair it was asked for among them.
constexpr int kMaxGramLists = 4;
constexpr int kMaxGramSums = kMaxGramLists * (kMaxGramLists + 1) / 2;

// Index of the product x_i * x_j (i <= j) in the upper triangle of L lists, row by row.
__host__ __device__ constexpr int triangle_index(int lists, int i, int j) {
  return i * lists - i * (i - 1) / 2 + (j - i);
}

// The sums of products of L lists: sum s = triangle_index(L, i, j) is sum x_i * x_j, computed
// when bit s of `wanted` is set.
template <typename T, int L>
struct Gram {
  using storage_t = T;
  static constexpr int kLists = L, kSums = L * (L + 1) / 2;
  unsigned wanted;
  __device__ void load_scalars() {}
  __device__ void accumulate(const T (&v)[L], Acc<T> (&sums)[kSums]) const {
    Acc<T> x[L];
#pragma unroll
    for (int i = 0; i < L; ++i) x[i] = to_acc(v[i]);
#pragma unroll
    for (int i = 0; i < L; ++i) {
#pragma unroll
      for (int j = i; j < L; ++j) {
        if (wanted >> triangle_index(L, i, j) & 1u) sums[triangle_index(L, i, j)] += x[i] * x[j];
      }
    }
  }
};

// The sum of r^2 with r = x * y (weighted_sumsq: weights, xs) or r = u - lam * v (residual_sumsq:
// us, vs; element by element, as the one-pass ||u||^2 - lam^2 ||v||^2 cancels when the residual is small).
template <typename T, bool kResidual>
struct SumOfSquares {
  using storage_t = T;
  static constexpr int kLists = 2, kSums = 1;
  const void* lam_ptr;  // residual_sumsq only
  unsigned wanted = 1;
  Acc<T> lam = 0;
  __device__ void load_scalars() {
    if constexpr (kResidual) lam = *static_cast<const Acc<T>*>(lam_ptr);
  }
  __device__ void accumulate(const T (&v)[2], Acc<T> (&sums)[1]) const {
    const Acc<T> r = kResidual ? to_acc(v[0]) - lam * to_acc(v[1]) : to_acc(v[0]) * to_acc(v[1]);
    sums[0] += r * r;
  }
};

template <bool kResidual>
cudaError_t sum_of_squares(DType dtype, const Lists& lists, const void* lam, void* scratch, void* out,
                           cudaStream_t stream) {
  return with_storage_type(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const FinishPlan one_sum = {1, 1, {0}};
    return launch_reduction(lists, SumOfSquares<T, kResidual>{lam}, one_sum, static_cast<Acc<T>*>(scratch),
                            static_cast<Acc<T>*>(out), stream);
  });
}

template <typename T>
cudaError_t launch_gram(int num_lists, const Lists& lists, unsigned wanted, const FinishPlan& plan, Acc<T>* scratch,
                        Acc<T>* out, cudaStream_t stream) {
  switch (num_lists) {
    case 1: return launch_reduction(lists, Gram<T, 1>{wanted}, plan, scratch, out, stream);
    case 2: return launch_reduction(lists, Gram<T, 2>{wanted}, plan, scratch, out, stream);
    case 3: return launch_reduction(lists, Gram<T, 3>{wanted}, plan, scratch, out, stream);
    case 4: return launch_reduction(lists, Gram<T, 4>{wanted}, plan, scratch, out, stream);
  }
  return cudaErrorInvalidValue;
}

// One pass of `dots`: consecutive pairs whose lists (after merging lists of identical tensors)
// number at most kMaxGramLists, and at most kMaxOutputsPerFinish pairs.
struct DotsPass {
  int begin = 0, end = 0;  // pairs [begin, end)
  int num_lists = 0;
  int lists[kMaxGramLists];
  unsigned wanted = 0;
  FinishPlan plan = {};
};

DotsPass plan_pass(const int* canonical, const int* pair_a, const int* pair_b, int begin, int num_pairs) {
  DotsPass pass;
  pass.begin = pass.end = begin;
  int lo[kMaxOutputsPerFinish], hi[kMaxOutputsPerFinish];  // positions of each pair's lists in the pass
  const auto position = [&](int list) {
    for (int i = 0; i < pass.num_lists; ++i) {
      if (pass.lists[i] == list) return i;
    }
    return -1;
  };
  while (pass.end < num_pairs && pass.end - begin < kMaxOutputsPerFinish) {
    const int a = canonical[pair_a[pass.end]], b = canonical[pair_b[pass.end]];
    const int new_lists = (position(a) < 0) + (a != b && position(b) < 0);
    if (pass.num_lists + new_lists > kMaxGramLists) break;
    if (position(a) < 0) pass.lists[pass.num_lists++] = a;
    if (position(b) < 0) pass.lists[pass.num_lists++] = b;
    lo[pass.end - begin] = std::min(position(a), position(b));
    hi[pass.end - begin] = std::max(position(a), position(b));
    ++pass.end;
  }
  const int n = pass.end - begin;
  for (int k = 0; k < n; ++k) pass.wanted |= 1u << triangle_index(pass.num_lists, lo[k], hi[k]);
  pass.plan.sums_per_slot = __builtin_popcount(pass.wanted);
  pass.plan.num_outputs = n;
  for (int k = 0; k < n; ++k) {
    const int s = triangle_index(pass.num_lists, lo[k], hi[k]);
    pass.plan.column[k] = __builtin_popcount(pass.wanted & ((1u << s) - 1));
  }
  return pass;
}

}  // namespace

int64_t reduction_scratch_size(const int64_t* numel, int64_t num_tensors) {
  int64_t chunks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) chunks += chunks_of(numel[t]);
  return chunks * kMaxGramSums;
}

cudaError_t dots(DType dtype, const Lists& lists, int num_lists, const int* pair_a, const int* pair_b, int num_pairs,
                 void* scratch, void* out, cudaStream_t stream) {
  // A list passed twice (the same tensors) is read once: dots([g, g], [(0, 1)]) is a sum of squares.
  std::vector<int> canonical(num_lists);
  for (int l = 0; l < num_lists; ++l) {
    canonical[l] = l;
    for (int m = 0; m < l; ++m) {
      if (std::memcmp(lists.addr[m], lists.addr[l], lists.num_tensors * sizeof(void*)) == 0) {
        canonical[l] = canonical[m];
        break;
      }
    }
  }
  return with_storage_type(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    for (int begin = 0; begin < num_pairs;) {
      const DotsPass pass = plan_pass(canonical.data(), pair_a, pair_b, begin, num_pairs);
      void* const* addr[kMaxGramLists];
      for (int i = 0; i < pass.num_lists; ++i) addr[i] = lists.addr[pass.lists[i]];
      const Lists pass_lists{addr, lists.numel, lists.num_tensors};
      const cudaError_t err = launch_gram<T>(pass.num_lists, pass_lists, pass.wanted, pass.plan,
                                             static_cast<Acc<T>*>(scratch), static_cast<Acc<T>*>(out) + begin, stream);
      if (err != cudaSuccess) return err;
      begin = pass.end;
    }
    return cudaSuccess;
  });
}

cudaError_t weighted_sumsq(DType dtype, const Lists& lists, void* scratch, void* out, cudaStream_t stream) {
  return sum_of_squares<false>(dtype, lists, nullptr, scratch, out, stream);
}

cudaError_t residual_sumsq(DType dtype, const Lists& lists, const void* lam, void* scratch, void* out,
                           cudaStream_t stream) {
  return sum_of_squares<true>(dtype, lists, lam, scratch, out, stream);
}

}  // namespace cuda
}  // namespace xsam
