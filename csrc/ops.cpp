// The checks both device implementations of the xsam op set share.
//
// The schemas are declared once, in xsam/ops/contract.py, and defined from Python before this
// library is loaded; the C++ side only registers kernels (TORCH_LIBRARY_IMPL), and a kernel
// whose signature disagrees with its schema fails at registration.
#include "xsam_ops.h"

namespace xsam {

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels, int64_t chunk) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += chunk) {
      chunks.push_back({t, begin, std::min(chunk, numels[t] - begin)});
    }
  }
  return chunks;
}

static bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}


// Strides of size-1 dimensions are arbitrary (a contiguous (1, 16) tensor may have strides
// (16, 1) or (1, 1)), so two tensors share an element order when the strides of their
// other dimensions agree.
static bool same_memory_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_group(const char* op, const std::vector<NamedList>& lists) {
  TORCH_CHECK(!lists.empty(), "xsam::", op, ": no tensor lists given");
  const auto& first = lists[0];
  const size_t n = first.tensors.size();
  for (const auto& list : lists) {
    TORCH_CHECK(list.tensors.size() == n, "xsam::", op, ": argument '", list.name, "' has ",
                list.tensors.size(), " tensors but '", first.name, "' has ", n,
                "; the lists must be aligned (one entry per parameter)");
  }
  if (n == 0) return;
  const auto device = first.tensors[0].device();
  const auto dtype = first.tensors[0].scalar_type();
  TORCH_CHECK(supported_dtype(dtype), "xsam::", op, ": argument '", first.name, "' has dtype ",
              dtype, "; supported storage dtypes are float32, float64, float16 and bfloat16");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = first.tensors[i];
    for (const auto& list : lists) {
      const at::Tensor& t = list.tensors[i];
      TORCH_CHECK(t.defined(), "xsam::", op, ": ", list.name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device && t.scalar_type() == dtype, "xsam::", op, ": ", list.name,
                  "[", i, "] is ", t.scalar_type(), " on ", t.device(), " but ", first.name,
                  "[0] is ", dtype, " on ", device,
                  "; group the tensors by (device, dtype) first (xsam.ops does this)");
      TORCH_CHECK(t.sizes().equals(ref.sizes()), "xsam::", op, ": ", list.name, "[", i,
                  "] has shape ", t.sizes(), " but ", first.name, "[", i, "] has shape ",
                  ref.sizes(), "; aligned tensors must have the same shape");
      TORCH_CHECK(t.is_non_overlapping_and_dense() && same_memory_order(t, ref), "xsam::",
                  op, ": ", list.name, "[", i, "] must be dense with the same strides as ", first.name,
                  "[", i, "] (got strides ", t.strides(), " vs ", ref.strides(),
                  "); pass contiguous tensors (the Python adapter does this for you)");
    }
  }
}

DotsLayout check_dots(at::TensorList tensors, int64_t num_lists, at::IntArrayRef pairs) {
  TORCH_CHECK(num_lists >= 1, "xsam::dots: num_lists must be at least 1, got ", num_lists);
  const int64_t total = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(total % num_lists == 0, "xsam::dots: ", total, " tensors cannot be split into num_lists=",
              num_lists, " aligned lists; pass the lists concatenated, each of the same length");
  TORCH_CHECK(pairs.size() % 2 == 0, "xsam::dots: pairs must be flattened (a0, b0, a1, b1, ...), got ",
              pairs.size(), " entries");
  DotsLayout layout;
  layout.per_list = total / num_lists;
  for (size_t k = 0; k < pairs.size(); k += 2) {
    for (size_t j = 0; j < 2; ++j) {
      TORCH_CHECK(pairs[k + j] >= 0 && pairs[k + j] < num_lists, "xsam::dots: pair ", k / 2,
                  " names list ", pairs[k + j], " but only lists 0..", num_lists - 1, " exist");
    }
    layout.a.push_back(pairs[k]);
    layout.b.push_back(pairs[k + 1]);
  }
  for (int64_t l = 0; l < num_lists; ++l) {
    layout.lists.push_back({"lists[" + std::to_string(l) + "]",
                            tensors.slice(l * layout.per_list, layout.per_list)});
  }
  check_group("dots", layout.lists);
  return layout;
}

at::Tensor check_scalar(const char* op, const char* name, const at::Tensor& scalar,
                        const at::Device& device, at::ScalarType acc) {
  TORCH_CHECK(scalar.numel() == 1, "xsam::", op, ": argument '", name,
              "' must be a 0-d tensor (one value), got shape ", scalar.sizes());
  TORCH_CHECK(scalar.device() == device, "xsam::", op, ": argument '", name, "' is on ",
              scalar.device(), " but the tensors are on ", device,
              "; keep scalars on the tensors' device (no host round trip)");
  return scalar.reshape({}).to(acc).contiguous();
}

}  // namespace xsam
