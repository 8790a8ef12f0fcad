// Large CPU buffers (weight gradients, tiles, accumulators) backed by
// transparent huge pages where the kernel allows them on request
// (/sys/kernel/mm/transparent_hugepage/enabled = madvise or always).
//
// Why: every step returns fresh gradient tensors, and first touching a fresh
// multi-hundred-MiB buffer costs one page fault per 4 KiB page: zero-filling a
// [200000, 256] fp32 gradient takes ≈54 ms on a 2-core VM, ≈11 ms with 2 MiB
// pages, against ≈70 ms for the three GEMMs of the step it belongs to. The
// advice must come before the first touch, so the buffer is allocated here,
// advised, and only then written (by the caller or by zero_()).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fusedloss {

namespace detail {
constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

// Huge-page advice for the 2 MiB-aligned interior of [data, data + bytes).
// Advice only: where huge pages are off (or the range is refused) the buffer
// keeps 4 KiB pages, so the result is ignored.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

inline bool is_large_cpu(const at::TensorOptions& options, size_t bytes) {
  return options.device().is_cpu() && bytes >= 2 * kHugePage;
}

inline size_t bytes_of(at::IntArrayRef sizes, const at::TensorOptions& options) {
  size_t elems = 1;
  for (const int64_t s : sizes) elems *= static_cast<size_t>(s);
  return elems * options.dtype().itemsize();
}
}  // namespace detail

// An uninitialised tensor like at::empty; a large CPU one advised for huge
// pages before anything touches it.
inline at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (detail::is_large_cpu(options, t.nbytes())) detail::advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

// A zero-filled tensor like at::zeros. A large CPU one comes from calloc: a
// fresh mapping is zero already (the kernel clears each page as it is first
// touched), so zero-filling it again would write every byte twice.
inline at::Tensor zeros_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = detail::bytes_of(sizes, options);
  if (!detail::is_large_cpu(options, bytes)) return at::zeros(sizes, options);
  void* data = std::calloc(bytes, 1);
  if (data == nullptr) return at::zeros(sizes, options);  // let the allocator raise its own error
  detail::advise_huge_pages(data, bytes);
  // First touches spread over the threads: the kernel clears each page as it
  // faults in, and the scatters that fill a weight gradient would otherwise
  // fault every page from whichever thread writes it first (≈ 20 ms for
  // 200 MB on one core).
  const int64_t pages = static_cast<int64_t>((bytes + detail::kHugePage - 1) / detail::kHugePage);
  at::parallel_for(0, pages, 1, [&](int64_t begin, int64_t end) {
    for (int64_t page = begin; page < end; ++page) static_cast<volatile char*>(data)[page * detail::kHugePage] = 0;
  });
  return at::from_blob(data, sizes, [](void* p) { std::free(p); }, options);
}

// `t` in `dtype`: itself when it already is, else a copy into an empty_buffer
// (Tensor::to, for the large gradients rounded from their fp32 accumulators).
inline at::Tensor to_buffer(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  return empty_buffer(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

}  // namespace fusedloss
