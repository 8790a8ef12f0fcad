// Large CPU buffers (weight gradients, tiles, accumulators): 2 MiB-aligned
// anonymous mappings advised for transparent huge pages (honoured where
// /sys/kernel/mm/transparent_hugepage/enabled is madvise or always), recycled
// through a process-wide pool when the tensors holding them are freed.
//
// Why: every step returns fresh gradient tensors and forms fresh tiles. First
// touching a fresh [200000, 256] fp32 gradient costs ≈54 ms of page faults
// with 4 KiB pages and ≈11 ms with 2 MiB pages on a 2-core VM (the kernel
// clears every page), against ≈70 ms for the three GEMMs of the step it
// belongs to; clearing a recycled one with memset takes ≈3 ms. A training
// loop frees its gradients every step (zero_grad), so the next step's
// buffers of the same sizes come back from the pool. The pool holds at most
// `limit` bytes of freed buffers (1 GiB by default; set_cpu_cache_limit), and
// empty_cpu_cache() unmaps them, like torch.cuda.empty_cache().
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fusedloss {

namespace detail {
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kDefaultCpuCacheLimit = size_t(1) << 30;

// A 2 MiB-aligned anonymous mapping of `bytes` (a multiple of 2 MiB).
struct Mapping {
  void* data = nullptr;
  size_t bytes = 0;
};

inline size_t round_to_huge_pages(size_t bytes) { return (bytes + kHugePage - 1) & ~(kHugePage - 1); }

#ifdef __linux__
// A fresh mapping (zero: the kernel clears each page as it is first touched),
// aligned by trimming an over-sized one, and advised before any touch.
inline Mapping map_fresh(size_t bytes) {
  const size_t length = round_to_huge_pages(bytes);
  void* raw = mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return {};
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  if (aligned > begin) munmap(raw, aligned - begin);
  const uintptr_t tail = aligned + length, end = begin + length + kHugePage;
  if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
#ifdef MADV_HUGEPAGE
  (void)madvise(reinterpret_cast<void*>(aligned), length, MADV_HUGEPAGE);  // advice: refused means 4 KiB pages
#endif
  return {reinterpret_cast<void*>(aligned), length};
}

inline void unmap(const Mapping& m) { munmap(m.data, m.bytes); }
#endif

// Freed mappings, kept for the next buffer of (nearly) the same size.
class CpuBufferPool {
 public:
  // Never destroyed: tensors freed after static destruction still return here.
  static CpuBufferPool& instance() {
    static auto* pool = new CpuBufferPool;
    return *pool;
  }

#ifdef __linux__
  // The smallest kept mapping of at least `bytes` and at most twice that
  // (`recycled`: its contents are stale), else a fresh one (zero).
  Mapping acquire(size_t bytes, bool& recycled) {
    const size_t length = round_to_huge_pages(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t b = free_[i].bytes;
        if (b >= length && b <= 2 * length && (best == free_.size() || b < free_[best].bytes)) best = i;
      }
      if (best != free_.size()) {
        const Mapping m = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= m.bytes;
        recycled = true;
        return m;
      }
    }
    recycled = false;
    return map_fresh(length);
  }

  // Keeps `m` (evicting the oldest kept mappings beyond the limit), or
  // unmaps it when it alone exceeds the limit.
  void release(const Mapping& m) {
    std::vector<Mapping> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (m.bytes > limit_) {
        evicted.push_back(m);
      } else {
        free_.push_back(m);
        cached_ += m.bytes;
        evict_beyond(limit_, evicted);
      }
    }
    for (const Mapping& e : evicted) unmap(e);  // outside the lock: munmap is slow
  }
#endif

  // Sets the limit on kept bytes, unmapping what exceeds it; returns the old one.
  size_t set_limit(size_t limit) {
    std::vector<Mapping> evicted;
    size_t old;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      old = limit_;
      limit_ = limit;
      evict_beyond(limit_, evicted);
    }
    unmap_all(evicted);
    return old;
  }

  void clear() {
    std::vector<Mapping> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_beyond(0, evicted);
    }
    unmap_all(evicted);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  // Moves the oldest kept mappings to `evicted` until at most `limit` bytes stay.
  void evict_beyond(size_t limit, std::vector<Mapping>& evicted) {
    size_t drop = 0;
    while (cached_ > limit && drop < free_.size()) {
      cached_ -= free_[drop].bytes;
      evicted.push_back(free_[drop++]);
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
  }

  static void unmap_all(const std::vector<Mapping>& mappings) {
#ifdef __linux__
    for (const Mapping& m : mappings) unmap(m);
#else
    (void)mappings;
#endif
  }

  std::mutex mutex_;
  std::vector<Mapping> free_;  // oldest first
  size_t cached_ = 0;
  size_t limit_ = kDefaultCpuCacheLimit;
};

inline bool is_large_cpu(const at::TensorOptions& options, size_t bytes) {
  return options.device().is_cpu() && bytes >= 2 * kHugePage;
}

inline size_t bytes_of(at::IntArrayRef sizes, const at::TensorOptions& options) {
  size_t elems = 1;
  for (const int64_t s : sizes) elems *= static_cast<size_t>(s);
  return elems * options.dtype().itemsize();
}

// body(first, length) over [data, data + bytes) split at 2 MiB boundaries
// into one contiguous span per thread (memset takes its non-temporal path
// only for spans this large).
template <typename F>
void parallel_spans(void* data, size_t bytes, const F& body) {
  char* base = static_cast<char*>(data);
  const int64_t pages = static_cast<int64_t>((bytes + kHugePage - 1) / kHugePage);
  at::parallel_for(0, pages, 1, [&](int64_t begin, int64_t end) {
    const size_t first = static_cast<size_t>(begin) * kHugePage;
    body(base + first, std::min(static_cast<size_t>(end) * kHugePage, bytes) - first);
  });
}

// A large CPU tensor on a pooled mapping, zero-filled when `zero`; null when
// no mapping could be made (the caller then asks ATen, which raises its own
// out-of-memory error).
inline at::Tensor pooled_tensor(at::IntArrayRef sizes, const at::TensorOptions& options, size_t bytes, bool zero) {
#ifdef __linux__
  bool recycled = false;
  const Mapping m = CpuBufferPool::instance().acquire(bytes, recycled);
  if (m.data == nullptr) return at::Tensor();
  if (zero && recycled) {
    parallel_spans(m.data, bytes, [](char* p, size_t n) { std::memset(p, 0, n); });
  } else if (zero) {
    // Already zero; its first touches spread over the threads, since the
    // kernel clears each page as it faults in and the scatters that fill a
    // weight gradient would otherwise fault every page from one thread.
    parallel_spans(m.data, bytes, [](char* p, size_t n) {
      for (size_t page = 0; page < n; page += kHugePage) static_cast<volatile char*>(p)[page] = 0;
    });
  }
  return at::from_blob(m.data, sizes, [m](void*) { CpuBufferPool::instance().release(m); }, options);
#else
  (void)sizes, (void)options, (void)bytes, (void)zero;
  return at::Tensor();
#endif
}
}  // namespace detail

// An uninitialised tensor like at::empty; a large CPU one from the pool.
inline at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = detail::bytes_of(sizes, options);
  if (detail::is_large_cpu(options, bytes)) {
    at::Tensor t = detail::pooled_tensor(sizes, options, bytes, /*zero=*/false);
    if (t.defined()) return t;
  }
  return at::empty(sizes, options);
}

// A zero-filled tensor like at::zeros; a large CPU one from the pool (a fresh
// mapping is zero already, so only a recycled one is cleared).
inline at::Tensor zeros_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = detail::bytes_of(sizes, options);
  if (detail::is_large_cpu(options, bytes)) {
    at::Tensor t = detail::pooled_tensor(sizes, options, bytes, /*zero=*/true);
    if (t.defined()) return t;
  }
  return at::zeros(sizes, options);
}

// `t` in `dtype`: itself when it already is, else a copy into an empty_buffer
// (Tensor::to, for the large gradients rounded from their fp32 accumulators).
inline at::Tensor to_buffer(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  return empty_buffer(t.sizes(), t.options().dtype(dtype)).copy_(t);
}

// The bytes of freed buffers the pool keeps; empty_cpu_cache() unmaps them.
inline size_t cpu_cache_bytes() { return detail::CpuBufferPool::instance().cached_bytes(); }
inline void empty_cpu_cache() { detail::CpuBufferPool::instance().clear(); }
inline size_t set_cpu_cache_limit(size_t limit) { return detail::CpuBufferPool::instance().set_limit(limit); }

}  // namespace fusedloss
