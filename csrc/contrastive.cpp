// Binding layer of the InfoNCE family: argument validation, the column-tile
// loop with its GEMMs, and dispatch of the per-tile kernels to the CPU or CUDA
// backend. Registered as torch ops fusedloss::contrastive_forward/backward;
// InfoNCE, NT-Xent and CLIP are all this one op (fusedloss/contrastive.py).
//
// Memory: besides the outputs, one [R, tile] fp32 block of logits (plus a
// half-precision dlogits block on CUDA), the [3, R] row state, O(C) column
// statistics and the fp32 dQ accumulator [R, D]. Never R x C.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "fusedloss/contrastive.h"
#include "fusedloss/gemm.h"

#ifdef FUSEDLOSS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace fusedloss {
namespace {

using at::Tensor;

void check_contrastive_args(const Tensor& rows, const Tensor& cols, const Tensor& positives, const Tensor& scale,
                            std::optional<int64_t> self_offset) {
  TORCH_CHECK_VALUE(rows.dim() == 2, "contrastive: query rows must be 2-D [R, D], got shape ", rows.sizes());
  TORCH_CHECK_VALUE(cols.dim() == 2, "contrastive: key columns must be 2-D [C, D], got shape ", cols.sizes());
  TORCH_CHECK_VALUE(rows.size(1) == cols.size(1), "contrastive: queries have D=", rows.size(1),
                    " features but keys have D=", cols.size(1));
  TORCH_CHECK_VALUE(cols.size(0) > 0, "contrastive: there are no key columns (C=0)");
  TORCH_CHECK_TYPE(at::isFloatingType(rows.scalar_type()),
                   "contrastive: features must be float32, float64, bfloat16 or float16, got ", rows.scalar_type());
  TORCH_CHECK_TYPE(cols.scalar_type() == rows.scalar_type(), "contrastive: key dtype ", cols.scalar_type(),
                   " differs from query dtype ", rows.scalar_type());
  TORCH_CHECK_TYPE(positives.scalar_type() == at::kLong, "contrastive: positives must be int64, got ",
                   positives.scalar_type());
  TORCH_CHECK_VALUE(positives.dim() == 1 && positives.size(0) == rows.size(0), "contrastive: positives must be [R]=[",
                    rows.size(0), "], got ", positives.sizes());
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.dim() == 0, "contrastive: scale must be a 0-dim tensor, got shape ",
                    scale.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), "contrastive: scale must be floating point, got ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(cols.device() == rows.device() && positives.device() == rows.device() &&
                        scale.device() == rows.device(),
                    "contrastive: queries (", rows.device(), "), keys (", cols.device(), "), positives (",
                    positives.device(), ") and scale (", scale.device(), ") must be on the same device");
  TORCH_CHECK_VALUE(rows.device().is_cpu() || rows.device().is_cuda(), "contrastive: unsupported device ",
                    rows.device());
  if (rows.is_cpu()) {
    // A host-side scan is free on the CPU; on CUDA the positives are built by
    // the Python layer and the kernels only compare against them.
    const Tensor pos = positives.contiguous();
    const int64_t* t = pos.data_ptr<int64_t>();
    for (int64_t i = 0; i < pos.numel(); ++i) {
      TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < cols.size(0), "contrastive: positives[", i, "]=", t[i],
                        " is outside [0, ", cols.size(0), ")");
      TORCH_CHECK_VALUE(!self_offset.has_value() || t[i] != i + *self_offset, "contrastive: positives[", i, "]=",
                        t[i], " is the masked self column");
    }
  }
}

// Routes each per-tile kernel to the device of the tensors it runs on.
struct TileKernels {
  bool cuda;
  void* stream = nullptr;

  explicit TileKernels(const Tensor& t) : cuda(t.is_cuda()) {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) stream = at::cuda::getCurrentCUDAStream().stream();
#else
    TORCH_CHECK(!cuda, "fusedloss was built without CUDA kernels; rebuild with FUSEDLOSS_FORCE_CUDA=1");
#endif
  }

  template <typename acc_t>
  void rows(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale, const int64_t* positives,
            ContrastiveRowState<acc_t> state) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::contrastive_tile_rows(p, tile, scale, positives, state, stream);
#endif
    cpu::contrastive_tile_rows(p, tile, scale, positives, state);
  }

  // CUDA reduces columns in row slices through `scratch`; the CPU needs none.
  template <typename acc_t>
  void columns(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale, LseArray<acc_t> col_lse,
               acc_t* scratch) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::contrastive_tile_columns(p, tile, scale, col_lse, scratch, stream);
#endif
    (void)scratch;
    cpu::contrastive_tile_columns(p, tile, scale, col_lse);
  }

  int64_t column_scratch_elems(int64_t num_rows, int64_t tile_cols) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::contrastive_column_scratch_elems(num_rows, tile_cols);
#endif
    return 0;
  }

  template <typename acc_t>
  void finalize(const ContrastiveParams& p, const int64_t* positives, ContrastiveRowState<acc_t> state,
                LseArray<const acc_t> col_lse, LseArray<acc_t> row_lse, acc_t* loss) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::contrastive_finalize(p, positives, state, col_lse, row_lse, loss, stream);
#endif
    cpu::contrastive_finalize(p, positives, state, col_lse, row_lse, loss);
  }

  template <typename acc_t, typename grad_t>
  void grad(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale, const int64_t* positives,
            LseArray<const acc_t> row_lse, LseArray<const acc_t> col_lse, const acc_t* row_grad,
            const acc_t* col_grad, grad_t* dlogits) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) {
      return cuda::contrastive_tile_grad(p, tile, scale, positives, row_lse, col_lse, row_grad, col_grad, dlogits,
                                         stream);
    }
#endif
    if constexpr (std::is_same_v<acc_t, grad_t>) {
      cpu::contrastive_tile_grad(p, tile, scale, positives, row_lse, col_lse, row_grad, col_grad, dlogits);
    } else {
      TORCH_INTERNAL_ASSERT(false, "CPU dlogits are always in the accumulation dtype");
    }
  }
};

// Everything both passes share: validated, contiguous operands in the dtypes
// the GEMMs and kernels want, and the tile geometry.
struct ContrastiveProblem {
  Tensor rows;       // [R, D] in the GEMM operand dtype
  Tensor cols;       // [C, D] in the GEMM operand dtype
  Tensor positives;  // [R] int64
  Tensor scale;      // 0-dim, accumulation dtype
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  ContrastiveParams params;
  int64_t tile_size;

  ContrastiveProblem(const Tensor& rows_, const Tensor& cols_, const Tensor& positives_, const Tensor& scale_,
                     std::optional<int64_t> self_offset, bool symmetric, int64_t requested_tile) {
    check_contrastive_args(rows_, cols_, positives_, scale_, self_offset);
    acc_dtype = accumulation_dtype(rows_.scalar_type());
    operand_dtype = gemm_operand_dtype(rows_);
    rows = rows_.contiguous().to(operand_dtype);
    cols = cols_.contiguous().to(operand_dtype);
    positives = positives_.contiguous();
    scale = scale_.to(acc_dtype).contiguous();
    const int64_t num_rows = rows.size(0), num_cols = cols.size(0);
    tile_size = chunk_columns_for(num_rows, num_cols, requested_tile, rows.is_cuda());
    params = ContrastiveParams{num_rows, num_cols, 0, 0, 0, self_offset.value_or(0), self_offset.has_value(),
                               symmetric};
  }

  // Raw dot products of columns [start, start + columns) into the front of
  // `workspace`; points `params` at that tile.
  Tensor tile_dots(const Tensor& workspace, int64_t start, int64_t columns) {
    const int64_t num_rows = rows.size(0);
    Tensor tile = workspace.narrow(0, 0, num_rows * columns).view({num_rows, columns});
    matmul_into(tile, rows, cols.narrow(0, start, columns).t(), /*accumulate=*/false);
    params.tile_start = start;
    params.tile_cols = columns;
    params.tile_stride = columns;
    return tile;
  }
};

std::tuple<Tensor, Tensor, Tensor> contrastive_forward(const Tensor& rows, const Tensor& cols,
                                                       const Tensor& positives, const Tensor& scale,
                                                       std::optional<int64_t> self_offset, bool symmetric,
                                                       int64_t tile_size) {
  c10::DeviceGuard guard(rows.device());
  ContrastiveProblem prob(rows, cols, positives, scale, self_offset, symmetric, tile_size);
  const int64_t num_rows = prob.params.num_rows, num_cols = prob.params.num_cols;
  const auto acc_opts = rows.options().dtype(prob.acc_dtype);
  Tensor state = at::zeros({3, num_rows}, acc_opts);
  state[0].fill_(-std::numeric_limits<double>::infinity());
  state[2].fill_(std::numeric_limits<double>::quiet_NaN());  // a positive never seen poisons its row
  // Row and column lse as LseParts [2, count] (max, log-sum).
  Tensor row_lse = at::empty({2, num_rows}, acc_opts);
  Tensor loss = at::empty({num_rows}, acc_opts);
  // Only the symmetric loss needs column statistics.
  Tensor col_lse = at::empty({2, symmetric ? num_cols : 0}, acc_opts);
  if (num_rows == 0) return {loss, row_lse, col_lse};
  Tensor workspace = at::empty({num_rows * prob.tile_size}, acc_opts);
  const TileKernels kernels(rows);
  Tensor scratch = at::empty({symmetric ? kernels.column_scratch_elems(num_rows, prob.tile_size) : 0}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES(prob.acc_dtype, "contrastive_forward", [&] {
    using acc_t = scalar_t;
    const ContrastiveRowState<acc_t> row_state{state[0].data_ptr<acc_t>(), state[1].data_ptr<acc_t>(),
                                               state[2].data_ptr<acc_t>()};
    const int64_t* pos = prob.positives.data_ptr<int64_t>();
    const acc_t* s = prob.scale.data_ptr<acc_t>();
    for (int64_t start = 0; start < num_cols; start += prob.tile_size) {
      Tensor tile = prob.tile_dots(workspace, start, std::min(prob.tile_size, num_cols - start));
      kernels.rows(prob.params, tile.data_ptr<acc_t>(), s, pos, row_state);
      // The tile holds every row, so its columns' LSEs are complete here.
      if (symmetric) {
        kernels.columns(prob.params, tile.data_ptr<acc_t>(), s, lse_array_at<acc_t>(col_lse),
                        scratch.data_ptr<acc_t>());
      }
    }
    kernels.finalize(prob.params, pos, row_state, lse_array_at<const acc_t>(col_lse),
                     lse_array_at<acc_t>(row_lse), loss.data_ptr<acc_t>());
  });
  return {loss, row_lse, col_lse};
}

std::tuple<Tensor, Tensor, Tensor> contrastive_backward(const Tensor& grad_loss, const Tensor& rows,
                                                        const Tensor& cols, const Tensor& positives,
                                                        const Tensor& scale, const Tensor& row_lse,
                                                        const Tensor& col_lse, std::optional<int64_t> self_offset,
                                                        bool symmetric, int64_t tile_size,
                                                        std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(rows.device());
  ContrastiveProblem prob(rows, cols, positives, scale, self_offset, symmetric, tile_size);
  const int64_t num_rows = prob.params.num_rows, num_cols = prob.params.num_cols;
  TORCH_CHECK_VALUE(grad_loss.numel() == num_rows && row_lse.numel() == 2 * num_rows,
                    "contrastive_backward: grad_loss must have R=", num_rows, " elements and row_lse [2, R]");
  TORCH_CHECK_VALUE(col_lse.numel() == 2 * (symmetric ? num_cols : 0), "contrastive_backward: col_lse must be [2, ",
                    symmetric ? num_cols : 0, "], got ", col_lse.sizes());
  const bool need_rows = output_mask[0], need_cols = output_mask[1], need_scale = output_mask[2];
  const auto acc_opts = rows.options().dtype(prob.acc_dtype);
  // A symmetric pair loss is the mean of its row and its column term.
  const Tensor row_grad = grad_loss.reshape({num_rows}).to(prob.acc_dtype).mul(symmetric ? 0.5 : 1.0).contiguous();
  const Tensor lse_rows = row_lse.reshape({2, num_rows}).to(prob.acc_dtype).contiguous();
  const Tensor lse_cols = col_lse.reshape({2, symmetric ? num_cols : 0}).to(prob.acc_dtype).contiguous();
  Tensor col_grad;
  if (symmetric) {
    col_grad = at::zeros({num_cols}, acc_opts).index_add_(0, prob.positives, row_grad);
  }

  // dQ accumulates over tiles in fp32; d(scale) = sum(Q * dQ) / scale needs it too.
  const bool need_dq = need_rows || need_scale;
  Tensor grad_rows_acc = need_dq ? at::zeros({num_rows, rows.size(1)}, acc_opts) : Tensor();
  // Each dK row comes from exactly one GEMM (reduction over R inside it), so on
  // CUDA it is written straight in the operand dtype; the CPU GEMMs run in fp32.
  Tensor grad_cols_buf = need_cols ? at::empty({num_cols, cols.size(1)}, rows.options().dtype(prob.operand_dtype))
                                   : Tensor();
  if (num_rows == 0 && need_cols) grad_cols_buf.zero_();

  if (num_rows > 0 && (need_dq || need_cols)) {
    Tensor workspace = at::empty({num_rows * prob.tile_size}, acc_opts);
    // dlogits feed the GEMMs in the operand dtype; when that is the accumulation
    // dtype they overwrite the tile in place.
    Tensor dlogits_workspace =
        prob.operand_dtype == prob.acc_dtype
            ? workspace
            : at::empty({num_rows * prob.tile_size}, rows.options().dtype(prob.operand_dtype));
    const TileKernels kernels(rows);
    AT_DISPATCH_FLOATING_TYPES(prob.acc_dtype, "contrastive_backward", [&] {
      using acc_t = scalar_t;
      const int64_t* pos = prob.positives.data_ptr<int64_t>();
      const acc_t* s = prob.scale.data_ptr<acc_t>();
      const LseArray<const acc_t> lse_cols_ptr = lse_array_at<const acc_t>(lse_cols);
      const acc_t* col_grad_ptr = symmetric ? col_grad.data_ptr<acc_t>() : nullptr;
      for (int64_t start = 0; start < num_cols; start += prob.tile_size) {
        const int64_t columns = std::min(prob.tile_size, num_cols - start);
        Tensor tile = prob.tile_dots(workspace, start, columns);
        Tensor dlogits = dlogits_workspace.narrow(0, 0, num_rows * columns).view({num_rows, columns});
        const auto run_grad = [&](auto* dlogits_ptr) {
          kernels.grad(prob.params, tile.data_ptr<acc_t>(), s, pos, lse_array_at<const acc_t>(lse_rows), lse_cols_ptr,
                       row_grad.data_ptr<acc_t>(), col_grad_ptr, dlogits_ptr);
        };
        if (prob.operand_dtype == prob.acc_dtype) {
          run_grad(dlogits.data_ptr<acc_t>());
        } else if constexpr (std::is_same_v<acc_t, float>) {
          if (prob.operand_dtype == at::kBFloat16) run_grad(dlogits.data_ptr<at::BFloat16>());
          else run_grad(dlogits.data_ptr<at::Half>());
        }
        if (need_dq) matmul_into(grad_rows_acc, dlogits, prob.cols.narrow(0, start, columns), /*accumulate=*/true);
        if (need_cols) {
          Tensor grad_cols_tile = grad_cols_buf.narrow(0, start, columns);
          matmul_into(grad_cols_tile, dlogits.t(), prob.rows, /*accumulate=*/false);
        }
      }
    });
  } else if (need_dq) {
    grad_rows_acc.zero_();
  }
  // logits = scale * Q K^T, so d(scale) = sum(dlogits * Q K^T) = sum(Q * dQ) / scale.
  Tensor grad_scale = need_scale ? (prob.rows.to(prob.acc_dtype) * grad_rows_acc).sum().div(prob.scale)
                                       .to(scale.scalar_type())
                                 : at::empty({0}, acc_opts);
  Tensor grad_rows = need_rows ? grad_rows_acc.to(rows.scalar_type()) : at::empty({0}, rows.options());
  Tensor grad_cols = need_cols ? grad_cols_buf.to(cols.scalar_type()) : at::empty({0}, cols.options());
  return {grad_rows, grad_cols, grad_scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def(
      "contrastive_forward(Tensor rows, Tensor cols, Tensor positives, Tensor scale, int? self_offset, "
      "bool symmetric, int tile_size) -> (Tensor loss, Tensor row_lse, Tensor col_lse)");
  m.def(
      "contrastive_backward(Tensor grad_loss, Tensor rows, Tensor cols, Tensor positives, Tensor scale, "
      "Tensor row_lse, Tensor col_lse, int? self_offset, bool symmetric, int tile_size, bool[3] output_mask) "
      "-> (Tensor grad_rows, Tensor grad_cols, Tensor grad_scale)");
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
}

#ifdef FUSEDLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
}
#endif

}  // namespace fusedloss
