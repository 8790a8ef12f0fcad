// The Python module fusedloss._C. Importing it runs the TORCH_LIBRARY
// registrations of every op (csrc/*.cpp); the pybind11 functions here are only
// non-tensor helpers (build information).
#include <torch/extension.h>

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
}
