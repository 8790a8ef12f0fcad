// The one router from a binding layer to a family's CPU or CUDA kernels. Every
// family declares its kernels twice with the same parameters, the CUDA one
// taking the stream last (`<family>.h`); `Backend::run` picks one, so the
// `#ifdef` of a CPU-only build lives here and nowhere else.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <utility>

#ifdef FUSEDLOSS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
// The pair of kernels `name` (template arguments included) for Backend::run.
#define FUSEDLOSS_KERNELS(...) &cpu::__VA_ARGS__, &cuda::__VA_ARGS__
#else
#define FUSEDLOSS_KERNELS(...) &cpu::__VA_ARGS__, nullptr
#endif

namespace fusedloss {

class Backend {
 public:
  explicit Backend(const at::Tensor& on) : cuda_(on.is_cuda()) {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda_) stream_ = at::cuda::getCurrentCUDAStream().stream();
#else
    TORCH_CHECK(!cuda_, "fusedloss was built without CUDA kernels; rebuild with FUSEDLOSS_FORCE_CUDA=1");
#endif
  }

  bool is_cuda() const { return cuda_; }

  // cpu_kernel(args...) or cuda_kernel(args..., stream); pass FUSEDLOSS_KERNELS(name).
  template <typename CpuKernel, typename CudaKernel, typename... Args>
  void run(CpuKernel cpu_kernel, [[maybe_unused]] CudaKernel cuda_kernel, Args&&... args) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda_) {
      cuda_kernel(std::forward<Args>(args)..., stream_);
      return;
    }
#endif
    cpu_kernel(std::forward<Args>(args)...);
  }

 private:
  bool cuda_;
  void* stream_ = nullptr;
};

// Calls fn(pointer) with `dlogits`' data typed as its dtype: the accumulation
// type, or (fp32 accumulation) bf16/fp16 when the GEMMs that consume the
// dlogits read half-precision operands.
template <typename acc_t, typename Fn>
void with_typed_data(const at::Tensor& dlogits, Fn&& fn) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (dlogits.scalar_type() == at::kBFloat16) return fn(dlogits.data_ptr<at::BFloat16>());
    if (dlogits.scalar_type() == at::kHalf) return fn(dlogits.data_ptr<at::Half>());
  }
  fn(dlogits.data_ptr<acc_t>());
}

}  // namespace fusedloss
