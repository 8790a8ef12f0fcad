// Launch helpers shared by the CUDA kernels of every family.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "block_reduce.cuh"

namespace fusedloss::cuda {

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// One kRowBlockThreads block per row: the passes over a [rows, columns] tile.
template <typename... KernelArgs, typename... Args>
void launch_row_blocks(void (*kernel)(KernelArgs...), int64_t rows, void* stream, Args&&... args) {
  if (rows == 0) return;
  kernel<<<rows, kRowBlockThreads, 0, as_stream(stream)>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One warp per task, kRowBlockThreads / 32 tasks per block: kernels whose
// unit of work is one warp (a gathered dot product).
template <typename... KernelArgs, typename... Args>
void launch_warp_tasks(void (*kernel)(KernelArgs...), int64_t tasks, void* stream, Args&&... args) {
  if (tasks == 0) return;
  constexpr int64_t kWarpsPerBlock = kRowBlockThreads / 32;
  const int64_t blocks = (tasks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "fusedloss: ", tasks, " warp tasks exceed one CUDA grid");
  kernel<<<blocks, kRowBlockThreads, 0, as_stream(stream)>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One thread per row: the finalize kernels.
template <typename... KernelArgs, typename... Args>
void launch_row_threads(void (*kernel)(KernelArgs...), int64_t rows, void* stream, Args&&... args) {
  if (rows == 0) return;
  constexpr int kThreads = 256;
  kernel<<<(rows + kThreads - 1) / kThreads, kThreads, 0, as_stream(stream)>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fusedloss::cuda
