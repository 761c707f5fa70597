// The element-wise ops of the CUDA op set: one functor each (what happens to one element of
// each list, in the accumulation dtype with one rounding on store) and its launcher. The lists an
// op only writes (kStores without kLoads: the saved copy, the restored weights) are never read.
// A written list may be a read list at the same index (axpy_(y, y)): one thread loads an
// element of every list before it stores any (multi_tensor_apply.cuh, for_each_element).
#include "multi_tensor_apply.cuh"

namespace xsam {
namespace cuda {
namespace {

// The op's device scalars (one value of the accumulation dtype each), read once per block.
template <typename T>
struct OneScalar {
  const void* a_ptr;
  Acc<T> a = 0;
  __device__ void load_scalars() { a = *static_cast<const Acc<T>*>(a_ptr); }
};

template <typename T>
struct TwoScalars {
  const void* a_ptr;
  const void* b_ptr;
  Acc<T> a = 0, b = 0;
  __device__ void load_scalars() {
    a = *static_cast<const Acc<T>*>(a_ptr);
    b = *static_cast<const Acc<T>*>(b_ptr);
  }
};

template <typename T>
struct Perturb : OneScalar<T> {  // a = scale
  using storage_t = T;
  static constexpr int kLists = 3;  // params (rw), grads (r), saved (w)
  static constexpr unsigned kLoads = 0b011, kStores = 0b101;
  bool adaptive;
  __device__ void operator()(T (&v)[kLists]) const {
    const Acc<T> w = to_acc(v[0]), g = to_acc(v[1]), s = this->a;
    v[2] = v[0];  // the exact bits
    v[0] = from_acc<T>(adaptive ? w + s * w * w * g : w + s * g);
  }
};

template <typename T>
struct TiltedPerturb : TwoScalars<T> {
  using storage_t = T;
  static constexpr int kLists = 4;  // params (rw), grads (r), saved (w), vecs (r)
  static constexpr unsigned kLoads = 0b1011, kStores = 0b0101;
  __device__ void operator()(T (&v)[kLists]) const {
    v[2] = v[0];
    v[0] = from_acc<T>(to_acc(v[0]) + this->a * to_acc(v[1]) + this->b * to_acc(v[3]));
  }
};

template <typename T, bool kWithVecs>
struct CorrectRestore : TwoScalars<T> {
  using storage_t = T;
  static constexpr int kLists = kWithVecs ? 4 : 3;  // params (w), grads (rw), saved (r)[, vecs (r)]
  static constexpr unsigned kLoads = kWithVecs ? 0b1110 : 0b110, kStores = 0b0011;
  __device__ void operator()(T (&v)[kLists]) const {
    if constexpr (kWithVecs) {
      v[1] = from_acc<T>(this->a * to_acc(v[1]) - this->b * to_acc(v[3]));
    } else {
      v[1] = from_acc<T>(this->a * to_acc(v[1]));
    }
    v[0] = v[2];
  }
};

template <typename T>
struct Axpy : OneScalar<T> {  // a = alpha
  using storage_t = T;
  static constexpr int kLists = 2;  // ys (rw), xs (r)
  static constexpr unsigned kLoads = 0b11, kStores = 0b01;
  __device__ void operator()(T (&v)[kLists]) const { v[0] = from_acc<T>(to_acc(v[0]) + this->a * to_acc(v[1])); }
};

template <typename T>
struct ScaleCopy : OneScalar<T> {  // a = scale
  using storage_t = T;
  static constexpr int kLists = 2;  // dsts (w), srcs (r)
  static constexpr unsigned kLoads = 0b10, kStores = 0b01;
  __device__ void operator()(T (&v)[kLists]) const { v[0] = from_acc<T>(this->a * to_acc(v[1])); }
};

}  // namespace

cudaError_t perturb(DType dtype, const Lists& lists, const void* scale, bool adaptive, cudaStream_t stream) {
  return with_storage_type(dtype, [&](auto type) {
    return launch_elementwise(lists, Perturb<typename decltype(type)::type>{{scale}, adaptive}, stream);
  });
}

cudaError_t tilted_perturb(DType dtype, const Lists& lists, const void* a, const void* b, cudaStream_t stream) {
  return with_storage_type(dtype, [&](auto type) {
    return launch_elementwise(lists, TiltedPerturb<typename decltype(type)::type>{{a, b}}, stream);
  });
}

cudaError_t correct_restore(DType dtype, const Lists& lists, bool with_vecs, const void* a, const void* b,
                            cudaStream_t stream) {
  return with_storage_type(dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    if (with_vecs) return launch_elementwise(lists, CorrectRestore<T, true>{{a, b}}, stream);
    return launch_elementwise(lists, CorrectRestore<T, false>{{a, b}}, stream);
  });
}

cudaError_t axpy(DType dtype, const Lists& lists, const void* alpha, cudaStream_t stream) {
  return with_storage_type(dtype, [&](auto type) {
    return launch_elementwise(lists, Axpy<typename decltype(type)::type>{{alpha}}, stream);
  });
}

cudaError_t scale_copy(DType dtype, const Lists& lists, const void* scale, cudaStream_t stream) {
  return with_storage_type(dtype, [&](auto type) {
    return launch_elementwise(lists, ScaleCopy<typename decltype(type)::type>{{scale}}, stream);
  });
}

}  // namespace cuda
}  // namespace xsam
