// Binding layer of the InfoNCE family: the argument check (run once, by the
// forward op), the family's chunk GEMMs and kernels for the shared chunk driver,
// and the op schemas. Registered as torch ops
// fusedloss::contrastive_forward/backward; InfoNCE, NT-Xent and CLIP are all
// this one op (fusedloss/contrastive.py).
//
// Memory: besides the outputs, one [R, tile] fp32 block of logits (plus a
// half-precision dlogits block on CUDA), the [3, R] row state, O(C) column
// statistics and the fp32 dQ accumulator [R, D]. Never R x C.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "fusedloss/backend.h"
#include "fusedloss/checks.h"
#include "fusedloss/chunk_driver.h"
#include "fusedloss/contrastive.h"
#include "fusedloss/gemm.h"

namespace fusedloss {
namespace {

using at::Tensor;

constexpr const char* kOp = "contrastive";

// Every check of a contrastive call. Query rows play the classifier's input,
// key columns its weight.
void check_contrastive(const Tensor& rows, const Tensor& cols, const Tensor& positives, const Tensor& scale,
                       std::optional<int64_t> self_offset) {
  TORCH_CHECK_VALUE(cols.dim() != 2 || cols.size(0) > 0, kOp, ": there are no key columns (C=0)");
  checks::classifier(kOp, rows, cols, std::nullopt);
  checks::index_tensor(kOp, "positives", positives, rows);
  TORCH_CHECK_VALUE(positives.dim() == 1 && positives.size(0) == rows.size(0), kOp, ": positives must be [R]=[",
                    rows.size(0), "], got ", positives.sizes());
  TORCH_CHECK_VALUE(scale.numel() == 1 && scale.dim() == 0, kOp, ": scale must be a 0-dim tensor, got shape ",
                    scale.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), kOp, ": scale must be floating point, got ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(scale.device() == rows.device(), kOp, ": scale is on ", scale.device(), " but input is on ",
                    rows.device());
  checks::index_range(kOp, "positives", positives, cols.size(0));
  if (rows.is_cpu() && self_offset.has_value()) {
    // On CUDA the positives are built by the Python layer and the kernels only
    // compare against them.
    const Tensor masked = positives.eq(at::arange(positives.numel(), positives.options()) + *self_offset);
    TORCH_CHECK_VALUE(!masked.any().item<bool>(), kOp, ": positives[", masked.nonzero()[0][0].item<int64_t>(),
                      "] is the masked self column");
  }
}

// Validated operands prepared for the kernels. Checks nothing (the forward op did).
struct ContrastiveProblem {
  Tensor queries;    // [R, D] rows, in the GEMM operand dtype
  Tensor keys;       // [C, D] columns, in the GEMM operand dtype
  Tensor positives;  // [R] int64
  Tensor scale;      // 0-dim, accumulation dtype
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  ContrastiveParams params;
  Backend backend;
  std::vector<Chunk> chunk_list;

  ContrastiveProblem(const Tensor& rows_, const Tensor& cols_, const Tensor& positives_, const Tensor& scale_,
                     std::optional<int64_t> self_offset, bool symmetric, int64_t requested_chunk)
      : backend(rows_) {
    acc_dtype = accumulation_dtype(rows_.scalar_type());
    operand_dtype = gemm_operand_dtype(rows_);
    queries = rows_.contiguous().to(operand_dtype);
    keys = cols_.contiguous().to(operand_dtype);
    positives = positives_.contiguous();
    scale = scale_.to(acc_dtype).contiguous();
    const int64_t num_rows = queries.size(0), num_cols = keys.size(0);
    chunk_list = column_chunks(num_cols, chunk_columns_for(num_rows, num_cols, requested_chunk, queries.is_cuda()));
    params = ContrastiveParams{num_rows, num_cols, 0, 0, 0, self_offset.value_or(0), self_offset.has_value(),
                               symmetric};
  }

  int64_t rows() const { return params.num_rows; }
  const std::vector<Chunk>& chunks() const { return chunk_list; }
  at::TensorOptions options() const { return queries.options(); }

  // Raw dot products of the chunk's columns; points `params` at that chunk.
  template <typename acc_t>
  void chunk_logits(const Chunk& c, Tensor& tile) {
    matmul_into(tile, queries, keys.narrow(0, c.start, c.columns).t(), /*accumulate=*/false);
    params.chunk_start = c.start;
    params.chunk_columns = c.columns;
    params.logits_stride = c.columns;
  }
};

struct ContrastiveForward : ContrastiveProblem {
  using ContrastiveProblem::ContrastiveProblem;
  Tensor state, row_lse, col_lse, loss, scratch;

  template <typename acc_t>
  ContrastiveRowState<acc_t> row_state() {
    return {state[0].data_ptr<acc_t>(), state[1].data_ptr<acc_t>(), state[2].data_ptr<acc_t>()};
  }

  template <typename acc_t>
  void fold(const Chunk& c, Tensor& tile) {
    backend.run(FUSEDLOSS_KERNELS(contrastive_accumulate_chunk<acc_t>), params, tile.data_ptr<acc_t>(),
                scale.data_ptr<acc_t>(), positives.data_ptr<int64_t>(), row_state<acc_t>());
    // The tile holds every row, so the chunk's column LSEs are complete here.
    if (params.symmetric) {
      backend.run(FUSEDLOSS_KERNELS(contrastive_chunk_column_lse<acc_t>), params, tile.data_ptr<acc_t>(),
                  scale.data_ptr<acc_t>(), lse_array_at<acc_t>(col_lse), scratch.data_ptr<acc_t>());
    }
  }

  template <typename acc_t>
  void finalize() {
    backend.run(FUSEDLOSS_KERNELS(contrastive_finalize<acc_t>), params, positives.data_ptr<int64_t>(),
                row_state<acc_t>(), lse_array_at<const acc_t>(col_lse), lse_array_at<acc_t>(row_lse),
                loss.data_ptr<acc_t>());
  }

  void run() {
    const auto acc_opts = options().dtype(acc_dtype);
    const int64_t num_rows = params.num_rows, num_cols = params.num_cols;
    state = at::zeros({3, num_rows}, acc_opts);
    state[0].fill_(-std::numeric_limits<double>::infinity());
    state[2].fill_(std::numeric_limits<double>::quiet_NaN());  // a positive never seen poisons its row
    // Row and column lse as LseParts [2, count] (max, log-sum); only the
    // symmetric loss needs column statistics.
    row_lse = at::empty({2, num_rows}, acc_opts);
    col_lse = at::empty({2, params.symmetric ? num_cols : 0}, acc_opts);
    loss = at::empty({num_rows}, acc_opts);
    // CUDA reduces columns in row slices through a scratch buffer; the CPU needs none.
    int64_t scratch_elems = 0;
#ifdef FUSEDLOSS_WITH_CUDA
    if (backend.is_cuda() && params.symmetric) {
      scratch_elems = cuda::contrastive_column_scratch_elems(num_rows, widest(chunk_list));
    }
#endif
    scratch = at::empty({scratch_elems}, acc_opts);
    forward_chunks(*this);
  }
};

// dQ accumulates over chunks in fp32 (d scale = sum(Q * dQ) / scale needs it
// too); each dK row comes from exactly one GEMM (reduction over R inside it),
// so on CUDA it is written straight in the operand dtype.
struct ContrastiveBackward : ContrastiveProblem {
  using ContrastiveProblem::ContrastiveProblem;
  Tensor row_grad, col_grad, row_lse, col_lse;
  bool need_dq = false, need_cols = false;
  Tensor grad_rows_acc, grad_cols_buf;

  template <typename acc_t>
  Tensor chunk_dlogits(const Chunk& c, Tensor& tile, Tensor& dlogits_workspace) {
    with_typed_data<acc_t>(dlogits_workspace, [&](auto* out) {
      using grad_t = std::remove_pointer_t<decltype(out)>;
      backend.run(FUSEDLOSS_KERNELS(contrastive_chunk_grad<acc_t, grad_t>), params, tile.data_ptr<acc_t>(),
                  scale.data_ptr<acc_t>(), positives.data_ptr<int64_t>(), lse_array_at<const acc_t>(row_lse),
                  lse_array_at<const acc_t>(col_lse), row_grad.data_ptr<acc_t>(),
                  params.symmetric ? col_grad.data_ptr<acc_t>() : nullptr, out);
    });
    return dlogits_workspace;
  }

  void chunk_gradients(const Chunk& c, const Tensor& dlogits) {
    if (need_dq) matmul_into(grad_rows_acc, dlogits, keys.narrow(0, c.start, c.columns), /*accumulate=*/true);
    if (need_cols) {
      Tensor grad_cols_tile = grad_cols_buf.narrow(0, c.start, c.columns);
      matmul_into(grad_cols_tile, dlogits.t(), queries, /*accumulate=*/false);
    }
  }

  std::tuple<Tensor, Tensor, Tensor> run(const Tensor& grad_loss, const Tensor& row_lse_in, const Tensor& col_lse_in,
                                         const Tensor& rows_, const Tensor& cols_, const Tensor& scale_,
                                         std::array<bool, 3> output_mask) {
    const int64_t num_rows = params.num_rows, num_cols = params.num_cols;
    const int64_t col_stats = params.symmetric ? num_cols : 0;
    TORCH_CHECK_VALUE(grad_loss.numel() == num_rows && row_lse_in.numel() == 2 * num_rows &&
                          col_lse_in.numel() == 2 * col_stats,
                      "contrastive_backward: grad_loss must have R=", num_rows, " elements, row_lse be [2, R] and "
                      "col_lse [2, ", col_stats, "]");
    const bool need_rows = output_mask[0], need_scale = output_mask[2];
    need_cols = output_mask[1];
    need_dq = need_rows || need_scale;
    const auto acc_opts = options().dtype(acc_dtype);
    // A symmetric pair loss is the mean of its row and its column term.
    row_grad = grad_loss.reshape({num_rows}).to(acc_dtype).mul(params.symmetric ? 0.5 : 1.0).contiguous();
    row_lse = row_lse_in.reshape({2, num_rows}).to(acc_dtype).contiguous();
    col_lse = col_lse_in.reshape({2, col_stats}).to(acc_dtype).contiguous();
    if (params.symmetric) {
      // Each column's term is weighted by the upstream gradient of the pair it
      // is the positive of. An out-of-range positive (unchecked only on CUDA
      // under compile / graph capture) made its row NaN in the forward: it
      // poisons a column here too, instead of index_add_'s device assert.
      const Tensor valid = positives.ge(0).logical_and(positives.lt(num_cols));
      col_grad = at::zeros({num_cols}, acc_opts)
                     .index_add_(0, positives.clamp(0, num_cols - 1),
                                 row_grad.where(valid, std::numeric_limits<double>::quiet_NaN()));
    }
    grad_rows_acc = need_dq ? at::zeros({num_rows, queries.size(1)}, acc_opts) : Tensor();
    // Every dK row is written by its tile's GEMM (zeros only without rows).
    grad_cols_buf = !need_cols      ? Tensor()
                    : num_rows == 0 ? at::zeros({num_cols, keys.size(1)}, options().dtype(operand_dtype))
                                    : at::empty({num_cols, keys.size(1)}, options().dtype(operand_dtype));
    if (need_dq || need_cols) backward_chunks(*this);
    // logits = scale * Q K^T, so d(scale) = sum(dlogits * Q K^T) = sum(Q * dQ) / scale.
    Tensor grad_scale = need_scale ? (queries.to(acc_dtype) * grad_rows_acc).sum().div(scale).to(scale_.scalar_type())
                                   : at::empty({0}, acc_opts);
    Tensor grad_rows = need_rows ? grad_rows_acc.to(rows_.scalar_type()) : at::empty({0}, rows_.options());
    Tensor grad_cols = need_cols ? grad_cols_buf.to(cols_.scalar_type()) : at::empty({0}, cols_.options());
    return {grad_rows, grad_cols, grad_scale};
  }
};

std::tuple<Tensor, Tensor, Tensor> contrastive_forward(const Tensor& rows, const Tensor& cols,
                                                       const Tensor& positives, const Tensor& scale,
                                                       std::optional<int64_t> self_offset, bool symmetric,
                                                       int64_t tile_size) {
  c10::DeviceGuard guard(rows.device());
  check_contrastive(rows, cols, positives, scale, self_offset);
  ContrastiveForward pass(rows, cols, positives, scale, self_offset, symmetric, tile_size);
  pass.run();
  return {pass.loss, pass.row_lse, pass.col_lse};
}

// Checks only the sizes of what the forward produced.
std::tuple<Tensor, Tensor, Tensor> contrastive_backward(const Tensor& grad_loss, const Tensor& rows,
                                                        const Tensor& cols, const Tensor& positives,
                                                        const Tensor& scale, const Tensor& row_lse,
                                                        const Tensor& col_lse, std::optional<int64_t> self_offset,
                                                        bool symmetric, int64_t tile_size,
                                                        std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(rows.device());
  ContrastiveBackward pass(rows, cols, positives, scale, self_offset, symmetric, tile_size);
  return pass.run(grad_loss, row_lse, col_lse, rows, cols, scale, output_mask);
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
