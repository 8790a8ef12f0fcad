// CUDA kernel of the SigLIP loss: one thread block per row of the [R, tile]
// block of dot products (coalesced loads, as in contrastive.cu); the row's
// loss and gradient sums are reduced in the block and added by thread 0, so
// every row sum has one writer and a fixed order (no atomics). The GEMMs that
// produce and consume the block run in cuBLAS (csrc/siglip.cpp).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "block_reduce.cuh"
#include "fusedloss/dtypes.h"
#include "fusedloss/siglip.h"
#include "launch.cuh"

namespace fusedloss::cuda {

namespace {

template <typename acc_t, typename grad_t>
__global__ void siglip_chunk_kernel(SiglipParams p, const acc_t* tile, const acc_t* scale, const acc_t* bias,
                                    const acc_t* row_grad, bool with_loss, SiglipRowState<acc_t> state,
                                    grad_t* dlogits) {
  const int64_t row = blockIdx.x;
  const acc_t* y = tile + row * p.logits_stride;
  const acc_t s = *scale, b = *bias;
  const int64_t t = p.positive_chunk_column(row);
  const bool with_grad = dlogits != nullptr;
  const acc_t g = with_grad ? row_grad[row] : acc_t(0);
  acc_t loss = 0, grad_bias = 0, grad_scale = 0;
  for (int64_t j = threadIdx.x; j < p.chunk_columns; j += blockDim.x) {
    const acc_t dot = y[j];
    const acc_t z = s * dot + b;
    const acc_t e = exp_acc(z < acc_t(0) ? z : -z);
    if (with_loss) loss += siglip_pair_loss(z, j == t, log1p_acc(e));
    if (with_grad) {
      const acc_t d = g * siglip_pair_grad(z, j == t, e);
      grad_bias += d;
      grad_scale += d * dot;
      // d z / d dot = scale: the GEMMs consume raw operands.
      dlogits[row * p.logits_stride + j] = static_cast<grad_t>(s * d);
    }
  }
  if (with_loss) {
    loss = block_allreduce(loss, SumOp{});
    if (threadIdx.x == 0) state.loss[row] += loss;
  }
  if (with_grad) {
    grad_bias = block_allreduce(grad_bias, SumOp{});
    grad_scale = block_allreduce(grad_scale, SumOp{});
    if (threadIdx.x == 0) {
      state.grad_bias[row] += grad_bias;
      state.grad_scale[row] += grad_scale;
    }
  }
}

}  // namespace

template <typename acc_t, typename grad_t>
void siglip_chunk(const SiglipParams& p, const acc_t* tile, const acc_t* scale, const acc_t* bias,
                  const acc_t* row_grad, bool with_loss, SiglipRowState<acc_t> state, grad_t* dlogits,
                  void* stream) {
  launch_row_blocks(siglip_chunk_kernel<acc_t, grad_t>, p.num_rows, stream, p, tile, scale, bias, row_grad,
                    with_loss, state, dlogits);
}

#define FUSEDLOSS_INSTANTIATE_SIGLIP(acc_t, grad_t)                                                             \
  template void siglip_chunk<acc_t, grad_t>(const SiglipParams&, const acc_t*, const acc_t*, const acc_t*,     \
                                            const acc_t*, bool, SiglipRowState<acc_t>, grad_t*, void*);
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_SIGLIP)
#undef FUSEDLOSS_INSTANTIATE_SIGLIP

}  // namespace fusedloss::cuda
