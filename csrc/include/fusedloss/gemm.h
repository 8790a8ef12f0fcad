// GEMM helper shared by every loss driver: out (+)= a @ b with out possibly in
// a wider dtype than the operands (bf16/fp16 operands, fp32 accumulator), which
// is how every chunked loss keeps its logits and its accumulators in fp32 while
// the tensor cores read half-precision inputs.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "fusedloss/numerics.h"

namespace fusedloss {

// out = a @ b (accumulate=false) or out += a @ b (accumulate=true). `out` may be
// a view (e.g. a row slice of a gradient); a and b may be transposed views.
inline void matmul_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool same_dtype = a.scalar_type() == out.scalar_type();
  if (same_dtype || out.is_cuda()) {
    if (accumulate) {
      if (same_dtype) at::addmm_out(out, out, a, b);
      else at::addmm_out(out, out, a, b, out.scalar_type());
    } else {
      if (same_dtype) at::mm_out(out, a, b);
      else at::mm_out(out, a, b, out.scalar_type());
    }
    return;
  }
  // CPU with mixed dtypes: the CPU BLAS has no bf16->fp32 GEMM, so compute in
  // the wider dtype (fp32 accumulators from bf16 operands, or a bf16 result
  // of fp32 operands rounded once) and let the caller pay the conversion.
  const at::ScalarType wide = at::promote_types(a.scalar_type(), out.scalar_type());
  const at::Tensor product = at::mm(a.to(wide), b.to(wide));
  if (accumulate) out.add_(product);
  else out.copy_(product);
}

// `input` [rows, D] with the rows where `skip` [rows] is true zeroed: rows that
// must add nothing to a gradient (ignored targets, zero upstream gradient) then
// add exactly nothing to the GEMMs they feed even when they hold inf/NaN
// padding (0 * inf is NaN). A copy only when some row is skipped (on CUDA
// always: asking would cost a host sync).
inline at::Tensor zero_rows_where(const at::Tensor& input, const at::Tensor& skip) {
  if (input.is_cpu() && !skip.any().item<bool>()) return input;
  return input.masked_fill(skip.unsqueeze(1), 0);
}

// The LseParts stored in a [2, count] tensor (max, log-sum), from index `first`
// on; T = const acc_t for reading.
template <typename T>
LseArray<T> lse_array_at(const at::Tensor& lse, int64_t first = 0) {
  using acc_t = std::remove_const_t<T>;
  return {lse[0].data_ptr<acc_t>() + first, lse[1].data_ptr<acc_t>() + first};
}

// Accumulation dtype of a floating input: float64 stays float64 (gradcheck),
// everything else accumulates in float32.
inline at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// dtype in which the GEMM operands are fed: on CUDA the input's own dtype (tensor
// cores for bf16/fp16); on the CPU the accumulation dtype, converted once.
// FUSEDLOSS_CPU_HALF_OPERANDS=1 makes the CPU feed half-precision inputs as they
// are, like CUDA: slow, but it lets the CPU tests run the CUDA paths' exact
// orchestration (half-precision dlogits written over the fp32 tile).
inline at::ScalarType gemm_operand_dtype(const at::Tensor& t) {
  static const bool cpu_half_operands = [] {
    const char* flag = std::getenv("FUSEDLOSS_CPU_HALF_OPERANDS");
    return flag != nullptr && std::string(flag) == "1";
  }();
  return t.is_cuda() || cpu_half_operands ? t.scalar_type() : accumulation_dtype(t.scalar_type());
}

// Columns per vocabulary/candidate chunk so that a [rows, chunk] fp32 tile (plus
// a half-precision copy) stays within a fixed workspace budget. The budget is
// larger on GPUs, where bigger GEMMs run closer to peak.
inline int64_t chunk_columns_for(int64_t rows, int64_t columns, int64_t requested, bool cuda) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(columns, 1));
  const int64_t budget_bytes = cuda ? (int64_t(512) << 20) : (int64_t(32) << 20);
  const int64_t bytes_per_column = std::max<int64_t>(rows, 1) * 6;
  int64_t chunk = budget_bytes / bytes_per_column;
  chunk = std::max<int64_t>(128, chunk / 128 * 128);
  return std::min(chunk, std::max<int64_t>(columns, 1));
}

}  // namespace fusedloss
