// CPU implementation of the xsam op set: OpenMP over fixed work items, fp32 (fp64 for fp64)
// arithmetic, one rounding on store.
#include "xsam_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>
#include <utility>

namespace xsam {
namespace {

// ----- the work split -----------------------------------------------------------------------

// The group's tensors laid end to end, cut into items of kCpuChunk elements: a large tensor
// spans several items and small ones share one, so the number of items (parallel tasks,
// reduction slots) depends on the total size only, and 1,000 tiny tensors cost one task. The split
// depends on the sizes alone, never on the thread count, so the bits of a reduction do not either.
class FlatWork {
 public:
  explicit FlatWork(const Group& group) : numel_(group.numel.data()), ends_(group.num_tensors) {
    int64_t total = 0;
    for (int64_t t = 0; t < group.num_tensors; ++t) ends_[t] = total += numel_[t];
    total_ = total;
  }

  int64_t items() const { return (total_ + kCpuChunk - 1) / kCpuChunk; }

  // Calls segment(t, begin, len) for each non-empty piece of a tensor inside item `item`, in order.
  template <typename F>
  void for_each_segment(int64_t item, const F& segment) const {
    const int64_t lo = item * kCpuChunk, hi = std::min(lo + kCpuChunk, total_);
    int64_t t = std::upper_bound(ends_.begin(), ends_.end(), lo) - ends_.begin();
    for (int64_t pos = lo; pos < hi; ++t) {
      const int64_t len = std::min(ends_[t], hi) - pos;
      if (len > 0) segment(t, pos - (ends_[t] - numel_[t]), len);
      pos += len;
    }
  }

 private:
  const int64_t* numel_;
  std::vector<int64_t> ends_;  // ends_[t]: elements in tensors 0..t
  int64_t total_ = 0;
};

template <typename F>
void for_each_item(int64_t items, const F& body) {
#pragma omp parallel for schedule(static) if (items >= kCpuMinParallelItems)
  for (int64_t k = 0; k < items; ++k) body(k);
}

template <typename scalar_t>
scalar_t* at_offset(const Group& g, int list, int64_t t, int64_t begin) {
  return static_cast<scalar_t*>(g.list(list)[t]) + begin;
}

// Element-wise ops: body(t, begin, len) for every segment, items in parallel.
template <typename Body>
void for_each_segment(const Group& g, const Body& body) {
  const FlatWork work(g);
  for_each_item(work.items(), [&](int64_t item) { work.for_each_segment(item, body); });
}

// Reductions: body(t, begin, len, sums) adds a segment's `num_sums` values to its item's slot;
// the slots are then added in item order into out[0..num_sums).
template <typename acc_t, typename Body>
void reduce_segments(const Group& g, int64_t num_sums, acc_t* out, const Body& body) {
  const FlatWork work(g);
  std::vector<acc_t> slots(work.items() * num_sums, acc_t(0));
  for_each_item(work.items(), [&](int64_t item) {
    acc_t* sums = slots.data() + item * num_sums;
    work.for_each_segment(item, [&](int64_t t, int64_t begin, int64_t len) { body(t, begin, len, sums); });
  });
  for (int64_t s = 0; s < num_sums; ++s) {
    acc_t total = 0;
    for (int64_t item = 0; item < work.items(); ++item) total += slots[item * num_sums + s];
    out[s] = total;
  }
}

// ----- reduction loops ------------------------------------------------------------------------

// Eight independent partial sums let the compiler vectorise the loop without -ffast-math, and
// the fixed combination order keeps the bits independent of the thread count.
constexpr int kLanes = 8;

template <typename acc_t, typename Term>
acc_t sum_of(int64_t n, const Term& term) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += term(i + j);
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += term(i);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail;
}

at::Tensor dots_cpu(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs) {
  const DotsCall call = check_dots(tensors, num_lists, pairs);
  const Group& g = call.group;
  const int64_t npairs = static_cast<int64_t>(call.pair_a.size());
  if (g.empty()) return sums_of_nothing(npairs);
  at::Tensor out = at::empty({npairs}, at::dtype(accumulation_type(g.dtype)));
  if (npairs == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, "xsam::dots", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Pair by pair over a segment: a segment (at most kCpuChunk elements, 64 KiB of float32 per
    // list) stays in the core's L2 cache, so a list named by several pairs comes from memory once.
    reduce_segments<acc_t>(g, npairs, out.data_ptr<acc_t>(), [&](int64_t t, int64_t begin, int64_t len, acc_t* sums) {
      for (int64_t k = 0; k < npairs; ++k) {
        const scalar_t* x = at_offset<scalar_t>(g, call.pair_a[k], t, begin);
        const scalar_t* y = at_offset<scalar_t>(g, call.pair_b[k], t, begin);
        sums[k] += sum_of<acc_t>(len, [&](int64_t i) { return static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]); });
      }
    });
  });
  return out;
}

// The one-sum reductions: the sum of r^2 with r = x * y (weighted_sumsq) or r = x - lam * y
// (residual_sumsq: element by element, as the one-pass ||u||^2 - lam^2 ||v||^2 cancels when the
// residual is small).
template <bool kResidual>
at::Tensor sum_of_squares_cpu(const char* op, at::TensorList xs, at::TensorList ys, const at::Tensor* lam) {
  const Group g = check_lists(op, {xs, ys});
  if (g.empty()) return sums_of_nothing(1);
  at::Tensor out = at::empty({1}, at::dtype(accumulation_type(g.dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, "xsam::sum_of_squares", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t l = kResidual ? cpu_scalar<acc_t>(op, "lam", *lam) : acc_t(0);
    reduce_segments<acc_t>(g, 1, out.data_ptr<acc_t>(), [&](int64_t t, int64_t begin, int64_t len, acc_t* sums) {
      const scalar_t* x = at_offset<scalar_t>(g, 0, t, begin);
      const scalar_t* y = at_offset<scalar_t>(g, 1, t, begin);
      sums[0] += sum_of<acc_t>(len, [&](int64_t i) {
        const acc_t xi = static_cast<acc_t>(x[i]), yi = static_cast<acc_t>(y[i]);
        const acc_t r = kResidual ? xi - l * yi : xi * yi;
        return r * r;
      });
    });
  });
  return out;
}

at::Tensor weighted_sumsq_cpu(at::TensorList weights, at::TensorList xs) {
  return sum_of_squares_cpu<false>("weighted_sumsq", weights, xs, nullptr);
}

at::Tensor residual_sumsq_cpu(at::TensorList us, at::TensorList vs, const at::Tensor& lam) {
  return sum_of_squares_cpu<true>("residual_sumsq", us, vs, &lam);
}

// ----- element-wise ops ---------------------------------------------------------------------
// A written list may be a read list at the same index (axpy_(y, y), scale_copy_(v, v)): every
// op reads element i of all its lists before it writes element i of any, as the CUDA kernels do.

// Checks the op's kLists lists and calls f(p, i, s) for every element i: p[l] is list l at the
// segment (storage type T), s[k] the k-th scalar in the accumulation type A.
template <int kLists, typename F>
void elementwise_cpu(const char* op, c10::ArrayRef<at::TensorList> lists,
                     std::initializer_list<std::pair<const char*, const at::Tensor*>> scalars, const F& f) {
  const Group g = check_lists(op, lists);
  if (g.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, "xsam::elementwise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t s[2] = {};
    int k = 0;
    for (const auto& [name, value] : scalars) s[k++] = cpu_scalar<acc_t>(op, name, *value);
    for_each_segment(g, [&](int64_t t, int64_t begin, int64_t len) {
      scalar_t* p[kLists];
      for (int l = 0; l < kLists; ++l) p[l] = at_offset<scalar_t>(g, l, t, begin);
      for (int64_t i = 0; i < len; ++i) f(p, i, s);
    });
  });
}

// The element functions f(p, i, s) below: p[l] is list l (storage type T), s[k] scalar k (accumulation type A).

// saved = w, then w += scale * g (scale * w * w * g when adaptive): one loop per value of
// `adaptive`, each free of the branch.
void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved, const at::Tensor& scale,
                 bool adaptive) {
  const auto run = [&](auto asam) {
    const auto f = []<typename T, typename A>(T* const* p, int64_t i, const A* s) {
      const T wi = p[0][i];
      const A w = static_cast<A>(wi), g = static_cast<A>(p[1][i]);
      p[2][i] = wi;
      p[0][i] = static_cast<T>(decltype(asam)::value ? w + s[0] * w * w * g : w + s[0] * g);
    };
    elementwise_cpu<3>("perturb_", {params, grads, saved}, {{"scale", &scale}}, f);
  };
  adaptive ? run(std::true_type()) : run(std::false_type());
}

// saved = w, then w += a * g + b * v.
void tilted_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved, at::TensorList vecs,
                        const at::Tensor& a, const at::Tensor& b) {
  const auto f = []<typename T, typename A>(T* const* p, int64_t i, const A* s) {
    const T wi = p[0][i];
    const A w = static_cast<A>(wi), g = static_cast<A>(p[1][i]);
    p[2][i] = wi;
    p[0][i] = static_cast<T>(w + s[0] * g + s[1] * static_cast<A>(p[3][i]));
  };
  elementwise_cpu<4>("tilted_perturb_", {params, grads, saved, vecs}, {{"a", &a}, {"b", &b}}, f);
}

// g = a * g - b * v (a * g without vecs), and w = saved.
void correct_restore_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved,
                         const std::optional<at::TensorList>& vecs, const at::Tensor& a, const at::Tensor& b) {
  const auto run = [&](auto with_vecs) {
    constexpr int kLists = decltype(with_vecs)::value ? 4 : 3;
    const auto f = []<typename T, typename A>(T* const* p, int64_t i, const A* s) {
      const T restored = p[2][i];
      const A g = static_cast<A>(p[1][i]);
      p[1][i] = static_cast<T>(kLists == 4 ? s[0] * g - s[1] * static_cast<A>(p[3][i]) : s[0] * g);
      p[0][i] = restored;
    };
    const at::TensorList lists[] = {params, grads, saved, vecs.value_or(at::TensorList())};
    elementwise_cpu<kLists>("correct_restore_", {lists, kLists}, {{"a", &a}, {"b", &b}}, f);
  };
  vecs.has_value() ? run(std::true_type()) : run(std::false_type());
}

void axpy_cpu(at::TensorList ys, at::TensorList xs, const at::Tensor& alpha) {
  const auto f = []<typename T, typename A>(T* const* p, int64_t i, const A* s) {
    p[0][i] = static_cast<T>(static_cast<A>(p[0][i]) + s[0] * static_cast<A>(p[1][i]));
  };
  elementwise_cpu<2>("axpy_", {ys, xs}, {{"alpha", &alpha}}, f);
}

void scale_copy_cpu(at::TensorList dsts, at::TensorList srcs, const at::Tensor& scale) {
  const auto f = []<typename T, typename A>(T* const* p, int64_t i, const A* s) {
    p[0][i] = static_cast<T>(s[0] * static_cast<A>(p[1][i]));
  };
  elementwise_cpu<2>("scale_copy_", {dsts, srcs}, {{"scale", &scale}}, f);
}

}  // namespace
}  // namespace xsam

TORCH_LIBRARY_IMPL(xsam, CPU, m) {
  m.impl("dots", &xsam::dots_cpu);
  m.impl("weighted_sumsq", &xsam::weighted_sumsq_cpu);
  m.impl("residual_sumsq", &xsam::residual_sumsq_cpu);
  m.impl("perturb_", &xsam::perturb_cpu);
  m.impl("tilted_perturb_", &xsam::tilted_perturb_cpu);
  m.impl("correct_restore_", &xsam::correct_restore_cpu);
  m.impl("axpy_", &xsam::axpy_cpu);
  m.impl("scale_copy_", &xsam::scale_copy_cpu);
}
