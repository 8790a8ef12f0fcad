// CUDA kernels of the fused linear cross-entropy. One thread block per row of
// the [N, chunk] logits tile (a chunk has thousands of columns, so a block per
// row keeps every load coalesced and the reductions in shared memory). The
// GEMMs that produce and consume the tile run in cuBLAS (csrc/linear_ce.cpp).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

#include "block_reduce.cuh"
#include "fusedloss/linear_ce.h"
#include "fusedloss/dtypes.h"
#include "launch.cuh"

namespace fusedloss::cuda {

namespace {

struct MergeStatesOp {
  template <typename acc_t>
  __device__ __forceinline__ LseState<acc_t> operator()(LseState<acc_t> a, LseState<acc_t> b) const {
    return lse_merge(a, b);
  }
  template <typename acc_t>
  __device__ __forceinline__ SoftmaxStats<acc_t> operator()(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b) const {
    return softmax_stats_merge(a, b);
  }
};

// kStats (p.with_stats) also reduces the entropy term and the argmax: the
// plain LSE kernel is a separate instantiation, untouched by them.
template <bool kStats, typename acc_t>
__global__ void accumulate_chunk_kernel(LinearCEParams p, acc_t* logits, const acc_t* bias,
                                        ClassWeights<acc_t> class_weight, const int64_t* target,
                                        LinearCERowState<acc_t> state) {
  using State = std::conditional_t<kStats, SoftmaxStats<acc_t>, LseState<acc_t>>;
  const int64_t row = blockIdx.x;
  acc_t* y = logits + row * p.logits_stride;
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const int64_t t = target[row] - p.chunk_start;
  const acc_t* column_weight = class_weight.columns(p.chunk_start);

  State local{neg_infinity<acc_t>()};
  acc_t local_sum = 0;
  for (int64_t j = threadIdx.x; j < p.chunk_columns; j += blockDim.x) {
    const acc_t v = softcap_apply(y[j] + (bias ? bias[j] : acc_t(0)), cap);
    if (p.tile_transformed) y[j] = v;
    if constexpr (kStats) {
      local = softmax_stats_merge(local, State{v, acc_t(1), acc_t(0), p.chunk_start + j});
    } else {
      local = lse_merge(local, State{v, acc_t(1)});
    }
    local_sum += column_weight ? column_weight[j] * v : v;
    if (j == t) state.target_logit[row] = v;
  }
  const State chunk = block_allreduce(local, MergeStatesOp{});
  const acc_t chunk_sum = block_allreduce(local_sum, SumOp{});
  if (threadIdx.x == 0) {
    if constexpr (kStats) {
      state.store_stats(row, softmax_stats_merge(state.stats(row), chunk));
    } else {
      lse_merge_into(state.max[row], state.sum_exp[row], chunk);
    }
    state.sum_logits[row] += chunk_sum;
  }
}

template <typename acc_t>
__global__ void finalize_kernel(LinearCEParams p, const int64_t* target, ClassWeights<acc_t> class_weight,
                                LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row < p.num_rows) linear_ce_finalize_row(p, row, target, class_weight, state, lse, loss);
}

template <typename acc_t, typename grad_t>
__global__ void chunk_grad_kernel(LinearCEParams p, const acc_t* logits, const acc_t* bias,
                                  ClassWeights<acc_t> class_weight, const int64_t* target,
                                  LseArray<const acc_t> lse, const acc_t* grad_loss, grad_t* dlogits) {
  const int64_t row = blockIdx.x;
  const acc_t* z = logits + row * p.logits_stride;
  grad_t* dz = dlogits + row * p.dlogits_stride;
  if (target[row] == p.ignore_index) {
    // Skipped, not multiplied by 0: a padding row may hold inf/NaN.
    for (int64_t j = threadIdx.x; j < p.chunk_columns; j += blockDim.x) dz[j] = grad_t(0);
    return;
  }
  const acc_t g = linear_ce_target_valid(p, target[row]) ? grad_loss[row] : std::numeric_limits<acc_t>::quiet_NaN();
  const LseParts<acc_t> row_lse = lse[row];
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const CrossEntropyTerms<acc_t> terms = linear_ce_terms(p, class_weight, target[row]);
  const acc_t* column_weight = linear_ce_smoothing_weights(p, class_weight);
  const int64_t t = target[row] - p.chunk_start;
  const acc_t* column_bias = p.tile_transformed ? nullptr : bias;
  const acc_t tile_cap = p.tile_transformed ? acc_t(0) : cap;
  // Half-precision dlogits may be written over the fp32 tile (the single
  // pass): element j then lands on the bytes of z[j / 2]. Every pass reads its
  // elements before any thread writes, and j / 2 belongs to this pass or an
  // earlier one, so no element is overwritten before it is read.
  constexpr bool kOverwritesWider = sizeof(grad_t) < sizeof(acc_t);
  const int64_t passes = (p.chunk_columns + blockDim.x - 1) / blockDim.x;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t j = pass * blockDim.x + threadIdx.x;
    acc_t d = 0;
    if (j < p.chunk_columns) {
      const acc_t y = softcap_apply(z[j] + (column_bias ? column_bias[j] : acc_t(0)), tile_cap);
      d = g * terms.logit_grad(exp_acc(row_lse.log_prob(y)), j == t, row_lse.value(),
                               column_weight ? column_weight[j] : acc_t(1)) *
          softcap_grad_from_output(y, cap);
    }
    if constexpr (kOverwritesWider) __syncthreads();
    if (j < p.chunk_columns) dz[j] = static_cast<grad_t>(d);
  }
}

}  // namespace

template <typename acc_t>
void linear_ce_accumulate_chunk(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state, void* stream) {
  if (p.with_stats) {
    launch_row_blocks(accumulate_chunk_kernel<true, acc_t>, p.num_rows, stream, p, logits, bias, class_weight,
                      target, state);
  } else {
    launch_row_blocks(accumulate_chunk_kernel<false, acc_t>, p.num_rows, stream, p, logits, bias, class_weight,
                      target, state);
  }
}

template <typename acc_t>
void linear_ce_finalize(const LinearCEParams& p, const int64_t* target, ClassWeights<acc_t> class_weight,
                        LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss, void* stream) {
  launch_row_threads(finalize_kernel<acc_t>, p.num_rows, stream, p, target, class_weight, state, lse, loss);
}

template <typename acc_t, typename grad_t>
void linear_ce_chunk_grad(const LinearCEParams& p, const acc_t* logits, const acc_t* bias,
                          ClassWeights<acc_t> class_weight, const int64_t* target, LseArray<const acc_t> lse,
                          const acc_t* grad_loss, grad_t* dlogits, void* stream) {
  launch_row_blocks(chunk_grad_kernel<acc_t, grad_t>, p.num_rows, stream, p, logits, bias, class_weight, target,
                    lse, grad_loss, dlogits);
}

// Three launches on the stream (fold, finalize, dlogits): each row is a whole
// vocabulary, read by one block per kernel.
template <typename acc_t, typename grad_t>
void linear_ce_single_pass_rows(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss,
                                const acc_t* grad_loss, grad_t* dlogits, void* stream) {
  LinearCEParams transformed = p;
  transformed.tile_transformed = true;  // the fold leaves softcap(logit + bias) in the tile
  linear_ce_accumulate_chunk(transformed, logits, bias, class_weight, target, state, stream);
  linear_ce_finalize(p, target, class_weight, state, lse, loss, stream);
  linear_ce_chunk_grad(transformed, logits, bias, class_weight, target,
                       LseArray<const acc_t>{lse.max, lse.log_sum}, grad_loss, dlogits, stream);
}

#define FUSEDLOSS_INSTANTIATE_ROW_STATE(acc_t)                                                      \
  template void linear_ce_accumulate_chunk<acc_t>(const LinearCEParams&, acc_t*, const acc_t*,       \
                                                  ClassWeights<acc_t>, const int64_t*,               \
                                                  LinearCERowState<acc_t>, void*);                   \
  template void linear_ce_finalize<acc_t>(const LinearCEParams&, const int64_t*, ClassWeights<acc_t>, \
                                          LinearCERowState<acc_t>, LseArray<acc_t>, acc_t*, void*);
#define FUSEDLOSS_INSTANTIATE_CHUNK_GRAD(acc_t, grad_t)                                              \
  template void linear_ce_chunk_grad<acc_t, grad_t>(const LinearCEParams&, const acc_t*,             \
                                                    const acc_t*, ClassWeights<acc_t>,               \
                                                    const int64_t*, LseArray<const acc_t>,           \
                                                    const acc_t*, grad_t*, void*);                   \
  template void linear_ce_single_pass_rows<acc_t, grad_t>(                                           \
      const LinearCEParams&, acc_t*, const acc_t*, ClassWeights<acc_t>, const int64_t*,              \
      LinearCERowState<acc_t>, LseArray<acc_t>, acc_t*, const acc_t*, grad_t*, void*);
FUSEDLOSS_FOR_ACC_TYPES(FUSEDLOSS_INSTANTIATE_ROW_STATE)
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_CHUNK_GRAD)
#undef FUSEDLOSS_INSTANTIATE_ROW_STATE
#undef FUSEDLOSS_INSTANTIATE_CHUNK_GRAD

}  // namespace fusedloss::cuda
