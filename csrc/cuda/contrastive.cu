// CUDA kernels of the InfoNCE family. The row passes use one thread block per
// row of the [R, tile] block of dot products (coalesced loads, shared-memory
// reductions, as in linear_ce.cu). The column-wise LSE uses blocks of
// 32 columns x 8 row lanes over slices of the rows, writing partial LSE states
// that a second kernel merges in a fixed order: deterministic, no atomics. The
// GEMMs that produce and consume the block run in cuBLAS (csrc/contrastive.cpp).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "block_reduce.cuh"
#include "fusedloss/contrastive.h"
#include "fusedloss/dtypes.h"
#include "launch.cuh"

namespace fusedloss::cuda {

namespace {

constexpr int kColumnsPerBlock = 32;  // one warp across 32 adjacent columns
constexpr int kRowLanes = 8;
constexpr int64_t kRowsPerSlice = 512;  // rows each column block reduces
constexpr int64_t kMaxSlices = 64;

int64_t column_slices(int64_t num_rows) {
  return std::min(kMaxSlices, std::max<int64_t>(1, (num_rows + kRowsPerSlice - 1) / kRowsPerSlice));
}

template <typename acc_t>
__global__ void accumulate_chunk_kernel(ContrastiveParams p, const acc_t* tile, const acc_t* scale,
                                 const int64_t* positives, ContrastiveRowState<acc_t> state) {
  const int64_t row = blockIdx.x;
  const acc_t* y = tile + row * p.logits_stride;
  const acc_t s = *scale;
  const int64_t masked = p.masked_chunk_column(row);
  const int64_t t = positives[row] - p.chunk_start;
  LseState<acc_t> local = LseState<acc_t>::empty();
  for (int64_t j = threadIdx.x; j < p.chunk_columns; j += blockDim.x) {
    const bool out = p.is_excluded(row, j, masked, t);
    const acc_t v = contrastive_logit(y[j], p.scale_of(row, j, t, s), out);
    if (!out) local = lse_merge(local, LseState<acc_t>{v, acc_t(1)});
    if (j == t) state.positive_logit[row] = contrastive_positive_logit(y[j], s, j == masked);
  }
  const LseState<acc_t> chunk = block_allreduce(local, LseMergeOp{});
  if (threadIdx.x == 0) {
    lse_merge_into(state.max[row], state.sum_exp[row], chunk);
  }
}

// Partial column LSE of rows [slice * rows_per_slice, ...) for 32 columns.
template <typename acc_t>
__global__ void column_lse_partial_kernel(ContrastiveParams p, const acc_t* tile, const acc_t* scale,
                                            const int64_t* positives, int64_t rows_per_slice,
                                            LseState<acc_t>* partial) {
  const int64_t col = blockIdx.x * int64_t(kColumnsPerBlock) + threadIdx.x;
  const int64_t row_begin = blockIdx.y * rows_per_slice;
  const int64_t row_end = min(p.num_rows, row_begin + rows_per_slice);
  LseState<acc_t> local = LseState<acc_t>::empty();
  if (col < p.chunk_columns) {
    const acc_t s = *scale;
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRowLanes) {
      const int64_t t = p.ids.any() ? positives[row] - p.chunk_start : -1;  // only the id mask reads it
      if (p.is_excluded(row, col, p.masked_chunk_column(row), t)) continue;
      local = lse_merge(local, LseState<acc_t>{p.scale_of(row, col, t, s) * tile[row * p.logits_stride + col],
                                               acc_t(1)});
    }
  }
  __shared__ LseState<acc_t> lanes[kRowLanes][kColumnsPerBlock];
  lanes[threadIdx.y][threadIdx.x] = local;
  __syncthreads();
  if (threadIdx.y == 0 && col < p.chunk_columns) {
    for (int lane = 1; lane < kRowLanes; ++lane) local = lse_merge(local, lanes[lane][threadIdx.x]);
    partial[blockIdx.y * p.chunk_columns + col] = local;
  }
}

template <typename acc_t>
__global__ void column_lse_merge_kernel(ContrastiveParams p, const LseState<acc_t>* partial, int64_t slices,
                                          LseArray<acc_t> col_lse) {
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (col >= p.chunk_columns) return;
  LseState<acc_t> merged = LseState<acc_t>::empty();
  for (int64_t slice = 0; slice < slices; ++slice) merged = lse_merge(merged, partial[slice * p.chunk_columns + col]);
  col_lse.store(p.chunk_start + col, merged.parts());
}

template <typename acc_t>
__global__ void finalize_kernel(ContrastiveParams p, const int64_t* positives, ContrastiveRowState<acc_t> state,
                                LseArray<const acc_t> col_lse, LseArray<acc_t> row_lse, acc_t* loss) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row < p.num_rows) contrastive_finalize_row(p, row, positives, state, col_lse, row_lse, loss);
}

template <typename acc_t, typename grad_t>
__global__ void chunk_grad_kernel(ContrastiveParams p, const acc_t* tile, const acc_t* scale,
                                 const int64_t* positives, LseArray<const acc_t> row_lse,
                                 LseArray<const acc_t> col_lse, const acc_t* row_grad, const acc_t* col_grad,
                                 grad_t* dlogits, acc_t* scale_grad_rows) {
  const int64_t row = blockIdx.x;
  const acc_t* z = tile + row * p.logits_stride;
  grad_t* dz = dlogits + row * p.dlogits_stride;
  const acc_t s = *scale;
  const LseParts<acc_t> lse = row_lse[row];
  const acc_t g = row_grad[row];
  const int64_t t = positives[row] - p.chunk_start;
  const int64_t masked = p.masked_chunk_column(row);
  // Half-precision dlogits may be written over the fp32 tile (the single
  // pass): element j then lands on the bytes of z[j / 2]. Every pass reads its
  // elements before any thread writes, and j / 2 belongs to this pass or an
  // earlier one, so no element is overwritten before it is read.
  constexpr bool kOverwritesWider = sizeof(grad_t) < sizeof(acc_t);
  const int64_t passes = (p.chunk_columns + blockDim.x - 1) / blockDim.x;
  acc_t scale_grad = 0;  // sum_j dLoss/dlogit_j * dot_j, before rounding
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t j = pass * blockDim.x + threadIdx.x;
    acc_t d = 0;
    if (j < p.chunk_columns && !p.is_excluded(row, j, masked, t)) {
      const acc_t dot = z[j];
      const acc_t x = p.scale_of(row, j, t, s) * dot;  // the logit (id penalty included)
      const int64_t col = p.chunk_start + j;
      const acc_t col_prob = p.symmetric ? exp_acc(col_lse[col].log_prob(x)) : acc_t(0);
      const acc_t col_g = p.symmetric ? col_grad[col] : acc_t(0);
      d = contrastive_logit_grad(exp_acc(lse.log_prob(x)), g, col_prob, col_g, j == t, p.symmetric);
      scale_grad += d * dot;
    }
    if constexpr (kOverwritesWider) __syncthreads();
    // d logits / d dot = scale: the GEMMs consume raw operands.
    if (j < p.chunk_columns) dz[j] = static_cast<grad_t>(s * d);
  }
  if (scale_grad_rows != nullptr) {
    scale_grad = block_allreduce(scale_grad, SumOp{});
    if (threadIdx.x == 0) scale_grad_rows[row] += scale_grad;
  }
}

}  // namespace

int64_t contrastive_column_scratch_elems(int64_t num_rows, int64_t chunk_columns) {
  // Each partial is an LseState (two acc_t).
  return 2 * column_slices(num_rows) * chunk_columns;
}

template <typename acc_t>
void contrastive_accumulate_chunk(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, ContrastiveRowState<acc_t> state, void* stream) {
  launch_row_blocks(accumulate_chunk_kernel<acc_t>, p.num_rows, stream, p, tile, scale, positives, state);
}

template <typename acc_t>
void contrastive_chunk_column_lse(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                              const int64_t* positives, LseArray<acc_t> col_lse, acc_t* scratch, void* stream) {
  if (p.num_rows == 0 || p.chunk_columns == 0) return;
  const int64_t slices = column_slices(p.num_rows);
  const int64_t rows_per_slice = (p.num_rows + slices - 1) / slices;
  auto* partial = reinterpret_cast<LseState<acc_t>*>(scratch);
  const dim3 grid((p.chunk_columns + kColumnsPerBlock - 1) / kColumnsPerBlock, slices);
  const dim3 block(kColumnsPerBlock, kRowLanes);
  column_lse_partial_kernel<acc_t><<<grid, block, 0, as_stream(stream)>>>(p, tile, scale, positives,
                                                                                rows_per_slice, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int threads = 256;
  column_lse_merge_kernel<acc_t><<<(p.chunk_columns + threads - 1) / threads, threads, 0, as_stream(stream)>>>(
      p, partial, slices, col_lse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void contrastive_finalize(const ContrastiveParams& p, const int64_t* positives, ContrastiveRowState<acc_t> state,
                          LseArray<const acc_t> col_lse, LseArray<acc_t> row_lse, acc_t* loss, void* stream) {
  launch_row_threads(finalize_kernel<acc_t>, p.num_rows, stream, p, positives, state, col_lse, row_lse, loss);
}

template <typename acc_t, typename grad_t>
void contrastive_chunk_grad(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, LseArray<const acc_t> row_lse,
                           LseArray<const acc_t> col_lse, const acc_t* row_grad, const acc_t* col_grad,
                           grad_t* dlogits, acc_t* scale_grad_rows, void* stream) {
  launch_row_blocks(chunk_grad_kernel<acc_t, grad_t>, p.num_rows, stream, p, tile, scale, positives, row_lse, col_lse,
                    row_grad, col_grad, dlogits, scale_grad_rows);
}

// Three launches on the stream (fold, finalize, dlogits): each row holds
// every column and is read by one block per kernel; the column statistics of
// the symmetric loss were completed before.
template <typename acc_t, typename grad_t>
void contrastive_single_pass_rows(const ContrastiveParams& p, acc_t* tile, const acc_t* scale,
                                  const int64_t* positives, ContrastiveRowState<acc_t> state,
                                  LseArray<const acc_t> col_lse, LseArray<acc_t> row_lse, acc_t* loss,
                                  const acc_t* row_grad, const acc_t* col_grad, grad_t* dlogits,
                                  acc_t* scale_grad_rows, void* stream) {
  contrastive_accumulate_chunk(p, tile, scale, positives, state, stream);
  contrastive_finalize(p, positives, state, col_lse, row_lse, loss, stream);
  contrastive_chunk_grad(p, tile, scale, positives, LseArray<const acc_t>{row_lse.max, row_lse.log_sum}, col_lse,
                         row_grad, col_grad, dlogits, scale_grad_rows, stream);
}

#define FUSEDLOSS_INSTANTIATE_CONTRASTIVE_STATE(acc_t)                                                    \
  template void contrastive_accumulate_chunk<acc_t>(const ContrastiveParams&, const acc_t*, const acc_t*,         \
                                             const int64_t*, ContrastiveRowState<acc_t>, void*);           \
  template void contrastive_chunk_column_lse<acc_t>(const ContrastiveParams&, const acc_t*, const acc_t*,      \
                                                const int64_t*, LseArray<acc_t>, acc_t*, void*);           \
  template void contrastive_finalize<acc_t>(const ContrastiveParams&, const int64_t*,                      \
                                            ContrastiveRowState<acc_t>, LseArray<const acc_t>,             \
                                            LseArray<acc_t>, acc_t*, void*);
#define FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD(acc_t, grad_t)                                             \
  template void contrastive_chunk_grad<acc_t, grad_t>(const ContrastiveParams&, const acc_t*, const acc_t*, \
                                                     const int64_t*, LseArray<const acc_t>,                \
                                                     LseArray<const acc_t>, const acc_t*, const acc_t*,    \
                                                     grad_t*, acc_t*, void*);                                     \
  template void contrastive_single_pass_rows<acc_t, grad_t>(                                              \
      const ContrastiveParams&, acc_t*, const acc_t*, const int64_t*, ContrastiveRowState<acc_t>,         \
      LseArray<const acc_t>, LseArray<acc_t>, acc_t*, const acc_t*, const acc_t*, grad_t*, acc_t*, void*);
FUSEDLOSS_FOR_ACC_TYPES(FUSEDLOSS_INSTANTIATE_CONTRASTIVE_STATE)
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD)
#undef FUSEDLOSS_INSTANTIATE_CONTRASTIVE_STATE
#undef FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD

}  // namespace fusedloss::cuda
