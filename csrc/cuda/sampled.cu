// CUDA kernels of sampled softmax / NCE. The row-wise gathered dot (a warp
// per (row, column) pair, lanes over D in 16-byte loads) and axpy (a block per
// row, threads over D) serve the true columns and per-row candidates; the column kernels walk one
// row of the [N, chunk] logits tile like the linear cross-entropy kernels. The
// shared-candidate GEMMs run in cuBLAS (csrc/sampled.cpp).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "block_reduce.cuh"
#include "fusedloss/sampled.h"
#include "fusedloss/dtypes.h"
#include "launch.cuh"

namespace fusedloss::cuda {

namespace {

constexpr int kWarpSize = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// 16 bytes of consecutive in_t, loaded by one instruction.
template <typename in_t>
struct alignas(16) Pack16 {
  static constexpr int kCount = 16 / sizeof(in_t);
  in_t v[kCount];
};

// One warp's dot product of a and b over `dim` elements, complete in every
// lane: 16-byte loads when both rows allow them (dim a multiple of the pack,
// 16-byte aligned starts), else one element per lane and step.
template <typename in_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const in_t* a, const in_t* b, int64_t dim, int lane) {
  using Pack = Pack16<in_t>;
  acc_t s = 0;
  const bool packed = dim % Pack::kCount == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(b) % 16 == 0;
  if (packed) {
    const Pack* pa = reinterpret_cast<const Pack*>(a);
    const Pack* pb = reinterpret_cast<const Pack*>(b);
    for (int64_t v = lane; v < dim / Pack::kCount; v += kWarpSize) {
      const Pack x = pa[v], y = pb[v];
#pragma unroll
      for (int k = 0; k < Pack::kCount; ++k) s += static_cast<acc_t>(x.v[k]) * static_cast<acc_t>(y.v[k]);
    }
  } else {
    for (int64_t d = lane; d < dim; d += kWarpSize) s += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  return warp_sum(s);
}

// out[row, j] = x[row] . w[ids[row, j]]: one warp per (row, column) pair over
// the whole grid, so that a block's warps all work even when a row has one
// column (the true class).
template <typename in_t, typename acc_t>
__global__ void row_dot_kernel(SampledParams p, const in_t* x, const in_t* w, const int64_t* ids, int64_t id_row_stride,
                               int64_t columns, acc_t* out, int64_t out_stride) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (pair >= p.num_rows * columns) return;  // the whole warp: `pair` is the same in every lane
  const int64_t row = pair / columns, j = pair % columns;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t id = ids[row * id_row_stride + j];
  if (!sampled_id_valid(p, id)) {  // poisoned, never read (see sampled_id_valid)
    if (lane == 0) out[row * out_stride + j] = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  const acc_t s = warp_dot<in_t, acc_t>(x + row * p.dim, w + id * p.dim, p.dim, lane);
  if (lane == 0) out[row * out_stride + j] = s;
}

template <typename in_t, typename acc_t>
__global__ void row_axpy_kernel(SampledParams p, const acc_t* dz, int64_t dz_stride, const in_t* w,
                                const int64_t* ids, int64_t id_row_stride, int64_t columns, acc_t* dx) {
  const int64_t row = blockIdx.x;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t j = 0; j < columns; ++j) {
      const acc_t g = dz[row * dz_stride + j];
      if (g == acc_t(0)) continue;
      const int64_t id = ids[row * id_row_stride + j];
      acc += sampled_id_valid(p, id) ? g * static_cast<acc_t>(w[id * p.dim + d])
                                     : std::numeric_limits<acc_t>::quiet_NaN();
    }
    dx[row * p.dim + d] += acc;
  }
}

template <typename acc_t>
__global__ void accumulate_chunk_kernel(SampledParams p, SampledColumns<acc_t> cols, const acc_t* logits,
                                        SampledRowState<acc_t> state) {
  const int64_t row = blockIdx.x;
  const acc_t* y = logits + row * p.logits_stride;
  const bool nce = p.mode == static_cast<int64_t>(SampledMode::kNCE);
  LseState<acc_t> local = LseState<acc_t>::empty();
  acc_t sum = 0, unmasked = 0, nce_sum = 0;
  for (int64_t j = threadIdx.x; j < p.chunk_columns; j += blockDim.x) {
    if (sampled_column_masked(p, cols, row, j)) continue;
    const acc_t z = sampled_column_logit(p, cols, row, j, y[j]);
    // The CPU kernels mark masked columns with -inf, so a logit that is -inf
    // itself (a -inf bias) is skipped there; skip it here too (NCE would
    // otherwise compute 0 * -inf = NaN, softmax count it in M and sum_logits).
    if (z == neg_infinity<acc_t>()) continue;
    if (nce) {
      nce_sum += sampled_nce_term(p, z);
    } else {
      local = lse_merge(local, LseState<acc_t>{z, acc_t(1)});
      sum += z;
      unmasked += 1;
    }
  }
  if (nce) {
    const acc_t chunk_nce = block_allreduce(nce_sum, SumOp{});
    if (threadIdx.x == 0) state.nce_loss[row] += chunk_nce;
    return;
  }
  const LseState<acc_t> chunk = block_allreduce(local, LseMergeOp{});
  const acc_t chunk_sum = block_allreduce(sum, SumOp{});
  const acc_t chunk_unmasked = block_allreduce(unmasked, SumOp{});
  if (threadIdx.x == 0) {
    lse_merge_into(state.max[row], state.sum_exp[row], chunk);
    state.sum_logits[row] += chunk_sum;
    state.columns[row] += chunk_unmasked;
    if (p.is_true_chunk) state.true_sum[row] += chunk_sum;
  }
}

template <typename acc_t>
__global__ void finalize_kernel(SampledParams p, SampledRowState<acc_t> state, acc_t* loss, acc_t* stats) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row < p.num_rows) sampled_finalize_row(p, row, state, loss, stats);
}

template <typename acc_t, typename grad_t>
__global__ void chunk_grad_kernel(SampledParams p, SampledColumns<acc_t> cols, const acc_t* logits,
                                  const acc_t* stats, const acc_t* grad_loss, grad_t* dlogits) {
  const int64_t row = blockIdx.x;
  const acc_t* z = logits + row * p.logits_stride;
  grad_t* dz = dlogits + row * p.logits_stride;
  const acc_t g = grad_loss[row];
  const LseParts<acc_t> lse = sampled_row_lse(p, stats, row);
  const acc_t unmasked = sampled_row_columns(p, stats, row);
  for (int64_t j = threadIdx.x; j < p.chunk_columns; j += blockDim.x) {
    const acc_t y = sampled_column_logit(p, cols, row, j, z[j]);
    // -inf logits count as masked, as in the forward and the CPU kernels; a
    // row with zero upstream gradient is skipped (its logits may be inf/NaN).
    const bool masked = g == acc_t(0) || sampled_column_masked(p, cols, row, j) || y == neg_infinity<acc_t>();
    dz[j] = masked ? grad_t(0) : static_cast<grad_t>(g * sampled_column_grad(p, y, lse, unmasked, ExpAcc{}));
  }
}

template <typename acc_t>
__global__ void scatter_outer_kernel(const acc_t* dz, const acc_t* x, const int64_t* index, int64_t columns,
                                     int64_t dim, acc_t* dst) {
  const int64_t row = blockIdx.x;
  const acc_t* dz_row = dz + row * columns;
  const acc_t* x_row = x + row * dim;
  for (int64_t j = 0; j < columns; ++j) {
    const acc_t g = dz_row[j];
    if (g == acc_t(0)) continue;  // masked columns and zero upstream rows (uniform across the block)
    acc_t* out = dst + index[row * columns + j] * dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) atomicAdd(out + d, g * x_row[d]);
  }
}

}  // namespace

template <typename acc_t>
void sampled_scatter_outer(const acc_t* dz, const acc_t* x, const int64_t* index, int64_t rows, int64_t columns,
                           int64_t dim, acc_t* dst, void* stream) {
  launch_row_blocks(scatter_outer_kernel<acc_t>, rows, stream, dz, x, index, columns, dim, dst);
}

template <typename in_t, typename acc_t>
void sampled_row_dot(const SampledParams& p, const in_t* x, const in_t* w, const int64_t* ids, int64_t id_row_stride,
                     int64_t columns, acc_t* out, int64_t out_stride, void* stream) {
  launch_warp_tasks(row_dot_kernel<in_t, acc_t>, p.num_rows * columns, stream, p, x, w, ids, id_row_stride, columns,
                    out, out_stride);
}

template <typename in_t, typename acc_t>
void sampled_row_axpy(const SampledParams& p, const acc_t* dz, int64_t dz_stride, const in_t* w, const int64_t* ids,
                      int64_t id_row_stride, int64_t columns, acc_t* dx, void* stream) {
  launch_row_blocks(row_axpy_kernel<in_t, acc_t>, p.num_rows, stream, p, dz, dz_stride, w, ids, id_row_stride,
                    columns, dx);
}

template <typename acc_t>
void sampled_accumulate_chunk(const SampledParams& p, const SampledColumns<acc_t>& cols, acc_t* logits,
                              SampledRowState<acc_t> state, void* stream) {
  launch_row_blocks(accumulate_chunk_kernel<acc_t>, p.num_rows, stream, p, cols, logits, state);
}

template <typename acc_t>
void sampled_finalize(const SampledParams& p, SampledRowState<acc_t> state, acc_t* loss, acc_t* stats,
                      void* stream) {
  launch_row_threads(finalize_kernel<acc_t>, p.num_rows, stream, p, state, loss, stats);
}

template <typename acc_t, typename grad_t>
void sampled_chunk_grad(const SampledParams& p, const SampledColumns<acc_t>& cols, const acc_t* logits,
                        const acc_t* stats, const acc_t* grad_loss, grad_t* dlogits, void* stream) {
  launch_row_blocks(chunk_grad_kernel<acc_t, grad_t>, p.num_rows, stream, p, cols, logits, stats, grad_loss,
                    dlogits);
}

// Five launches on the stream (fold the true columns and the candidates,
// finalize, then each part's dlogits in place): each row is read by one block
// per kernel. The tile keeps the raw logits until the dlogits overwrite them.
template <typename acc_t>
void sampled_single_pass_rows(const SampledParams& p, const SampledColumns<acc_t>& true_cols,
                              const SampledColumns<acc_t>& candidate_cols, int64_t candidate_offset, acc_t* tile,
                              SampledRowState<acc_t> state,
                              acc_t* loss, acc_t* stats, const acc_t* grad_loss, void* stream) {
  const SampledParams true_part = sampled_true_part(p), candidate_part = sampled_candidate_part(p);
  acc_t* candidates = tile + candidate_offset;
  sampled_accumulate_chunk(true_part, true_cols, tile, state, stream);
  sampled_accumulate_chunk(candidate_part, candidate_cols, candidates, state, stream);
  sampled_finalize(p, state, loss, stats, stream);
  sampled_chunk_grad(true_part, true_cols, tile, stats, grad_loss, tile, stream);
  sampled_chunk_grad(candidate_part, candidate_cols, candidates, stats, grad_loss, candidates, stream);
}

#define FUSEDLOSS_INSTANTIATE_SAMPLED_ROW(in_t, acc_t)                                                             \
  template void sampled_row_dot<in_t, acc_t>(const SampledParams&, const in_t*, const in_t*, const int64_t*,        \
                                             int64_t, int64_t, acc_t*, int64_t, void*);                             \
  template void sampled_row_axpy<in_t, acc_t>(const SampledParams&, const acc_t*, int64_t, const in_t*,             \
                                              const int64_t*, int64_t, int64_t, acc_t*, void*);
#define FUSEDLOSS_INSTANTIATE_SAMPLED_COLUMNS(acc_t)                                                               \
  template void sampled_accumulate_chunk<acc_t>(const SampledParams&, const SampledColumns<acc_t>&, acc_t*,        \
                                                SampledRowState<acc_t>, void*);                                    \
  template void sampled_finalize<acc_t>(const SampledParams&, SampledRowState<acc_t>, acc_t*, acc_t*, void*);   \
  template void sampled_single_pass_rows<acc_t>(const SampledParams&, const SampledColumns<acc_t>&,               \
                                                const SampledColumns<acc_t>&, int64_t, acc_t*,                    \
                                                SampledRowState<acc_t>,                                           \
                                                acc_t*, acc_t*, const acc_t*, void*);                             \
  template void sampled_scatter_outer<acc_t>(const acc_t*, const acc_t*, const int64_t*, int64_t, int64_t,         \
                                             int64_t, acc_t*, void*);
#define FUSEDLOSS_INSTANTIATE_SAMPLED_GRAD(acc_t, grad_t)                                                          \
  template void sampled_chunk_grad<acc_t, grad_t>(const SampledParams&, const SampledColumns<acc_t>&, const acc_t*, \
                                                  const acc_t*, const acc_t*, grad_t*, void*);
FUSEDLOSS_FOR_INPUT_TYPES(FUSEDLOSS_INSTANTIATE_SAMPLED_ROW)
FUSEDLOSS_FOR_ACC_TYPES(FUSEDLOSS_INSTANTIATE_SAMPLED_COLUMNS)
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_SAMPLED_GRAD)
#undef FUSEDLOSS_INSTANTIATE_SAMPLED_ROW
#undef FUSEDLOSS_INSTANTIATE_SAMPLED_COLUMNS
#undef FUSEDLOSS_INSTANTIATE_SAMPLED_GRAD

}  // namespace fusedloss::cuda
