// The checks both device implementations of the xsam op set share. The schemas come from
// xsam/ops/contract.py (defined from Python before this library is loaded); this side only registers
// kernels. Host time per tensor matters (an optimizer step checks every tensor of every list), so
// the checks run as plain comparisons on the TensorImpl, and only a failing call runs them again to
// build the message.
#include "xsam_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <deque>
#include <string>
#include <tuple>
#include <utility>

namespace xsam {
namespace {

enum class Access { kRead, kWrite };

// One list argument of a call. `index` >= 0 names a list of `dots` ("lists[index]").
struct NamedList {
  const char* name;
  at::TensorList tensors;
  Access access = Access::kRead;
  int index = -1;
};

// The Tensor[] arguments of an op's registered schema, in order: their names, and whether the op
// writes them (Tensor(a!)[]).
using ListArguments = std::vector<std::pair<std::string, Access>>;

ListArguments read_schema(const char* op) {
  const auto& schema = c10::Dispatcher::singleton().findSchemaOrThrow((std::string("xsam::") + op).c_str(), "");
  ListArguments out;
  for (const auto& arg : schema.schema().arguments()) {
    c10::TypePtr type = arg.type();
    if (const auto optional = type->cast<c10::OptionalType>()) type = optional->getElementType();
    if (*type != *c10::ListType::ofTensors()) continue;
    out.emplace_back(arg.name(), arg.alias_info() && arg.alias_info()->isWrite() ? Access::kWrite : Access::kRead);
  }
  return out;
}

// Read once per op and thread, found by the address of the op's name (callers pass literals): no
// lock on the hot path. A deque keeps the entries in place as it grows.
const ListArguments& list_arguments(const char* op) {
  static thread_local std::deque<std::pair<const char*, ListArguments>> known;
  for (const auto& [name, args] : known) {
    if (name == op) return args;
  }
  return known.emplace_back(op, read_schema(op)).second;
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

std::string display_name(const NamedList& list) {
  return list.index >= 0 ? "lists[" + std::to_string(list.index) + "]" : std::string(list.name);
}

// Strides of size-1 dimensions are arbitrary (a contiguous (1, 16) tensor may have strides
// (16, 1) or (1, 1)), so two tensors share an element order when the strides of their other
// dimensions agree.
bool same_memory_order(const c10::TensorImpl& a, const c10::TensorImpl& b) {
  const auto sizes = a.sizes();
  const auto sa = a.strides(), sb = b.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] != 1 && sa[d] != sb[d]) return false;
  }
  return true;
}

// Sizes compared in line: std::equal calls memcmp, a library call per tensor for one to four
// values.
bool same_sizes(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t d = 0; d < a.size(); ++d) {
    if (a[d] != b[d]) return false;
  }
  return true;
}

// What every tensor of a group shares, read once from its first tensor.
struct GroupKind {
  caffe2::TypeMeta dtype;
  c10::Device device;
};

// Tensor `t` may stand at the position of `ref` (ref already validated against `kind`): the fast path.
bool compatible(const c10::TensorImpl& t, const c10::TensorImpl& ref, const GroupKind& kind) {
  if (&t == &ref) return true;
  if (t.dtype() != kind.dtype || t.device() != kind.device) return false;
  if (!same_sizes(t.sizes(), ref.sizes())) return false;
  if (t.is_contiguous() && ref.is_contiguous()) return true;  // same sizes: same order
  return t.is_non_overlapping_and_dense() && same_memory_order(t, ref);
}

// Below this many positions a parallel region costs more than the checks it would share.
constexpr int64_t kMinParallelChecks = 256;

bool valid_group(c10::ArrayRef<NamedList> lists, size_t n) {
  for (const auto& list : lists) {
    if (list.tensors.size() != n) return false;
  }
  if (!lists[0].tensors[0].defined() || !supported_dtype(lists[0].tensors[0].scalar_type())) return false;
  const c10::TensorImpl* first = lists[0].tensors[0].unsafeGetTensorImpl();
  const GroupKind kind{first->dtype(), first->device()};
  const auto position_ok = [&](size_t i) {
    const at::Tensor& ref_tensor = lists[0].tensors[i];
    if (!ref_tensor.defined()) return false;
    const c10::TensorImpl& ref = *ref_tensor.unsafeGetTensorImpl();
    if (ref.dtype() != kind.dtype || ref.device() != kind.device || !ref.is_non_overlapping_and_dense()) {
      return false;
    }
    for (size_t l = 1; l < lists.size(); ++l) {
      const at::Tensor& t = lists[l].tensors[i];
      if (!t.defined() || !compatible(*t.unsafeGetTensorImpl(), ref, kind)) return false;
    }
    return true;
  };
  // The checks wait on memory (TensorImpls scattered over the heap), so long lists are split over
  // the OpenMP threads.
  bool ok = true;
  const int64_t count = static_cast<int64_t>(n);
#pragma omp parallel for schedule(static) reduction(&& : ok) if (count >= kMinParallelChecks)
  for (int64_t i = 0; i < count; ++i) {
    try {
      ok = ok && position_ok(static_cast<size_t>(i));
    } catch (...) {  // nothing may leave a parallel region: the serial slow path raises it again
      ok = false;
    }
  }
  return ok;
}

// The slow path of check_group: finds the first problem and throws its message.
[[noreturn]] void explain_invalid_group(const char* op, c10::ArrayRef<NamedList> lists) {
  const NamedList& first = lists[0];
  const size_t n = first.tensors.size();
  for (const auto& list : lists) {
    TORCH_CHECK(list.tensors.size() == n, "xsam::", op, ": argument '", display_name(list), "' has ",
                list.tensors.size(), " tensors but '", display_name(first), "' has ", n,
                "; the lists must be aligned (one entry per parameter)");
  }
  TORCH_CHECK(first.tensors[0].defined(), "xsam::", op, ": ", display_name(first), "[0] is undefined");
  const auto device = first.tensors[0].device();
  const auto dtype = first.tensors[0].scalar_type();
  TORCH_CHECK(supported_dtype(dtype), "xsam::", op, ": argument '", display_name(first), "' has dtype ", dtype,
              "; supported storage dtypes are float32, float64, float16 and bfloat16");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = first.tensors[i];
    for (const auto& list : lists) {
      const at::Tensor& t = list.tensors[i];
      const std::string name = display_name(list);
      TORCH_CHECK(t.defined(), "xsam::", op, ": ", name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device && t.scalar_type() == dtype, "xsam::", op, ": ", name, "[", i, "] is ",
                  t.scalar_type(), " on ", t.device(), " but ", display_name(first), "[0] is ", dtype, " on ",
                  device, "; group the tensors by (device, dtype) first (xsam.ops does this)");
      TORCH_CHECK(t.sizes().equals(ref.sizes()), "xsam::", op, ": ", name, "[", i, "] has shape ", t.sizes(),
                  " but ", display_name(first), "[", i, "] has shape ", ref.sizes(),
                  "; aligned tensors must have the same shape");
      TORCH_CHECK(t.is_non_overlapping_and_dense() &&
                      same_memory_order(*t.unsafeGetTensorImpl(), *ref.unsafeGetTensorImpl()),
                  "xsam::", op, ": ", name, "[", i, "] must be dense with the same strides as ",
                  display_name(first), "[", i, "] (got strides ", t.strides(), " vs ", ref.strides(),
                  "); pass contiguous tensors (the Python adapter does this for you)");
    }
  }
  TORCH_INTERNAL_ASSERT(false, "xsam::", op, ": the fast check refused lists the detailed check accepts");
}

// A written tensor's address range (dense tensors occupy [data, data + numel * itemsize)) and
// where it stands in the call.
struct Extent {
  uintptr_t begin, end;
  int list;
  int64_t index;
  bool operator==(const Extent&) const = default;
};

// The written extents of a call, in call order (empty tensors occupy nothing).
std::vector<Extent> written_extents(c10::ArrayRef<NamedList> lists, const Group& group) {
  std::vector<Extent> extents;
  const size_t itemsize = c10::elementSize(group.dtype);
  for (size_t l = 0; l < lists.size(); ++l) {
    if (lists[l].access != Access::kWrite) continue;
    void* const* addr = group.list(static_cast<int>(l));
    for (int64_t t = 0; t < group.num_tensors; ++t) {
      if (group.numel[t] == 0) continue;
      const auto begin = reinterpret_cast<uintptr_t>(addr[t]);
      extents.push_back({begin, begin + group.numel[t] * itemsize, static_cast<int>(l), t});
    }
  }
  return extents;
}

// Two writers of one element race, so written tensors must not share memory. Checked on the
// extents sorted by start (O(n) when they come in address order); throws, naming both, on an overlap.
void find_overlapping_writes(const char* op, c10::ArrayRef<NamedList> lists, std::vector<Extent> extents) {
  const auto by_begin = [](const Extent& a, const Extent& b) { return a.begin < b.begin; };
  if (!std::is_sorted(extents.begin(), extents.end(), by_begin)) {
    std::sort(extents.begin(), extents.end(), by_begin);
  }
  size_t reach = 0;  // the extent that ends last among those seen
  for (size_t k = 1; k < extents.size(); ++k) {
    if (extents[k].begin < extents[reach].end) {
      const Extent* a = &extents[reach];
      const Extent* b = &extents[k];
      if (std::tie(b->list, b->index) < std::tie(a->list, a->index)) std::swap(a, b);
      TORCH_CHECK(false, "xsam::", op, ": ", display_name(lists[b->list]), "[", b->index, "] shares memory with ",
                  display_name(lists[a->list]), "[", a->index, "] (the same tensor twice, or overlapping views), "
                  "and the op writes both: two writers of one element race on a GPU. Pass distinct tensors "
                  "(clone the duplicate) or call the op once per distinct tensor.");
    }
    if (extents[k].end > extents[reach].end) reach = k;
  }
}

// Written sets already found free of overlaps are remembered (per thread: no locking): a step
// applies several ops to the same written lists, so a call whose extents equal those of a checked
// call takes its verdict for one comparison per tensor instead of a sort.
void check_writes_do_not_overlap(const char* op, c10::ArrayRef<NamedList> lists, const Group& group) {
  static thread_local std::array<std::vector<Extent>, 4> checked;  // a step's distinct written sets, and spare
  static thread_local size_t next = 0;
  std::vector<Extent> extents = written_extents(lists, group);
  if (extents.size() < 2 || std::find(checked.begin(), checked.end(), extents) != checked.end()) return;
  find_overlapping_writes(op, lists, extents);  // a copy: the cache keeps the call order
  checked[next] = std::move(extents);
  next = (next + 1) % checked.size();
}

Group check_group(const char* op, c10::ArrayRef<NamedList> lists) {
  TORCH_CHECK(!lists.empty(), "xsam::", op, ": no tensor lists given");
  const size_t n = lists[0].tensors.size();
  Group group;
  if (n == 0) {
    for (const auto& list : lists) {
      if (!list.tensors.empty()) explain_invalid_group(op, lists);
    }
    return group;
  }
  if (!valid_group(lists, n)) explain_invalid_group(op, lists);
  const at::Tensor& first = lists[0].tensors[0];
  group.device = first.device();
  group.dtype = first.scalar_type();
  group.num_tensors = static_cast<int64_t>(n);
  group.numel.resize(n);
  for (size_t t = 0; t < n; ++t) group.numel[t] = lists[0].tensors[t].unsafeGetTensorImpl()->numel();
  group.addr.resize(lists.size() * n);
  // Written lists first: a read list aliasing a written copy-on-write tensor then sees the
  // materialised storage.
  for (const Access pass : {Access::kWrite, Access::kRead}) {
    for (size_t l = 0; l < lists.size(); ++l) {
      if (lists[l].access != pass) continue;
      void** addr = group.addr.data() + l * n;
      for (size_t t = 0; t < n; ++t) {
        const at::Tensor& tensor = lists[l].tensors[t];
        addr[t] = pass == Access::kWrite ? tensor.mutable_data_ptr() : const_cast<void*>(tensor.const_data_ptr());
      }
    }
  }
  check_writes_do_not_overlap(op, lists, group);
  return group;
}

}  // namespace

Group check_lists(const char* op, c10::ArrayRef<at::TensorList> lists) {
  const ListArguments& args = list_arguments(op);
  TORCH_INTERNAL_ASSERT(lists.size() <= args.size(), "xsam::", op, ": ", lists.size(),
                        " lists passed, but its schema has ", args.size());
  c10::SmallVector<NamedList, 4> named;
  for (size_t l = 0; l < lists.size(); ++l) named.push_back({args[l].first.c_str(), lists[l], args[l].second});
  return check_group(op, named);
}

DotsCall check_dots(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs) {
  TORCH_CHECK(num_lists >= 1, "xsam::dots: num_lists must be at least 1, got ", num_lists);
  const int64_t total = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(total % num_lists == 0, "xsam::dots: ", total, " tensors cannot be split into num_lists=", num_lists,
              " aligned lists; pass the lists concatenated, each of the same length");
  TORCH_CHECK(pairs.size() % 2 == 0, "xsam::dots: pairs must be flattened (a0, b0, a1, b1, ...), got ",
              pairs.size(), " entries");
  DotsCall call;
  call.num_lists = static_cast<int>(num_lists);
  for (size_t k = 0; k < pairs.size(); k += 2) {
    for (size_t j = 0; j < 2; ++j) {
      TORCH_CHECK(pairs[k + j] >= 0 && pairs[k + j] < num_lists, "xsam::dots: pair ", k / 2, " names list ",
                  pairs[k + j], " but only lists 0..", num_lists - 1, " exist");
    }
    call.pair_a.push_back(static_cast<int>(pairs[k]));
    call.pair_b.push_back(static_cast<int>(pairs[k + 1]));
  }
  const int64_t per_list = total / num_lists;
  std::vector<NamedList> lists;
  lists.reserve(num_lists);
  for (int64_t l = 0; l < num_lists; ++l) {
    lists.push_back({"lists", tensors.slice(l * per_list, per_list), Access::kRead, static_cast<int>(l)});
  }
  call.group = check_group("dots", lists);
  return call;
}

template <typename acc_t>
acc_t cpu_scalar(const char* op, const char* name, const at::Tensor& scalar) {
  TORCH_CHECK(scalar.defined() && scalar.numel() == 1, "xsam::", op, ": argument '", name,
              "' must be a 0-d tensor (one value), got ", scalar.defined() ? "shape " : "an undefined tensor",
              scalar.defined() ? scalar.sizes() : at::IntArrayRef());
  TORCH_CHECK(scalar.device().is_cpu(), "xsam::", op, ": argument '", name, "' is on ", scalar.device(),
              " but the tensors are on cpu; keep scalars on the tensors' device");
  if (scalar.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
    return *static_cast<const acc_t*>(scalar.const_data_ptr());
  }
  return scalar.item<acc_t>();
}
template float cpu_scalar<float>(const char*, const char*, const at::Tensor&);
template double cpu_scalar<double>(const char*, const char*, const at::Tensor&);

at::Tensor device_scalar(const char* op, const char* name, const at::Tensor& scalar, const at::Device& device,
                         at::ScalarType acc) {
  TORCH_CHECK(scalar.defined() && scalar.numel() == 1, "xsam::", op, ": argument '", name,
              "' must be a 0-d tensor (one value)");
  TORCH_CHECK(scalar.device() == device, "xsam::", op, ": argument '", name, "' is on ", scalar.device(),
              " but the tensors are on ", device, "; keep scalars on the tensors' device (no host round trip)");
  return scalar.reshape({}).to(acc).contiguous();
}

at::Tensor sums_of_nothing(int64_t n) {
  return at::zeros({n}, at::dtype(at::kFloat));
}

namespace {

// A call without any tensor (dots or weighted_sumsq of empty lists: the element-wise ops and
// residual_sumsq always have a scalar tensor) gives the dispatcher no device to choose a kernel
// by; it lands here and gets the contract's zeros. Tensors of a device without xsam kernels
// (mps, xla, ...) land here too, and are refused by name.
void check_no_tensors(const char* op, at::TensorList tensors) {
  TORCH_CHECK(tensors.empty(), "xsam::", op, ": this build of xsam._C has no kernel for ", tensors[0].device(),
              " tensors (cpu always, cuda when built with nvcc); use backend='reference' for them");
}

at::Tensor dots_of_no_tensors(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs) {
  check_no_tensors("dots", tensors);
  return sums_of_nothing(static_cast<int64_t>(check_dots(tensors, num_lists, pairs).pair_a.size()));
}

at::Tensor weighted_sumsq_of_no_tensors(at::TensorList weights, at::TensorList xs) {
  check_no_tensors("weighted_sumsq", weights);
  check_no_tensors("weighted_sumsq", xs);
  return sums_of_nothing(1);
}

}  // namespace
}  // namespace xsam

TORCH_LIBRARY_IMPL(xsam, CompositeExplicitAutograd, m) {
  m.impl("dots", &xsam::dots_of_no_tensors);
  m.impl("weighted_sumsq", &xsam::weighted_sumsq_of_no_tensors);
}
