// Binding layer of the InfoNCE family: the argument check (run once, by the
// forward op), the family's chunk GEMMs and kernels for the shared chunk driver
// and single pass, and the op schemas. Registered as torch ops
// fusedloss::contrastive_forward/backward (the recompute pair) and
// fusedloss::contrastive_sum_and_grad (the single pass); InfoNCE, NT-Xent and
// CLIP are all these ops (fusedloss/contrastive.py).
//
// Memory of the recompute pair: besides the outputs, one [R, tile] fp32 block
// of logits (plus a half-precision dlogits block on CUDA), the [3, R] row
// state, O(C) column statistics and the fp32 dQ accumulator [R, D]; of the
// single pass, one [R_block, C] fp32 tile within the memory budget. Never an
// unbounded R x C.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
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

// The id operands of a call as the op received them: row_ids [K, R] and
// col_ids [K, C] int64 (K id channels, 1 or 2) on the rows' device,
// id_columns [K] (channel c gives ids to the first id_columns[c] columns) and
// id_penalty (empty: the ids mask; [match, differ]: ContrastiveIds::penalize),
// or no ids at all.
struct IdArgs {
  const std::optional<Tensor>& row_ids;
  const std::optional<Tensor>& col_ids;
  at::IntArrayRef id_columns;
  at::ArrayRef<double> id_penalty;
};

void check_ids(const Tensor& rows, const Tensor& cols, const IdArgs& args) {
  const auto& [row_ids, col_ids, id_columns, id_penalty] = args;
  TORCH_CHECK_VALUE(row_ids.has_value() == col_ids.has_value(), kOp, ": row_ids and col_ids are given together");
  TORCH_CHECK_VALUE(id_penalty.empty() || id_penalty.size() == 2, kOp,
                    ": id_penalty must be empty (the ids mask) or [penalty_match, penalty_differ], got ",
                    id_penalty.size(), " values");
  for (const double v : id_penalty) {
    TORCH_CHECK_VALUE(std::isfinite(v), kOp, ": id_penalty values must be finite, got ", v);
  }
  if (!row_ids.has_value()) {
    TORCH_CHECK_VALUE(id_columns.empty() && id_penalty.empty(), kOp,
                      ": id_columns and id_penalty need row_ids and col_ids");
    return;
  }
  const int64_t channels = row_ids->dim() == 2 ? row_ids->size(0) : -1;
  TORCH_CHECK_VALUE(channels >= 1 && channels <= ContrastiveIds::kChannels && row_ids->size(1) == rows.size(0), kOp,
                    ": row_ids must be [K, R] with K in [1, ", ContrastiveIds::kChannels, "] id channels and R=",
                    rows.size(0), ", got ", row_ids->sizes());
  TORCH_CHECK_VALUE(col_ids->dim() == 2 && col_ids->size(0) == channels && col_ids->size(1) == cols.size(0), kOp,
                    ": col_ids must be [K, C]=[", channels, ", ", cols.size(0), "], got ", col_ids->sizes());
  checks::index_tensor(kOp, "row_ids", *row_ids, rows);
  checks::index_tensor(kOp, "col_ids", *col_ids, rows);
  TORCH_CHECK_VALUE(static_cast<int64_t>(id_columns.size()) == channels, kOp, ": id_columns must have K=", channels,
                    " entries, got ", id_columns.size());
  for (const int64_t n : id_columns) {
    TORCH_CHECK_VALUE(n >= 0 && n <= cols.size(0), kOp, ": id_columns entries must be in [0, C=", cols.size(0),
                      "], got ", n);
  }
}

// Every check of a contrastive call. Query rows play the classifier's input,
// key columns its weight.
void check_contrastive(const Tensor& rows, const Tensor& cols, const Tensor& positives, const Tensor& scale,
                       const IdArgs& ids, std::optional<int64_t> self_offset) {
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
  check_ids(rows, cols, ids);
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
  Tensor row_ids, col_ids;  // [K, R], [K, C] int64 (undefined without the id mask)
  Tensor scale;      // 0-dim, accumulation dtype
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  ContrastiveParams params;
  Backend backend;
  std::vector<Chunk> chunk_list;

  ContrastiveProblem(const Tensor& rows_, const Tensor& cols_, const Tensor& positives_, const Tensor& scale_,
                     const IdArgs& ids, std::optional<int64_t> self_offset, bool symmetric, int64_t requested_chunk)
      : backend(rows_) {
    acc_dtype = accumulation_dtype(rows_.scalar_type());
    operand_dtype = gemm_operand_dtype(rows_);
    queries = rows_.contiguous().to(operand_dtype);
    keys = cols_.contiguous().to(operand_dtype);
    positives = positives_.contiguous();
    scale = scale_.to(acc_dtype).contiguous();
    const int64_t num_rows = queries.size(0), num_cols = keys.size(0);
    chunk_list = column_chunks(num_cols, chunk_columns_for(num_rows, num_cols, requested_chunk, queries.is_cuda()));
    params = ContrastiveParams{num_rows, num_cols, 0, 0, 0, 0, self_offset.value_or(0), self_offset.has_value(),
                               symmetric, ContrastiveIds{{nullptr, nullptr}, {nullptr, nullptr}, {0, 0}, false, 0, 0}};
    if (!ids.id_penalty.empty()) {
      params.ids.penalize = true;
      params.ids.penalty_match = ids.id_penalty[0];
      params.ids.penalty_differ = ids.id_penalty[1];
    }
    if (ids.row_ids.has_value()) {
      row_ids = ids.row_ids->contiguous();
      col_ids = ids.col_ids->contiguous();
      for (int64_t c = 0; c < ContrastiveIds::kChannels; ++c) {
        // An unused channel reads channel 0's arrays (columns 0: never a match).
        const int64_t from = c < row_ids.size(0) ? c : 0;
        params.ids.row[c] = row_ids.data_ptr<int64_t>() + from * num_rows;
        params.ids.col[c] = col_ids.data_ptr<int64_t>() + from * num_cols;
        params.ids.columns[c] = c < row_ids.size(0) ? ids.id_columns[c] : 0;
      }
    }
  }

  int64_t rows() const { return params.num_rows; }
  const std::vector<Chunk>& chunks() const { return chunk_list; }
  at::TensorOptions options() const { return queries.options(); }

  // The upstream gradient of each row's term: a symmetric pair loss is the
  // mean of its row and its column term.
  Tensor row_term_grads(const Tensor& grad_loss) const {
    return grad_loss.reshape({params.num_rows}).to(acc_dtype).mul(params.symmetric ? 0.5 : 1.0).contiguous();
  }

  // The upstream gradient of each column's term (symmetric): that of the pair
  // whose positive the column is. An out-of-range positive (unchecked only on
  // CUDA under compile / graph capture) made its row NaN in the forward: it
  // poisons a column here too, instead of index_add_'s device assert.
  Tensor column_grads(const Tensor& row_grad) const {
    const int64_t num_cols = params.num_cols;
    const Tensor valid = positives.ge(0).logical_and(positives.lt(num_cols));
    return at::zeros({num_cols}, row_grad.options())
        .index_add_(0, positives.clamp(0, num_cols - 1), row_grad.where(valid, std::numeric_limits<double>::quiet_NaN()));
  }

  // The buffer contrastive_chunk_column_lse needs for tiles of `columns`
  // columns: CUDA reduces columns in row slices through it; the CPU needs none.
  Tensor column_scratch(int64_t columns) const {
    int64_t elems = 0;
#ifdef FUSEDLOSS_WITH_CUDA
    if (backend.is_cuda() && params.symmetric) elems = cuda::contrastive_column_scratch_elems(params.num_rows, columns);
#endif
    return at::empty({elems}, options().dtype(acc_dtype));
  }

  // The [3, R] row state (max, sum_exp, positive logit) of rows not yet seen.
  Tensor empty_row_state() const {
    Tensor state = at::zeros({3, params.num_rows}, options().dtype(acc_dtype));
    state[0].fill_(-std::numeric_limits<double>::infinity());
    state[2].fill_(std::numeric_limits<double>::quiet_NaN());  // a positive never seen poisons its row
    return state;
  }

  template <typename acc_t>
  ContrastiveRowState<acc_t> row_state_at(const Tensor& state, int64_t row) {
    return {state[0].data_ptr<acc_t>() + row, state[1].data_ptr<acc_t>() + row, state[2].data_ptr<acc_t>() + row};
  }

  // Raw dot products of the chunk's columns; points `params` at that chunk.
  template <typename acc_t>
  void chunk_logits(const Chunk& c, Tensor& tile) {
    matmul_into(tile, queries, keys.narrow(0, c.start, c.columns).t(), /*accumulate=*/false);
    params.chunk_start = c.start;
    params.chunk_columns = c.columns;
    params.logits_stride = c.columns;
    params.dlogits_stride = c.columns;
  }
};

struct ContrastiveForward : ContrastiveProblem {
  using ContrastiveProblem::ContrastiveProblem;
  Tensor state, row_lse, col_lse, loss, scratch;

  template <typename acc_t>
  ContrastiveRowState<acc_t> row_state() {
    return row_state_at<acc_t>(state, 0);
  }

  template <typename acc_t>
  void fold(const Chunk& c, Tensor& tile) {
    backend.run(FUSEDLOSS_KERNELS(contrastive_accumulate_chunk<acc_t>), params, tile.data_ptr<acc_t>(),
                scale.data_ptr<acc_t>(), positives.data_ptr<int64_t>(), row_state<acc_t>());
    // The tile holds every row, so the chunk's column LSEs are complete here.
    if (params.symmetric) {
      backend.run(FUSEDLOSS_KERNELS(contrastive_chunk_column_lse<acc_t>), params, tile.data_ptr<acc_t>(),
                  scale.data_ptr<acc_t>(), positives.data_ptr<int64_t>(), lse_array_at<acc_t>(col_lse),
                  scratch.data_ptr<acc_t>());
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
    state = empty_row_state();
    // Row and column lse as LseParts [2, count] (max, log-sum); only the
    // symmetric loss needs column statistics.
    row_lse = at::empty({2, num_rows}, acc_opts);
    col_lse = at::empty({2, params.symmetric ? num_cols : 0}, acc_opts);
    loss = at::empty({num_rows}, acc_opts);
    scratch = column_scratch(widest(chunk_list));
    forward_chunks(*this);
  }
};

// dQ accumulates over chunks in fp32; each dK row comes from exactly one GEMM
// (reduction over R inside it), so on CUDA it is written straight in the
// operand dtype; d scale per row from the row kernels' fp32 terms.
struct ContrastiveBackward : ContrastiveProblem {
  using ContrastiveProblem::ContrastiveProblem;
  Tensor row_grad, col_grad, row_lse, col_lse;
  bool need_rows = false, need_cols = false;
  Tensor grad_rows_acc, grad_cols_buf, scale_grad_rows;

  template <typename acc_t>
  Tensor chunk_dlogits(const Chunk& c, Tensor& tile, Tensor& dlogits_workspace) {
    with_typed_data<acc_t>(dlogits_workspace, [&](auto* out) {
      using grad_t = std::remove_pointer_t<decltype(out)>;
      backend.run(FUSEDLOSS_KERNELS(contrastive_chunk_grad<acc_t, grad_t>), params, tile.data_ptr<acc_t>(),
                  scale.data_ptr<acc_t>(), positives.data_ptr<int64_t>(), lse_array_at<const acc_t>(row_lse),
                  lse_array_at<const acc_t>(col_lse), row_grad.data_ptr<acc_t>(),
                  params.symmetric ? col_grad.data_ptr<acc_t>() : nullptr, out,
                  scale_grad_rows.defined() ? scale_grad_rows.data_ptr<acc_t>() : nullptr);
    });
    return dlogits_workspace;
  }

  void chunk_gradients(const Chunk& c, const Tensor& dlogits) {
    if (need_rows) matmul_into(grad_rows_acc, dlogits, keys.narrow(0, c.start, c.columns), /*accumulate=*/true);
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
    const bool need_scale = output_mask[2];
    need_rows = output_mask[0];
    need_cols = output_mask[1];
    const auto acc_opts = options().dtype(acc_dtype);
    // A symmetric pair loss is the mean of its row and its column term.
    row_grad = row_term_grads(grad_loss);
    row_lse = row_lse_in.reshape({2, num_rows}).to(acc_dtype).contiguous();
    col_lse = col_lse_in.reshape({2, col_stats}).to(acc_dtype).contiguous();
    if (params.symmetric) col_grad = column_grads(row_grad);
    grad_rows_acc = need_rows ? zeros_buffer({num_rows, queries.size(1)}, acc_opts) : Tensor();
    scale_grad_rows = need_scale ? at::zeros({num_rows}, acc_opts) : Tensor();
    // Every dK row is written by its tile's GEMM (zeros only without rows).
    grad_cols_buf = !need_cols      ? Tensor()
                    : num_rows == 0 ? zeros_buffer({num_cols, keys.size(1)}, options().dtype(operand_dtype))
                                    : empty_buffer({num_cols, keys.size(1)}, options().dtype(operand_dtype));
    if (need_rows || need_cols || need_scale) backward_chunks(*this);
    Tensor grad_scale = need_scale ? scale_grad_rows.sum().to(scale_.scalar_type()) : at::empty({0}, acc_opts);
    Tensor grad_rows = need_rows ? to_buffer(grad_rows_acc, rows_.scalar_type()) : at::empty({0}, rows_.options());
    Tensor grad_cols = need_cols ? to_buffer(grad_cols_buf, cols_.scalar_type()) : at::empty({0}, cols_.options());
    return {grad_rows, grad_cols, grad_scale};
  }
};

// sum_i loss_i / normalizer and its gradients in one pass over row blocks
// (chunk_driver.h's single_pass, as linear CE): per block, one GEMM forms the
// [R_block, C] tile of dot products, one row kernel folds, finalizes and
// writes the dlogits over it, and two GEMMs give dQ for the block's rows and
// dK (+)= dlogits^T Q_block: three GEMMs per step instead of four. The
// symmetric loss needs every column's LSE before any column gradient, so it
// runs single pass only when the whole [R, C] tile is one block.
struct ContrastiveSinglePass : ContrastiveProblem {
  using ContrastiveProblem::ContrastiveProblem;
  int64_t block_rows = 0;
  bool need_rows = false, need_cols = false;
  Tensor state, row_lse, col_lse, loss, row_grad, col_grad, scratch;
  Tensor grad_rows_acc, grad_cols_acc, scale_grad_rows;

  int64_t columns() const { return params.num_cols; }
  // The GEMMs read the dlogits as they are written.
  at::ScalarType dlogits_dtype() const { return operand_dtype; }
  std::vector<RowBlock> blocks() const { return row_blocks(rows(), block_rows); }

  template <typename acc_t>
  void fold_rows(const RowBlock& r, Tensor& tile) {
    matmul_into(tile, queries.narrow(0, r.start, r.count), keys.t(), /*accumulate=*/false);
  }

  template <typename acc_t>
  void rows_dlogits(const RowBlock& r, Tensor& tile, Tensor& dlogits) {
    // The params of this block's tile: its rows, every column.
    ContrastiveParams block = params;
    block.num_rows = r.count;
    block.chunk_start = 0;
    block.chunk_columns = params.num_cols;
    block.logits_stride = tile.stride(0);
    block.dlogits_stride = dlogits.stride(0);
    block.self_offset = params.self_offset + r.start;  // the masks follow the block's first row
    block.ids = params.ids.rows_from(r.start);
    if (params.symmetric) {  // one block: the tile holds every row
      backend.run(FUSEDLOSS_KERNELS(contrastive_chunk_column_lse<acc_t>), block, tile.data_ptr<acc_t>(),
                  scale.data_ptr<acc_t>(), positives.data_ptr<int64_t>() + r.start, lse_array_at<acc_t>(col_lse),
                  scratch.data_ptr<acc_t>());
    }
    with_typed_data<acc_t>(dlogits, [&](auto* out) {
      using grad_t = std::remove_pointer_t<decltype(out)>;
      backend.run(FUSEDLOSS_KERNELS(contrastive_single_pass_rows<acc_t, grad_t>), block, tile.data_ptr<acc_t>(),
                  scale.data_ptr<acc_t>(), positives.data_ptr<int64_t>() + r.start,
                  row_state_at<acc_t>(state, r.start), lse_array_at<const acc_t>(col_lse),
                  lse_array_at<acc_t>(row_lse, r.start), loss.data_ptr<acc_t>() + r.start,
                  row_grad.data_ptr<acc_t>() + r.start, params.symmetric ? col_grad.data_ptr<acc_t>() : nullptr,
                  out, scale_grad_rows.defined() ? scale_grad_rows.data_ptr<acc_t>() + r.start : nullptr);
    });
  }

  void rows_gradients(const RowBlock& r, const Tensor& dlogits) {
    if (need_rows) {
      Tensor grad_rows_block = grad_rows_acc.narrow(0, r.start, r.count);
      matmul_into(grad_rows_block, dlogits, keys, /*accumulate=*/false);
    }
    if (need_cols) matmul_into(grad_cols_acc, dlogits.t(), queries.narrow(0, r.start, r.count), r.start > 0);
  }
};

// The recompute pair with the single pass's interface, for when no block of
// min_block_rows (the symmetric loss: no whole tile) fits the budget.
std::tuple<Tensor, Tensor, Tensor, Tensor> contrastive_recompute_sum_and_grad(
    const Tensor& rows, const Tensor& cols, const Tensor& positives, const Tensor& scale,
    const IdArgs& ids, std::optional<int64_t> self_offset, bool symmetric, const Tensor& grad_rows,
    std::array<bool, 3> output_mask) {
  ContrastiveForward forward(rows, cols, positives, scale, ids, self_offset, symmetric, 0);
  forward.run();
  ContrastiveBackward backward(rows, cols, positives, scale, ids, self_offset, symmetric, 0);
  auto [grad_q, grad_k, grad_scale] =
      backward.run(grad_rows, forward.row_lse, forward.col_lse, rows, cols, scale, output_mask);
  return {forward.loss.mul(grad_rows).sum(), grad_q, grad_k, grad_scale};
}

// The loss and gradients of sum_i loss_i / normalizer (a 0-dim tensor, or
// none for 1) formed in the forward, so that the autograd backward only
// scales them; memory_budget bounds the tile (+ fp32 dK accumulator) in bytes
// (0: default_memory_budget), row_block > 0 forces the block size.
std::tuple<Tensor, Tensor, Tensor, Tensor> contrastive_sum_and_grad(
    const Tensor& rows, const Tensor& cols, const Tensor& positives, const Tensor& scale,
    const std::optional<Tensor>& normalizer, const std::optional<Tensor>& row_ids,
    const std::optional<Tensor>& col_ids, std::optional<int64_t> self_offset, at::IntArrayRef id_columns,
    at::ArrayRef<double> id_penalty, bool symmetric, int64_t row_block, int64_t memory_budget,
    std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(rows.device());
  const IdArgs ids{row_ids, col_ids, id_columns, id_penalty};
  check_contrastive(rows, cols, positives, scale, ids, self_offset);
  checks::normalizer(kOp, normalizer, rows);
  TORCH_CHECK_VALUE(memory_budget >= 0, kOp, ": memory_budget must be >= 0 bytes, got ", memory_budget);
  ContrastiveSinglePass pass(rows, cols, positives, scale, ids, self_offset, symmetric, 0);
  const int64_t num_rows = pass.rows(), num_cols = pass.columns(), dim = rows.size(1);
  const auto acc_opts = rows.options().dtype(pass.acc_dtype);
  // Every pair's upstream gradient: 1 / normalizer, without a host sync.
  const Tensor grad_pairs = normalized_row_grads(normalizer, num_rows, acc_opts);
  // The fp32 dK (half-precision keys; an fp32 dK is the output itself).
  const bool half_keys = pass.operand_dtype != pass.acc_dtype;
  const int64_t accumulator_bytes = half_keys && output_mask[1] ? 4 * num_cols * dim : 0;
  pass.block_rows = choose_block_rows(num_rows, num_cols, row_block, memory_budget, accumulator_bytes, rows.is_cuda());
  if (pass.block_rows == 0 || (symmetric && pass.block_rows < num_rows)) {
    return contrastive_recompute_sum_and_grad(rows, cols, positives, scale, ids, self_offset, symmetric, grad_pairs,
                                              output_mask);
  }
  pass.need_rows = output_mask[0];
  pass.need_cols = output_mask[1];
  pass.state = pass.empty_row_state();
  pass.row_lse = at::empty({2, num_rows}, acc_opts);
  pass.col_lse = at::empty({2, symmetric ? num_cols : 0}, acc_opts);
  pass.loss = at::empty({num_rows}, acc_opts);
  // The dlogits are formed for an upstream gradient of 1 per pair and the
  // GEMMs' fp32 results scaled by 1 / normalizer afterwards: scaled first, a
  // mean's dlogits (≈ p / B) would underflow in fp16.
  pass.row_grad = pass.row_term_grads(at::ones({num_rows}, acc_opts));
  if (symmetric) pass.col_grad = pass.column_grads(pass.row_grad);
  pass.scratch = pass.column_scratch(num_cols);
  // dQ rows come from one GEMM per block, dK from one GEMM (one block) or an
  // accumulation over blocks: both in fp32, rounded once at the end.
  pass.grad_rows_acc = pass.need_rows ? empty_buffer({num_rows, dim}, acc_opts) : Tensor();
  pass.grad_cols_acc = !pass.need_cols ? Tensor()
                       : num_rows > 0  ? empty_buffer({num_cols, dim}, acc_opts)
                                       : zeros_buffer({num_cols, dim}, acc_opts);
  pass.scale_grad_rows = output_mask[2] ? at::zeros({num_rows}, acc_opts) : Tensor();
  single_pass(pass);
  const Tensor inverse = grad_pairs.numel() > 0 ? grad_pairs[0] : at::ones({}, acc_opts);
  const Tensor total = pass.loss.mul(grad_pairs).sum();
  const auto finish = [&](const Tensor& acc, const Tensor& like) {
    return acc.defined() ? to_buffer(acc.mul_(inverse), like.scalar_type()) : at::empty({0}, like.options());
  };
  Tensor grad_scale = output_mask[2] ? pass.scale_grad_rows.sum().mul_(inverse).to(scale.scalar_type())
                                     : at::empty({0}, acc_opts);
  return {total, finish(pass.grad_rows_acc, rows), finish(pass.grad_cols_acc, cols), grad_scale};
}

std::tuple<Tensor, Tensor, Tensor> contrastive_forward(const Tensor& rows, const Tensor& cols,
                                                       const Tensor& positives, const Tensor& scale,
                                                       const std::optional<Tensor>& row_ids,
                                                       const std::optional<Tensor>& col_ids,
                                                       std::optional<int64_t> self_offset,
                                                       at::IntArrayRef id_columns, at::ArrayRef<double> id_penalty,
                                                       bool symmetric, int64_t tile_size) {
  c10::DeviceGuard guard(rows.device());
  const IdArgs ids{row_ids, col_ids, id_columns, id_penalty};
  check_contrastive(rows, cols, positives, scale, ids, self_offset);
  ContrastiveForward pass(rows, cols, positives, scale, ids, self_offset, symmetric, tile_size);
  pass.run();
  return {pass.loss, pass.row_lse, pass.col_lse};
}

// Checks only the sizes of what the forward produced.
std::tuple<Tensor, Tensor, Tensor> contrastive_backward(const Tensor& grad_loss, const Tensor& rows,
                                                        const Tensor& cols, const Tensor& positives,
                                                        const Tensor& scale, const std::optional<Tensor>& row_ids,
                                                        const std::optional<Tensor>& col_ids, const Tensor& row_lse,
                                                        const Tensor& col_lse, std::optional<int64_t> self_offset,
                                                        at::IntArrayRef id_columns, at::ArrayRef<double> id_penalty,
                                                        bool symmetric, int64_t tile_size,
                                                        std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(rows.device());
  ContrastiveBackward pass(rows, cols, positives, scale, IdArgs{row_ids, col_ids, id_columns, id_penalty}, self_offset,
                           symmetric, tile_size);
  return pass.run(grad_loss, row_lse, col_lse, rows, cols, scale, output_mask);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def(
      "contrastive_forward(Tensor rows, Tensor cols, Tensor positives, Tensor scale, Tensor? row_ids, "
      "Tensor? col_ids, int? self_offset, int[] id_columns, float[] id_penalty, bool symmetric, int tile_size) -> "
      "(Tensor loss, Tensor row_lse, Tensor col_lse)");
  m.def(
      "contrastive_backward(Tensor grad_loss, Tensor rows, Tensor cols, Tensor positives, Tensor scale, "
      "Tensor? row_ids, Tensor? col_ids, Tensor row_lse, Tensor col_lse, int? self_offset, int[] id_columns, "
      "float[] id_penalty, bool symmetric, int tile_size, bool[3] output_mask) -> "
      "(Tensor grad_rows, Tensor grad_cols, Tensor grad_scale)");
  m.def(
      "contrastive_sum_and_grad(Tensor rows, Tensor cols, Tensor positives, Tensor scale, Tensor? normalizer, "
      "Tensor? row_ids, Tensor? col_ids, int? self_offset, int[] id_columns, float[] id_penalty, bool symmetric, "
      "int row_block, "
      "int memory_budget, bool[3] output_mask) -> "
      "(Tensor loss_sum, Tensor grad_rows, Tensor grad_cols, Tensor grad_scale)");
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
  m.impl("contrastive_sum_and_grad", &contrastive_sum_and_grad);
}

#ifdef FUSEDLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
  m.impl("contrastive_sum_and_grad", &contrastive_sum_and_grad);
}
#endif

}  // namespace fusedloss
