// CPU implementation of the xsam op set: OpenMP over fixed chunks, fp32 (fp64 for fp64)
// arithmetic, one rounding on store.
#include "xsam_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <omp.h>

namespace xsam {
namespace {

// Eight independent partial sums let the compiler vectorise the loop without -ffast-math,
// and the fixed combination order keeps the bits independent of the thread count.
constexpr int kLanes = 8;

template <typename acc_t>
inline acc_t combine_lanes(const acc_t* lane, acc_t tail) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail;
}

template <typename scalar_t, typename acc_t>
acc_t dot_chunk(const scalar_t* x, const scalar_t* y, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<acc_t>(x[i + j]) * static_cast<acc_t>(y[i + j]);
  }
  acc_t tail = 0;
  for (; i < n; ++i) tail += static_cast<acc_t>(x[i]) * static_cast<acc_t>(y[i]);
  return combine_lanes(lane, tail);
}

template <typename scalar_t, typename acc_t>
acc_t weighted_sumsq_chunk(const scalar_t* w, const scalar_t* x, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t p = static_cast<acc_t>(w[i + j]) * static_cast<acc_t>(x[i + j]);
      lane[j] += p * p;
    }
  }
  acc_t tail = 0;
  for (; i < n; ++i) {
    const acc_t p = static_cast<acc_t>(w[i]) * static_cast<acc_t>(x[i]);
    tail += p * p;
  }
  return combine_lanes(lane, tail);
}

template <typename scalar_t, typename acc_t>
acc_t residual_sumsq_chunk(const scalar_t* u, const scalar_t* v, acc_t lam, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t r = static_cast<acc_t>(u[i + j]) - lam * static_cast<acc_t>(v[i + j]);
      lane[j] += r * r;
    }
  }
  acc_t tail = 0;
  for (; i < n; ++i) {
    const acc_t r = static_cast<acc_t>(u[i]) - lam * static_cast<acc_t>(v[i]);
    tail += r * r;
  }
  return combine_lanes(lane, tail);
}

std::vector<int64_t> numels(at::TensorList ts) {
  std::vector<int64_t> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.numel());
  return out;
}

template <typename scalar_t>
std::vector<scalar_t*> pointers(at::TensorList ts) {
  std::vector<scalar_t*> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.numel() ? t.data_ptr<scalar_t>() : nullptr);
  return out;
}

// Runs body(chunk) over every chunk of the group, in parallel when there is more than one.
template <typename F>
void for_each_chunk(const std::vector<Chunk>& chunks, const F& body) {
  const int64_t n = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t c = 0; c < n; ++c) body(c, chunks[c]);
}

template <typename acc_t>
acc_t scalar_value(const char* op, const char* name, const at::Tensor& s, at::ScalarType acc) {
  // A CPU scalar: reading it is a plain memory load, not a device synchronisation.
  return check_scalar(op, name, s, at::Device(at::kCPU), acc).template item<acc_t>();
}

at::Tensor dots_cpu(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs) {
  const DotsLayout layout = check_dots(tensors, num_lists, pairs);
  const int64_t npairs = static_cast<int64_t>(layout.a.size());
  if (layout.per_list == 0) return at::zeros({npairs}, at::dtype(at::kFloat));
  const auto dtype = tensors[0].scalar_type();
  at::Tensor out = at::zeros({npairs}, tensors[0].options().dtype(accumulation_type(dtype)));
  if (npairs == 0) return out;
  const auto chunks = make_chunks(numels(layout.lists[0].tensors), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::dots", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<std::vector<const scalar_t*>> ptr;
    for (const auto& list : layout.lists) {
      auto p = pointers<scalar_t>(list.tensors);
      ptr.emplace_back(p.begin(), p.end());
    }
    std::vector<acc_t> slots(chunks.size() * npairs);
    for_each_chunk(chunks, [&](int64_t c, const Chunk& ch) {
      for (int64_t k = 0; k < npairs; ++k) {
        slots[c * npairs + k] = dot_chunk<scalar_t, acc_t>(ptr[layout.a[k]][ch.tensor] + ch.begin,
                                                            ptr[layout.b[k]][ch.tensor] + ch.begin, ch.len);
      }
    });
    acc_t* o = out.data_ptr<acc_t>();
    for (int64_t k = 0; k < npairs; ++k) {
      acc_t total = 0;
      for (size_t c = 0; c < chunks.size(); ++c) total += slots[c * npairs + k];
      o[k] = total;
    }
  });
  return out;
}

at::Tensor weighted_sumsq_cpu(at::TensorList weights, at::TensorList xs) {
  check_group("weighted_sumsq", {{"xs", xs}, {"weights", weights}});
  if (xs.empty()) return at::zeros({1}, at::dtype(at::kFloat));
  const auto dtype = xs[0].scalar_type();
  at::Tensor out = at::zeros({1}, xs[0].options().dtype(accumulation_type(dtype)));
  const auto chunks = make_chunks(numels(xs), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::weighted_sumsq", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto w = pointers<scalar_t>(weights);
    const auto x = pointers<scalar_t>(xs);
    std::vector<acc_t> slots(chunks.size());
    for_each_chunk(chunks, [&](int64_t c, const Chunk& ch) {
      slots[c] = weighted_sumsq_chunk<scalar_t, acc_t>(w[ch.tensor] + ch.begin, x[ch.tensor] + ch.begin, ch.len);
    });
    acc_t total = 0;
    for (const acc_t s : slots) total += s;
    out.data_ptr<acc_t>()[0] = total;
  });
  return out;
}

at::Tensor residual_sumsq_cpu(at::TensorList us, at::TensorList vs, const at::Tensor& lam) {
  check_group("residual_sumsq", {{"us", us}, {"vs", vs}});
  if (us.empty()) return at::zeros({1}, at::dtype(at::kFloat));
  const auto dtype = us[0].scalar_type();
  at::Tensor out = at::zeros({1}, us[0].options().dtype(accumulation_type(dtype)));
  const auto chunks = make_chunks(numels(us), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::residual_sumsq", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t l = scalar_value<acc_t>("residual_sumsq", "lam", lam, accumulation_type(dtype));
    const auto u = pointers<scalar_t>(us);
    const auto v = pointers<scalar_t>(vs);
    std::vector<acc_t> slots(chunks.size());
    for_each_chunk(chunks, [&](int64_t c, const Chunk& ch) {
      slots[c] = residual_sumsq_chunk<scalar_t, acc_t>(u[ch.tensor] + ch.begin, v[ch.tensor] + ch.begin, l, ch.len);
    });
    acc_t total = 0;
    for (const acc_t s : slots) total += s;
    out.data_ptr<acc_t>()[0] = total;
  });
  return out;
}

void perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved, const at::Tensor& scale,
                 bool adaptive) {
  check_group("perturb_", {{"params", params}, {"grads", grads}, {"saved", saved}});
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  const auto chunks = make_chunks(numels(params), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scalar_value<acc_t>("perturb_", "scale", scale, accumulation_type(dtype));
    const auto w = pointers<scalar_t>(params);
    const auto g = pointers<scalar_t>(grads);
    const auto sv = pointers<scalar_t>(saved);
    for_each_chunk(chunks, [&](int64_t, const Chunk& ch) {
      scalar_t* wp = w[ch.tensor] + ch.begin;
      const scalar_t* gp = g[ch.tensor] + ch.begin;
      scalar_t* sp = sv[ch.tensor] + ch.begin;
      if (adaptive) {
        for (int64_t i = 0; i < ch.len; ++i) {
          const acc_t wi = static_cast<acc_t>(wp[i]);
          sp[i] = wp[i];
          wp[i] = static_cast<scalar_t>(wi + s * wi * wi * static_cast<acc_t>(gp[i]));
        }
      } else {
        for (int64_t i = 0; i < ch.len; ++i) {
          sp[i] = wp[i];
          wp[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) + s * static_cast<acc_t>(gp[i]));
        }
      }
    });
  });
}

void tilted_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved, at::TensorList vecs,
                        const at::Tensor& a, const at::Tensor& b) {
  check_group("tilted_perturb_", {{"params", params}, {"grads", grads}, {"saved", saved}, {"vecs", vecs}});
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  const auto chunks = make_chunks(numels(params), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::tilted_perturb_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = scalar_value<acc_t>("tilted_perturb_", "a", a, accumulation_type(dtype));
    const acc_t bv = scalar_value<acc_t>("tilted_perturb_", "b", b, accumulation_type(dtype));
    const auto w = pointers<scalar_t>(params);
    const auto g = pointers<scalar_t>(grads);
    const auto sv = pointers<scalar_t>(saved);
    const auto v = pointers<scalar_t>(vecs);
    for_each_chunk(chunks, [&](int64_t, const Chunk& ch) {
      scalar_t* wp = w[ch.tensor] + ch.begin;
      const scalar_t* gp = g[ch.tensor] + ch.begin;
      scalar_t* sp = sv[ch.tensor] + ch.begin;
      const scalar_t* vp = v[ch.tensor] + ch.begin;
      for (int64_t i = 0; i < ch.len; ++i) {
        sp[i] = wp[i];
        wp[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) + av * static_cast<acc_t>(gp[i]) +
                                      bv * static_cast<acc_t>(vp[i]));
      }
    });
  });
}

void correct_restore_cpu(at::TensorList params, at::TensorList grads, at::TensorList saved,
                         const std::optional<at::TensorList>& vecs, const at::Tensor& a, const at::Tensor& b) {
  if (vecs.has_value()) {
    check_group("correct_restore_", {{"params", params}, {"grads", grads}, {"saved", saved}, {"vecs", *vecs}});
  } else {
    check_group("correct_restore_", {{"params", params}, {"grads", grads}, {"saved", saved}});
  }
  if (params.empty()) return;
  const auto dtype = params[0].scalar_type();
  const auto chunks = make_chunks(numels(params), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::correct_restore_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t av = scalar_value<acc_t>("correct_restore_", "a", a, accumulation_type(dtype));
    const acc_t bv = scalar_value<acc_t>("correct_restore_", "b", b, accumulation_type(dtype));
    const auto w = pointers<scalar_t>(params);
    const auto g = pointers<scalar_t>(grads);
    const auto sv = pointers<scalar_t>(saved);
    const auto v = vecs.has_value() ? pointers<scalar_t>(*vecs) : std::vector<scalar_t*>();
    for_each_chunk(chunks, [&](int64_t, const Chunk& ch) {
      scalar_t* wp = w[ch.tensor] + ch.begin;
      scalar_t* gp = g[ch.tensor] + ch.begin;
      const scalar_t* sp = sv[ch.tensor] + ch.begin;
      if (!v.empty()) {
        const scalar_t* vp = v[ch.tensor] + ch.begin;
        for (int64_t i = 0; i < ch.len; ++i) {
          gp[i] = static_cast<scalar_t>(av * static_cast<acc_t>(gp[i]) - bv * static_cast<acc_t>(vp[i]));
          wp[i] = sp[i];
        }
      } else {
        for (int64_t i = 0; i < ch.len; ++i) {
          gp[i] = static_cast<scalar_t>(av * static_cast<acc_t>(gp[i]));
          wp[i] = sp[i];
        }
      }
    });
  });
}

// ys may be xs (y += alpha * y): each element is read before it is written, so aliasing is safe.
void axpy_cpu(at::TensorList ys, at::TensorList xs, const at::Tensor& alpha) {
  check_group("axpy_", {{"ys", ys}, {"xs", xs}});
  if (ys.empty()) return;
  const auto dtype = ys[0].scalar_type();
  const auto chunks = make_chunks(numels(ys), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::axpy_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t al = scalar_value<acc_t>("axpy_", "alpha", alpha, accumulation_type(dtype));
    const auto y = pointers<scalar_t>(ys);
    const auto x = pointers<scalar_t>(xs);
    for_each_chunk(chunks, [&](int64_t, const Chunk& ch) {
      scalar_t* yp = y[ch.tensor] + ch.begin;
      const scalar_t* xp = x[ch.tensor] + ch.begin;
      for (int64_t i = 0; i < ch.len; ++i) {
        yp[i] = static_cast<scalar_t>(static_cast<acc_t>(yp[i]) + al * static_cast<acc_t>(xp[i]));
      }
    });
  });
}

void scale_copy_cpu(at::TensorList dsts, at::TensorList srcs, const at::Tensor& scale) {
  check_group("scale_copy_", {{"dsts", dsts}, {"srcs", srcs}});
  if (dsts.empty()) return;
  const auto dtype = dsts[0].scalar_type();
  const auto chunks = make_chunks(numels(dsts), kCpuChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "xsam::scale_copy_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = scalar_value<acc_t>("scale_copy_", "scale", scale, accumulation_type(dtype));
    const auto d = pointers<scalar_t>(dsts);
    const auto x = pointers<scalar_t>(srcs);
    for_each_chunk(chunks, [&](int64_t, const Chunk& ch) {
      scalar_t* dp = d[ch.tensor] + ch.begin;
      const scalar_t* xp = x[ch.tensor] + ch.begin;
      for (int64_t i = 0; i < ch.len; ++i) dp[i] = static_cast<scalar_t>(s * static_cast<acc_t>(xp[i]));
    });
  });
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
