// The Python module `xsam._C`: importing it runs the kernel registrations (TORCH_LIBRARY_IMPL
// in ops_cpu.cpp and cuda/), and it offers one fast entry per op for eager calls. (The CMake
// build leaves this file out and is loaded with torch.ops.load_library.)
//
// Why fast entries: torch.ops.xsam.<op> converts every tensor of every list to an IValue and back,
// and the autograd fallback boxes the call again. These entries borrow the tensors of the Python
// lists and call the same registered kernel through the dispatcher's typed interface at the
// tensors' backend key; anything unusual (no tensor, a __torch_dispatch__ subclass, another device)
// takes the full dispatcher path, so the result is always the registered op's.
#include "kernel_constants.h"

#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/MaybeOwned.h>

#include <optional>
#include <string>
#include <vector>

namespace {

using Borrow = c10::MaybeOwnedTraits<at::Tensor>;

// The tensors of a Python list or tuple, borrowed: valid while the caller holds the list.
class BorrowedTensors {
 public:
  BorrowedTensors(py::handle sequence, const char* name) {
    PyObject* seq = sequence.ptr();
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
      throw py::type_error(std::string("xsam: argument '") + name + "' must be a list of tensors");
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    // Check everything before borrowing anything: a borrowed tensor must never reach an ordinary
    // destructor, which an exception thrown half-way through this constructor would cause.
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        throw py::type_error(std::string("xsam: ") + name + "[" + std::to_string(i) + "] is not a tensor");
      }
    }
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) tensors_.push_back(Borrow::createBorrow(THPVariable_Unpack(items[i])));
  }
  ~BorrowedTensors() {
    for (auto& t : tensors_) Borrow::destroyBorrow(t);
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

// The backend key to call the kernel at directly, or nullopt for the full dispatcher path.
std::optional<c10::DispatchKeySet> backend_keys(at::TensorList first) {
  if (first.empty()) return std::nullopt;
  const at::Tensor& t = first[0];
  if (t.key_set().has(c10::DispatchKey::Python)) return std::nullopt;
  if (t.is_cpu()) return c10::DispatchKeySet(c10::DispatchKey::CPU);
  if (t.is_cuda()) return c10::DispatchKeySet(c10::DispatchKey::CUDA);
  return std::nullopt;
}

template <class Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// `op` is looked up once per entry (a static in each entry: ops of the same signature, such as
// axpy_ and scale_copy_, must not share one).
template <class Signature, class... Args>
auto call(const c10::TypedOperatorHandle<Signature>& op, at::TensorList first, Args&&... args) {
  const auto keys = backend_keys(first);
  if (keys) {
    // Only here without the GIL: the full dispatcher path may call back into Python
    // (__torch_dispatch__). The borrowed tensors stay alive: the caller holds the lists.
    py::gil_scoped_release no_gil;
    return op.redispatch(*keys, std::forward<Args>(args)...);
  }
  return op.call(std::forward<Args>(args)...);
}

// The schemas' C++ signatures (xsam/ops/contract.py).
using TL = at::TensorList;
using T = const at::Tensor&;
using DotsSig = at::Tensor(TL, int64_t, at::IntArrayRef);
using PairSumSig = at::Tensor(TL, TL);
using ResidualSig = at::Tensor(TL, TL, T);
using PerturbSig = void(TL, TL, TL, T, bool);
using TiltedSig = void(TL, TL, TL, TL, T, T);
using CorrectSig = void(TL, TL, TL, const std::optional<TL>&, T, T);
using UpdateSig = void(TL, TL, T);

at::Tensor dots(py::handle tensors, int64_t num_lists, std::vector<int64_t> pairs) {
  static const auto op = handle<DotsSig>("xsam::dots");
  const BorrowedTensors t(tensors, "tensors");
  return call(op, t.list(), t.list(), num_lists, at::IntArrayRef(pairs));
}

at::Tensor weighted_sumsq(py::handle weights, py::handle xs) {
  static const auto op = handle<PairSumSig>("xsam::weighted_sumsq");
  const BorrowedTensors w(weights, "weights"), x(xs, "xs");
  return call(op, w.list(), w.list(), x.list());
}

at::Tensor residual_sumsq(py::handle us, py::handle vs, const at::Tensor& lam) {
  static const auto op = handle<ResidualSig>("xsam::residual_sumsq");
  const BorrowedTensors u(us, "us"), v(vs, "vs");
  return call(op, u.list(), u.list(), v.list(), lam);
}

void perturb_(py::handle params, py::handle grads, py::handle saved, const at::Tensor& scale, bool adaptive) {
  static const auto op = handle<PerturbSig>("xsam::perturb_");
  const BorrowedTensors p(params, "params"), g(grads, "grads"), s(saved, "saved");
  call(op, p.list(), p.list(), g.list(), s.list(), scale, adaptive);
}

void tilted_perturb_(py::handle params, py::handle grads, py::handle saved, py::handle vecs, const at::Tensor& a,
                     const at::Tensor& b) {
  static const auto op = handle<TiltedSig>("xsam::tilted_perturb_");
  const BorrowedTensors p(params, "params"), g(grads, "grads"), s(saved, "saved"), v(vecs, "vecs");
  call(op, p.list(), p.list(), g.list(), s.list(), v.list(), a, b);
}

void correct_restore_(py::handle params, py::handle grads, py::handle saved, py::handle vecs, const at::Tensor& a,
                      const at::Tensor& b) {
  static const auto op = handle<CorrectSig>("xsam::correct_restore_");
  const BorrowedTensors p(params, "params"), g(grads, "grads"), s(saved, "saved");
  std::optional<BorrowedTensors> v;
  if (!vecs.is_none()) v.emplace(vecs, "vecs");
  const std::optional<TL> vl = v ? std::optional<TL>(v->list()) : std::nullopt;
  call(op, p.list(), p.list(), g.list(), s.list(), vl, a, b);
}

void axpy_(py::handle ys, py::handle xs, const at::Tensor& alpha) {
  static const auto op = handle<UpdateSig>("xsam::axpy_");
  const BorrowedTensors y(ys, "ys"), x(xs, "xs");
  call(op, y.list(), y.list(), x.list(), alpha);
}

void scale_copy_(py::handle dsts, py::handle srcs, const at::Tensor& scale) {
  static const auto op = handle<UpdateSig>("xsam::scale_copy_");
  const BorrowedTensors d(dsts, "dsts"), s(srcs, "srcs");
  call(op, d.list(), d.list(), s.list(), scale);
}

// [t.grad for t in tensors] and how many are None, with the attribute lookup (slow through
// nn.Parameter's type) done in C++. Only a plain torch.Tensor or nn.Parameter outside any torch
// function mode is read here; a subclass may override __torch_function__ or `grad`, so it is asked in Python.
py::tuple gradients(py::handle tensors) {
  PyObject* seq = tensors.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) throw py::type_error("xsam: 'tensors' must be a list of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  py::list out(n);
  Py_ssize_t missing = 0;
  const bool plain_allowed = !at::impl::torch_function_mode_enabled();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!THPVariable_Check(item)) throw py::type_error("xsam: tensors[" + std::to_string(i) + "] is not a tensor");
    py::object grad;
    if (plain_allowed && THPVariable_CheckTypeExact(Py_TYPE(item))) {
      at::Tensor g = THPVariable_Unpack(item).grad();
      grad = g.defined() ? py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(g))) : py::none();
    } else {
      grad = py::reinterpret_steal<py::object>(PyObject_GetAttrString(item, "grad"));
      if (!grad) throw py::error_already_set();
    }
    missing += grad.is_none();
    PyList_SET_ITEM(out.ptr(), i, grad.release().ptr());
  }
  return py::make_tuple(std::move(out), missing);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xsam's compiled op set (kernels reached through torch.ops.xsam) and fast eager entries to them";
  m.def("dots", &dots);
  m.def("weighted_sumsq", &weighted_sumsq);
  m.def("residual_sumsq", &residual_sumsq);
  m.def("perturb_", &perturb_);
  m.def("tilted_perturb_", &tilted_perturb_);
  m.def("correct_restore_", &correct_restore_);
  m.def("axpy_", &axpy_);
  m.def("scale_copy_", &scale_copy_);
  m.def("gradients", &gradients);
  // Where the kernels cut their work (kernel_constants.h): the checks size their cases from these.
  m.attr("CPU_CHUNK") = xsam::kCpuChunk;
  m.attr("CPU_MIN_PARALLEL_ITEMS") = xsam::kCpuMinParallelItems;
  m.attr("CUDA_CHUNK") = xsam::kCudaChunk;
}
