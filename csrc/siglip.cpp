// Binding layer of the SigLIP sigmoid loss: the argument check, the family's
// tile GEMMs and kernel for the shared chunk driver, and the op schemas
// (fusedloss::siglip_forward / siglip_backward / siglip_sum_and_grad; the
// public function is fusedloss/siglip.py).
//
// With no softmax there are no row statistics to wait for: a tile's loss terms
// and dlogits are final as soon as its logits exist. So the reduced loss that
// requires grad is one pass (siglip_sum_and_grad on backward_chunks: per tile
// the logits GEMM, one row kernel writing loss sums and dlogits in place, the
// dI / dT GEMMs) and autograd's backward only scales its gradients: 6·R·C·D
// FLOPs, where a forward + recomputing backward would take 8. Per-row losses
// (reduction="none") cannot know their upstream gradient in the forward:
// siglip_forward (logits GEMM + loss kernel) and a recomputing siglip_backward.
//
// Memory: besides the outputs, one [R, tile] fp32 block of logits (plus a
// half-precision dlogits block on CUDA), the [3, R] row sums and the fp32 dI
// accumulator [R, D]. Never R x C.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>

#include "fusedloss/backend.h"
#include "fusedloss/chunk_driver.h"
#include "fusedloss/gemm.h"
#include "fusedloss/siglip.h"

namespace fusedloss {
namespace {

using at::Tensor;

constexpr const char* kOp = "siglip_loss";

void check_scalar(const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK_VALUE(t.dim() == 0, kOp, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), kOp, ": ", name, " must be floating point, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), kOp, ": ", name, " is on ", t.device(), " but image_features is on ",
                    like.device());
}

// Every check of a SigLIP call, run once by the forward op.
void check_siglip(const Tensor& image, const Tensor& text, const Tensor& scale, const Tensor& bias) {
  TORCH_CHECK_VALUE(image.dim() == 2 && image.size(1) > 0, kOp, ": image_features must be [R, D] with D > 0, got ",
                    image.sizes());
  TORCH_CHECK_VALUE(text.dim() == 2 && text.size(1) == image.size(1), kOp,
                    ": text_features must be [C, D] with the image_features' D=", image.size(1), ", got ",
                    text.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(image.scalar_type()), kOp,
                   ": image_features must be float32, float64, bfloat16 or float16, got ", image.scalar_type());
  TORCH_CHECK_TYPE(text.scalar_type() == image.scalar_type(), kOp, ": text_features dtype ", text.scalar_type(),
                   " differs from image_features dtype ", image.scalar_type());
  TORCH_CHECK_VALUE(image.device().is_cpu() || image.device().is_cuda(), kOp, ": unsupported device ",
                    image.device());
  TORCH_CHECK_VALUE(text.device() == image.device(), kOp, ": text_features is on ", text.device(),
                    " but image_features is on ", image.device());
  check_scalar("logit_scale", scale, image);
  check_scalar("logit_bias", bias, image);
}

// Validated operands prepared for the kernels, and the driver's Family.
// Checks nothing (the forward op did).
struct SiglipPass {
  Tensor image;  // [R, D] in the GEMM operand dtype
  Tensor text;   // [C, D] in the GEMM operand dtype
  Tensor scale, bias;  // 0-dim, accumulation dtype
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  SiglipParams params;
  Backend backend;
  std::vector<Chunk> chunk_list;
  Tensor state;     // [3, R] row sums: loss, d bias, d scale
  Tensor row_grad;  // [R] upstream gradient per row (gradient passes only)
  bool with_loss = true, need_image = false, need_text = false;
  Tensor grad_image_acc, grad_text;

  SiglipPass(const Tensor& image_, const Tensor& text_, const Tensor& scale_, const Tensor& bias_,
             int64_t positive_offset, int64_t requested_chunk)
      : backend(image_) {
    acc_dtype = accumulation_dtype(image_.scalar_type());
    operand_dtype = gemm_operand_dtype(image_);
    image = image_.contiguous().to(operand_dtype);
    text = text_.contiguous().to(operand_dtype);
    scale = scale_.to(acc_dtype).contiguous();
    bias = bias_.to(acc_dtype).contiguous();
    const int64_t rows = image.size(0), cols = text.size(0);
    chunk_list = column_chunks(cols, chunk_columns_for(rows, cols, requested_chunk, image.is_cuda()));
    params = SiglipParams{rows, cols, 0, 0, 0, positive_offset};
    state = at::zeros({3, rows}, options().dtype(acc_dtype));
  }

  int64_t rows() const { return params.num_rows; }
  const std::vector<Chunk>& chunks() const { return chunk_list; }
  at::TensorOptions options() const { return image.options(); }

  template <typename acc_t>
  SiglipRowState<acc_t> row_state() {
    return {state[0].data_ptr<acc_t>(), state[1].data_ptr<acc_t>(), state[2].data_ptr<acc_t>()};
  }

  // Raw dot products of the tile's columns; points `params` at the tile.
  template <typename acc_t>
  void chunk_logits(const Chunk& c, Tensor& tile) {
    matmul_into(tile, image, text.narrow(0, c.start, c.columns).t(), /*accumulate=*/false);
    params.chunk_start = c.start;
    params.chunk_columns = c.columns;
    params.logits_stride = c.columns;
  }

  template <typename acc_t, typename grad_t>
  void run_kernel(const Tensor& tile, const acc_t* grads, grad_t* dlogits) {
    backend.run(FUSEDLOSS_KERNELS(siglip_chunk<acc_t, grad_t>), params, tile.data_ptr<acc_t>(),
                scale.data_ptr<acc_t>(), bias.data_ptr<acc_t>(), grads, with_loss, row_state<acc_t>(), dlogits);
  }

  // Loss-only pass (forward_chunks).
  template <typename acc_t>
  void fold(const Chunk&, Tensor& tile) {
    run_kernel<acc_t, acc_t>(tile, nullptr, nullptr);
  }
  template <typename acc_t>
  void finalize() {}

  // Gradient pass (backward_chunks): loss sums (if asked) and dlogits in one kernel.
  template <typename acc_t>
  Tensor chunk_dlogits(const Chunk&, Tensor& tile, Tensor& dlogits_workspace) {
    with_typed_data<acc_t>(dlogits_workspace,
                           [&](auto* out) { run_kernel(tile, row_grad.data_ptr<acc_t>(), out); });
    return dlogits_workspace;
  }

  // dI accumulates over tiles in fp32; each dT row comes from exactly one GEMM
  // (the reduction over R runs inside it), written in the operand dtype.
  void chunk_gradients(const Chunk& c, const Tensor& dlogits) {
    if (need_image) matmul_into(grad_image_acc, dlogits, text.narrow(0, c.start, c.columns), /*accumulate=*/true);
    if (need_text) {
      Tensor grad_text_tile = grad_text.narrow(0, c.start, c.columns);
      matmul_into(grad_text_tile, dlogits.t(), image, /*accumulate=*/false);
    }
  }

  // Per-row losses only.
  Tensor losses() {
    forward_chunks(*this);
    return state[0];
  }

  // Gradients of sum_i row_grad[i] * loss_i (and the loss sums when with_loss),
  // as (d image, d text, d scale, d bias); an empty [0] tensor where the mask
  // is false.
  std::array<Tensor, 4> gradients(const Tensor& row_grad_, const Tensor& image_, const Tensor& text_,
                                  const Tensor& scale_, const Tensor& bias_, std::array<bool, 4> mask) {
    const int64_t num_rows = params.num_rows, num_cols = params.num_cols;
    row_grad = row_grad_.reshape({num_rows}).to(acc_dtype).contiguous();
    need_image = mask[0];
    need_text = mask[1];
    grad_image_acc = need_image ? zeros_buffer({num_rows, image.size(1)}, options().dtype(acc_dtype)) : Tensor();
    // Every dT row is written by its tile's GEMM (zeros only without rows).
    grad_text = !need_text      ? Tensor()
                : num_rows == 0 ? zeros_buffer({num_cols, text.size(1)}, options().dtype(operand_dtype))
                                : empty_buffer({num_cols, text.size(1)}, options().dtype(operand_dtype));
    backward_chunks(*this);
    // A fresh empty tensor per output: outputs must not alias (op schema).
    const auto empty = [&] { return at::empty({0}, options().dtype(acc_dtype)); };
    return {need_image ? to_buffer(grad_image_acc, image_.scalar_type()) : empty(),
            need_text ? to_buffer(grad_text, text_.scalar_type()) : empty(),
            mask[2] ? state[2].sum().to(scale_.scalar_type()) : empty(),
            mask[3] ? state[1].sum().to(bias_.scalar_type()) : empty()};
  }
};

// Per-row losses [R]: row i sums its pairs with every text column.
Tensor siglip_forward(const Tensor& image, const Tensor& text, const Tensor& scale, const Tensor& bias,
                      int64_t positive_offset, int64_t tile_size) {
  c10::DeviceGuard guard(image.device());
  check_siglip(image, text, scale, bias);
  SiglipPass pass(image, text, scale, bias, positive_offset, tile_size);
  return pass.losses();
}

// Recomputes the tiles against the per-row upstream gradient. Checks only its
// size (the forward checked the rest).
std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_backward(const Tensor& grad_loss, const Tensor& image,
                                                           const Tensor& text, const Tensor& scale,
                                                           const Tensor& bias, int64_t positive_offset,
                                                           int64_t tile_size, std::array<bool, 4> output_mask) {
  c10::DeviceGuard guard(image.device());
  TORCH_CHECK_VALUE(grad_loss.numel() == image.size(0), "siglip_backward: grad_loss must have R=", image.size(0),
                    " elements, got ", grad_loss.numel());
  SiglipPass pass(image, text, scale, bias, positive_offset, tile_size);
  pass.with_loss = false;
  auto [gi, gt, gs, gb] = pass.gradients(grad_loss, image, text, scale, bias, output_mask);
  return {gi, gt, gs, gb};
}

// The summed loss and its gradients in one pass (the backward only scales them).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> siglip_sum_and_grad(const Tensor& image, const Tensor& text,
                                                                       const Tensor& scale, const Tensor& bias,
                                                                       int64_t positive_offset, int64_t tile_size,
                                                                       std::array<bool, 4> output_mask) {
  c10::DeviceGuard guard(image.device());
  check_siglip(image, text, scale, bias);
  SiglipPass pass(image, text, scale, bias, positive_offset, tile_size);
  const bool any_grad = output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3];
  if (!any_grad) {
    const auto empty = [&] { return at::empty({0}, image.options().dtype(pass.acc_dtype)); };
    return {pass.losses().sum(), empty(), empty(), empty(), empty()};
  }
  auto [gi, gt, gs, gb] = pass.gradients(at::ones({image.size(0)}, image.options().dtype(pass.acc_dtype)), image,
                                         text, scale, bias, output_mask);
  return {pass.state[0].sum(), gi, gt, gs, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def(
      "siglip_forward(Tensor image, Tensor text, Tensor scale, Tensor bias, int positive_offset, int tile_size) "
      "-> Tensor loss");
  m.def(
      "siglip_backward(Tensor grad_loss, Tensor image, Tensor text, Tensor scale, Tensor bias, "
      "int positive_offset, int tile_size, bool[4] output_mask) "
      "-> (Tensor grad_image, Tensor grad_text, Tensor grad_scale, Tensor grad_bias)");
  m.def(
      "siglip_sum_and_grad(Tensor image, Tensor text, Tensor scale, Tensor bias, int positive_offset, "
      "int tile_size, bool[4] output_mask) "
      "-> (Tensor loss, Tensor grad_image, Tensor grad_text, Tensor grad_scale, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("siglip_forward", &siglip_forward);
  m.impl("siglip_backward", &siglip_backward);
  m.impl("siglip_sum_and_grad", &siglip_sum_and_grad);
}

#ifdef FUSEDLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("siglip_forward", &siglip_forward);
  m.impl("siglip_backward", &siglip_backward);
  m.impl("siglip_sum_and_grad", &siglip_sum_and_grad);
}
#endif

}  // namespace fusedloss
