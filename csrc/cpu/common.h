// Helpers shared by the CPU kernels of every family.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fusedloss::cpu {

// Rows per parallel task: enough work per task to amortise scheduling.
inline int64_t row_grain(int64_t work_per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(work_per_row, 1)); }

// finalize_row(row) for every row, in parallel: the finalize kernels.
template <typename F>
void for_each_row(int64_t rows, const F& finalize_row) {
  at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) finalize_row(row);
  });
}

// f(std::true_type{}) when `flag`, else f(std::false_type{}): a loop that
// tests a loop-invariant condition per element (a null pointer, an option)
// stays scalar in GCC, one instantiated per value of the flag vectorises.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace fusedloss::cpu
