// The Python module fusedloss._C. Importing it runs the TORCH_LIBRARY
// registrations of every op (csrc/*.cpp); the pybind11 members here are only
// non-tensor helpers: build information, the CPU buffer pool's controls and the
// enums that cross into Python
// (defined once, in the C++ headers).
#include <torch/extension.h>

#include "fusedloss/buffers.h"
#include "fusedloss/chunk_driver.h"
#include "fusedloss/sampled.h"

namespace {
bool built_with_cuda() {
#ifdef FUSEDLOSS_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedloss C++/CUDA kernels (ops are registered under torch.ops.fusedloss)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build");
  namespace py = pybind11;
  m.def("single_pass_block_rows", &fusedloss::choose_block_rows, py::arg("rows"), py::arg("columns"),
        py::arg("row_block"), py::arg("memory_budget"), py::arg("per_pass_bytes"), py::arg("cuda"),
        "Rows per block of a single pass over [rows, columns] logits (0: the recompute pair runs), the choice "
        "every *_sum_and_grad op makes");
  m.def("sampled_single_pass_block_rows", &fusedloss::sampled_single_pass_block_rows, py::arg("rows"),
        py::arg("num_true"), py::arg("num_sampled"), py::arg("dim"), py::arg("half_operands"), py::arg("cuda"),
        py::arg("row_block") = 0, py::arg("memory_budget") = 0,
        "Rows per block of the sampled single pass with shared candidates (0: the recompute pair runs)");
  m.def("empty_cpu_cache", &fusedloss::empty_cpu_cache,
        "Unmap the freed large CPU buffers (gradients, tiles) the pool keeps for later calls");
  m.def("cpu_cache_bytes", &fusedloss::cpu_cache_bytes, "Bytes of freed large CPU buffers the pool keeps");
  m.def("set_cpu_cache_limit", &fusedloss::set_cpu_cache_limit, py::arg("limit"),
        "Keep at most `limit` bytes of freed large CPU buffers (0: none); returns the previous limit");
  using fusedloss::HitMask;
  using fusedloss::SampledMode;
  py::dict modes, hit_masks;
  modes["softmax"] = int64_t(SampledMode::kSoftmax);
  modes["nce"] = int64_t(SampledMode::kNCE);
  hit_masks["none"] = int64_t(HitMask::kNone);
  hit_masks["all_copies"] = int64_t(HitMask::kAllCopies);
  hit_masks["last_copy"] = int64_t(HitMask::kLastCopy);
  m.attr("SAMPLED_MODES") = modes;
  m.attr("HIT_MASKS") = hit_masks;
}
