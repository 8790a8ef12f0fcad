// Binding layer of the fused linear cross-entropy: the argument check (run
// once, by the forward op), the family's chunk logits / row kernels for the
// shared chunk driver, the single-pass row-block loop, and the op schemas.
// Registered as torch ops fusedloss::linear_ce_*.
//
// Memory: besides the outputs, one [N, chunk] fp32 logits tile (plus a
// half-precision dlogits tile on CUDA), the [4, N] row state ([5, N] + an
// int64 argmax with statistics), the fp32 dX
// accumulator [N, D] and the fp32 bias-gradient accumulator [V]. Never N x V.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "fusedloss/backend.h"
#include "fusedloss/checks.h"
#include "fusedloss/chunk_driver.h"
#include "fusedloss/gemm.h"
#include "fusedloss/linear_ce.h"

namespace fusedloss {
namespace {

using at::Tensor;

constexpr const char* kOp = "linear_cross_entropy";

// Every check of a linear CE call. `vocab_start` / `num_classes` describe a
// vocabulary shard: weight holds rows [vocab_start, vocab_start + V_local) of a
// num_classes-row classifier (the single-device ops pass 0 and V_local).
// Targets range over all num_classes.
void check_linear_ce(const Tensor& input, const Tensor& weight, const Tensor& target,
                     const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight,
                     int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                     int64_t vocab_start, std::optional<int64_t> num_classes) {
  checks::classifier(kOp, input, weight, bias);
  checks::index_tensor(kOp, "target", target, input);
  TORCH_CHECK_VALUE(target.numel() == input.size(0), kOp, ": target has ", target.numel(),
                    " elements but input has ", input.size(0), " rows");
  const int64_t classes = num_classes.value_or(weight.size(0));
  TORCH_CHECK_VALUE(vocab_start >= 0 && vocab_start + weight.size(0) <= classes, kOp,
                    ": the weight shard covers classes [", vocab_start, ", ", vocab_start + weight.size(0),
                    ") which is not inside [0, num_classes=", classes, ")");
  if (class_weight.has_value()) {
    TORCH_CHECK_VALUE(class_weight->dim() == 1 && class_weight->size(0) == classes, kOp,
                      ": class_weight must be [num_classes]=[", classes, "], got shape ", class_weight->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(class_weight->scalar_type()), kOp,
                     ": class_weight must be a floating tensor, got ", class_weight->scalar_type());
    TORCH_CHECK_VALUE(class_weight->device() == input.device(), kOp, ": class_weight is on ", class_weight->device(),
                      " but input is on ", input.device());
  }
  checks::in_range(kOp, "label_smoothing", label_smoothing, 0.0, 1.0);
  checks::non_negative(kOp, "z_loss", z_loss);
  checks::non_negative(kOp, "softcap", softcap);
  checks::index_range(kOp, "target", target, classes, ignore_index);
}

// Validated operands prepared for the kernels: contiguous, in the dtypes the
// GEMMs and kernels want. Checks nothing (the forward op did).
struct LinearCEProblem {
  Tensor input;   // [N, D] in the GEMM operand dtype, ignored rows zeroed
  Tensor weight;  // [V, D] as given (converted chunk by chunk on the CPU)
  Tensor target;  // [N] int64
  Tensor bias;    // [V] in the accumulation dtype, or undefined
  Tensor class_weight;        // [num_classes] in the accumulation dtype, or undefined
  Tensor class_weight_total;  // its sum, a device scalar (no host sync)
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  LinearCEParams params;
  int64_t vocab_start;  // vocabulary index of weight's first row (0 unless sharded)
  Backend backend;
  std::vector<Chunk> chunk_list;
  Tensor weight_chunk;  // operand rows of the chunk last formed (the dX GEMM reuses them)

  LinearCEProblem(const Tensor& input_, const Tensor& weight_, const Tensor& target_,
                  const std::optional<Tensor>& bias_, const std::optional<Tensor>& class_weight_,
                  int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                  int64_t requested_chunk, bool with_stats = false, int64_t vocab_start_ = 0,
                  std::optional<int64_t> num_classes = std::nullopt)
      : vocab_start(vocab_start_), backend(input_) {
    acc_dtype = accumulation_dtype(input_.scalar_type());
    operand_dtype = gemm_operand_dtype(input_);
    target = target_.contiguous().view(-1);
    // An ignored row takes no part in any GEMM (see zero_rows_where).
    input = zero_rows_where(input_.contiguous().to(operand_dtype), target.eq(ignore_index));
    weight = weight_.contiguous();
    if (bias_.has_value()) bias = bias_->contiguous().to(acc_dtype);
    if (class_weight_.has_value()) {
      class_weight = class_weight_->contiguous().to(acc_dtype);
      class_weight_total = class_weight.sum();
    }
    const int64_t rows = input.size(0), total_classes = num_classes.value_or(weight.size(0));
    params = LinearCEParams{rows,   total_classes, 0, 0, 0, 0, ignore_index, label_smoothing, z_loss, softcap,
                            false, with_stats};
    chunk_list = column_chunks(classes(), chunk_columns_for(rows, classes(), requested_chunk, input.is_cuda()));
  }

  int64_t rows() const { return input.size(0); }
  // Rows of the (local) weight: the columns the chunks walk.
  int64_t classes() const { return weight.size(0); }
  const std::vector<Chunk>& chunks() const { return chunk_list; }
  at::TensorOptions options() const { return input.options(); }

  // Raw logits of rows [row_start, row_start + logits.size(0)) against the
  // chunk's vocabulary columns; points `params` at that tile.
  void tile_logits(const Chunk& c, Tensor& logits, int64_t row_start = 0) {
    weight_chunk = weight.narrow(0, c.start, c.columns).to(operand_dtype);
    matmul_into(logits, input.narrow(0, row_start, logits.size(0)), weight_chunk.t(), /*accumulate=*/false);
    params.num_rows = logits.size(0);
    params.chunk_start = vocab_start + c.start;
    params.chunk_columns = c.columns;
    params.logits_stride = logits.stride(0);
    params.dlogits_stride = logits.stride(0);
  }

  template <typename acc_t>
  void chunk_logits(const Chunk& c, Tensor& logits) {
    tile_logits(c, logits);
  }

  template <typename acc_t>
  const acc_t* bias_at(int64_t column) const {
    return bias.defined() ? bias.data_ptr<acc_t>() + column : nullptr;
  }

  template <typename acc_t>
  ClassWeights<acc_t> class_weights() const {
    if (!class_weight.defined()) return {nullptr, nullptr};
    return {class_weight.data_ptr<acc_t>(), class_weight_total.data_ptr<acc_t>()};
  }

  // Rows from `row` on of the state and, with statistics, the argmax.
  template <typename acc_t>
  LinearCERowState<acc_t> row_state(const Tensor& state, const Tensor& argmax, int64_t row) const {
    const auto at_row = [&](int64_t i) { return state[i].data_ptr<acc_t>() + row; };
    return {at_row(0), at_row(1), at_row(2), at_row(3), params.with_stats ? at_row(4) : nullptr,
            params.with_stats ? argmax.data_ptr<int64_t>() + row : nullptr};
  }

  // The row state of empty rows: [4, N] (max, sum_exp, sum_logits,
  // target_logit), + shifted (the entropy term) with statistics.
  Tensor empty_row_state() const {
    Tensor state = at::zeros({params.with_stats ? 5 : 4, rows()}, options().dtype(acc_dtype));
    state[0].fill_(-std::numeric_limits<double>::infinity());
    return state;
  }
  // The statistics' argmax ([N] int64; [0] without statistics).
  Tensor empty_argmax() const { return at::zeros({params.with_stats ? rows() : 0}, options().dtype(at::kLong)); }
};

// The per-row statistics of a finished row state: lse [N], argmax [N] and
// entropy [N] = log(sum_exp) - shifted / sum_exp (SoftmaxStats::entropy,
// on N elements); three empty tensors without statistics.
std::tuple<Tensor, Tensor, Tensor> row_statistics(const LinearCEProblem& problem, const Tensor& state,
                                                  const Tensor& lse_parts, const Tensor& argmax) {
  if (!problem.params.with_stats) {
    const auto acc_opts = problem.options().dtype(problem.acc_dtype);
    return {at::empty({0}, acc_opts), argmax, at::empty({0}, acc_opts)};  // distinct: op outputs may not alias
  }
  return {lse_parts.sum(0), argmax, state[1].log() - state[4] / state[1]};
}

// The chunked forward: per-row loss, lse parts [2, N] (max, log-sum) and the
// row state [4, N] of the weight's columns.
struct LinearCEForward : LinearCEProblem {
  using LinearCEProblem::LinearCEProblem;
  Tensor state, argmax, lse, loss;

  template <typename acc_t>
  void fold(const Chunk& c, Tensor& logits) {
    backend.run(FUSEDLOSS_KERNELS(linear_ce_accumulate_chunk<acc_t>), params, logits.data_ptr<acc_t>(),
                bias_at<acc_t>(c.start), class_weights<acc_t>(), target.data_ptr<int64_t>(),
                row_state<acc_t>(state, argmax, 0));
  }
  template <typename acc_t>
  void finalize() {
    backend.run(FUSEDLOSS_KERNELS(linear_ce_finalize<acc_t>), params, target.data_ptr<int64_t>(),
                class_weights<acc_t>(), row_state<acc_t>(state, argmax, 0), lse_array_at<acc_t>(lse),
                loss.data_ptr<acc_t>());
  }

  void run() {
    const auto acc_opts = options().dtype(acc_dtype);
    state = empty_row_state();
    argmax = empty_argmax();
    lse = at::empty({2, rows()}, acc_opts);
    loss = at::empty({rows()}, acc_opts);
    forward_chunks(*this);
  }
};

// The recompute backward: dX accumulates over chunks in fp32; each dW row is
// produced by exactly one GEMM (rounded once, no fp32 V x D buffer); db from
// column sums.
struct LinearCEBackward : LinearCEProblem {
  using LinearCEProblem::LinearCEProblem;
  Tensor lse, grad_rows;
  bool need_input = false, need_weight = false, need_bias = false;
  Tensor grad_input_acc, grad_weight, grad_bias_acc;

  // dlogits of the tile in `logits`, scaled by grad_rows, into the workspace
  // (the tile itself, or a buffer in the GEMM operand dtype).
  template <typename acc_t>
  Tensor chunk_dlogits(const Chunk& c, Tensor& logits, Tensor& dlogits_workspace) {
    params.dlogits_stride = dlogits_workspace.stride(0);
    with_typed_data<acc_t>(dlogits_workspace, [&](auto* out) {
      using grad_t = std::remove_pointer_t<decltype(out)>;
      backend.run(FUSEDLOSS_KERNELS(linear_ce_chunk_grad<acc_t, grad_t>), params, logits.data_ptr<acc_t>(),
                  bias_at<acc_t>(c.start), class_weights<acc_t>(), target.data_ptr<int64_t>(),
                  lse_array_at<const acc_t>(lse), grad_rows.data_ptr<acc_t>(), out);
    });
    return dlogits_workspace;
  }

  void chunk_gradients(const Chunk& c, const Tensor& dlogits) {
    if (need_input) matmul_into(grad_input_acc, dlogits, weight_chunk, /*accumulate=*/true);
    if (need_weight) {
      Tensor grad_weight_chunk = grad_weight.narrow(0, c.start, c.columns);
      matmul_into(grad_weight_chunk, dlogits.t(), input, /*accumulate=*/false);
    }
    if (need_bias) grad_bias_acc.narrow(0, c.start, c.columns).add_(dlogits.sum(0, false, acc_dtype));
  }

  std::tuple<Tensor, Tensor, Tensor> run(const Tensor& grad_loss, const Tensor& lse_in, const Tensor& input_,
                                         const Tensor& weight_, std::array<bool, 3> output_mask) {
    const int64_t n = rows();
    TORCH_CHECK_VALUE(grad_loss.numel() == n && lse_in.numel() == 2 * n, "linear_ce_backward: grad_loss must have N=",
                      n, " elements and lse [2, N]");
    need_input = output_mask[0];
    need_weight = output_mask[1];
    need_bias = output_mask[2] && bias.defined();
    const auto acc_opts = options().dtype(acc_dtype);
    grad_rows = grad_loss.reshape({n}).to(acc_dtype).contiguous();
    lse = lse_in.reshape({2, n}).to(acc_dtype).contiguous();
    grad_input_acc = need_input ? zeros_buffer({n, input.size(1)}, acc_opts) : Tensor();
    grad_weight = need_weight ? empty_buffer(weight_.sizes(), weight_.options()) : at::empty({0}, weight_.options());
    grad_bias_acc = need_bias ? at::zeros({classes()}, acc_opts) : Tensor();
    if (n == 0 && need_weight) grad_weight.zero_();
    if (need_input || need_weight || need_bias) backward_chunks(*this);
    Tensor grad_input = need_input ? to_buffer(grad_input_acc, input_.scalar_type()) : at::empty({0}, input_.options());
    Tensor grad_bias = need_bias ? grad_bias_acc.to(input_.scalar_type()) : at::empty({0}, input_.options());
    return {grad_input, grad_weight, grad_bias};
  }
};

// Per-row loss and lse parts [2, N]; with `stats` also argmax [N] and entropy
// [N] (empty [0] tensors without).
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_ce_forward(
    const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& class_weight, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, int64_t chunk_size, bool stats) {
  c10::DeviceGuard guard(input.device());
  check_linear_ce(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, 0,
                  std::nullopt);
  LinearCEForward pass(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                       chunk_size, stats);
  pass.run();
  auto [lse, argmax, entropy] = row_statistics(pass, pass.state, pass.lse, pass.argmax);
  return {pass.loss, pass.lse, argmax, entropy};
}

// The checks of a (possibly sharded) linear CE call as an op of its own:
// fusedloss.distributed runs it on every rank before any collective, so that a
// bad argument raises everywhere instead of hanging the others.
void linear_ce_check(const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
                     const std::optional<Tensor>& class_weight, int64_t ignore_index, double label_smoothing,
                     double z_loss, double softcap, int64_t vocab_start, int64_t num_classes) {
  check_linear_ce(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                  vocab_start, num_classes);
}

// Vocabulary-parallel forward: the statistics of this shard's columns only,
// which the caller combines across ranks (fusedloss/distributed). lse holds
// the shard-local log-sum-exp parts [2, N] (max, log-sum), target_logit is 0
// where the target lies in another shard, sum_logits sums the shard's
// (softcapped) logits (Σ_j w_j y_j with class weights, which are the whole
// vocabulary's [num_classes]). With `stats`, argmax is the shard's first
// column (a vocabulary index) holding its max and shifted its
// Σ exp(y - max)·(y - max) (SoftmaxStats); [0] without. Targets range over
// [0, num_classes). The caller has run linear_ce_check.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_ce_shard_forward(
    const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& class_weight, int64_t ignore_index, double softcap, int64_t vocab_start,
    int64_t num_classes, int64_t chunk_size, bool stats) {
  c10::DeviceGuard guard(input.device());
  LinearCEForward pass(input, weight, target, bias, class_weight, ignore_index, 0.0, 0.0, softcap, chunk_size, stats,
                       vocab_start, num_classes);
  pass.run();
  const Tensor shifted = stats ? pass.state[4].clone() : at::empty({0}, pass.lse.options());
  return {pass.lse, pass.state[3].clone(), pass.state[2].clone(), pass.argmax, shifted};
}

// With a vocabulary shard, lse is the GLOBAL one (combined across ranks) and
// the gradient is that of this shard's columns of the full softmax. Checks
// only the sizes of what the forward produced.
std::tuple<Tensor, Tensor, Tensor> linear_ce_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const Tensor& target,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight, const Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, int64_t chunk_size,
    std::array<bool, 3> output_mask, int64_t vocab_start, std::optional<int64_t> num_classes) {
  c10::DeviceGuard guard(input.device());
  LinearCEBackward pass(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                        chunk_size, false, vocab_start, num_classes);
  return pass.run(grad_loss, lse, input, weight, output_mask);
}

// sum_i loss_i / normalizer and its gradients, in one pass over row blocks
// (chunk_driver.h's single_pass): 6·N·D·V FLOPs instead of the recompute
// pair's 8. dX rows come from one GEMM per block; dW is written by its GEMM
// when there is one block, else accumulated over blocks in fp32 (the
// gradient itself for an fp32 weight) and rounded once; db from column sums.
struct LinearCESinglePass : LinearCEProblem {
  using LinearCEProblem::LinearCEProblem;
  int64_t block_rows = 0;
  bool need_input = false, need_weight = false, need_bias = false;
  Tensor state, argmax, lse, loss, grad_rows;
  Tensor grad_input, grad_weight_acc, grad_bias_acc;
  const Chunk vocabulary() const { return {0, classes()}; }

  int64_t columns() const { return classes(); }
  // The GEMMs read the dlogits as they are written.
  at::ScalarType dlogits_dtype() const { return operand_dtype; }
  std::vector<RowBlock> blocks() const { return row_blocks(rows(), block_rows); }

  template <typename acc_t>
  void fold_rows(const RowBlock& r, Tensor& tile) {
    tile_logits(vocabulary(), tile, r.start);
  }

  // One row kernel folds, finalizes and differentiates the block's rows.
  template <typename acc_t>
  void rows_dlogits(const RowBlock& r, Tensor& tile, Tensor& dlogits) {
    params.dlogits_stride = dlogits.stride(0);
    with_typed_data<acc_t>(dlogits, [&](auto* out) {
      using grad_t = std::remove_pointer_t<decltype(out)>;
      backend.run(FUSEDLOSS_KERNELS(linear_ce_single_pass_rows<acc_t, grad_t>), params, tile.data_ptr<acc_t>(),
                  bias_at<acc_t>(0), class_weights<acc_t>(), target.data_ptr<int64_t>() + r.start,
                  row_state<acc_t>(state, argmax, r.start), lse_array_at<acc_t>(lse, r.start),
                  loss.data_ptr<acc_t>() + r.start, grad_rows.data_ptr<acc_t>() + r.start, out);
    });
  }

  void rows_gradients(const RowBlock& r, const Tensor& dlogits) {
    if (need_input) {
      Tensor grad_input_rows = grad_input.narrow(0, r.start, r.count);
      matmul_into(grad_input_rows, dlogits, weight_chunk, /*accumulate=*/false);
    }
    if (need_weight) {
      matmul_into(grad_weight_acc, dlogits.t(), input.narrow(0, r.start, r.count), /*accumulate=*/r.start > 0);
    }
    if (need_bias) grad_bias_acc.add_(dlogits.sum(0, false, acc_dtype));
  }
};

using SumAndGrad = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Recompute pair for when no block of min_block_rows fits the budget: the
// chunked forward, then the chunked backward with the same per-row gradient.
SumAndGrad recompute_sum_and_grad(const Tensor& input, const Tensor& weight, const Tensor& target,
                                  const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight,
                                  int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                                  const Tensor& grad_rows, std::array<bool, 3> output_mask, bool stats) {
  LinearCEForward forward(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, 0,
                          stats);
  forward.run();
  LinearCEBackward backward(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                            0);
  auto [gi, gw, gb] = backward.run(grad_rows, forward.lse, input, weight, output_mask);
  const Tensor total = forward.loss.mul(grad_rows.to(forward.loss.scalar_type())).sum();
  auto [lse, argmax, entropy] = row_statistics(forward, forward.state, forward.lse, forward.argmax);
  return {total, gi, gw, gb, lse, argmax, entropy};
}

// The loss and gradients of sum_i loss_i / normalizer (normalizer: a 0-dim
// tensor, or none for 1) formed in the forward, so that the autograd backward
// only scales them; with `stats` also the rows' lse, argmax and entropy
// (empty [0] tensors without). memory_budget bounds the tile (+ fp32 dW
// accumulator) in bytes (0: default_memory_budget); row_block > 0 forces the
// block size.
SumAndGrad linear_ce_sum_and_grad(const Tensor& input, const Tensor& weight, const Tensor& target,
                                  const std::optional<Tensor>& bias, const std::optional<Tensor>& class_weight,
                                  const std::optional<Tensor>& normalizer, int64_t ignore_index,
                                  double label_smoothing, double z_loss, double softcap, int64_t row_block,
                                  int64_t memory_budget, bool stats, std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(input.device());
  check_linear_ce(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap, 0,
                  std::nullopt);
  checks::normalizer(kOp, normalizer, input);
  TORCH_CHECK_VALUE(memory_budget >= 0, kOp, ": memory_budget must be >= 0 bytes, got ", memory_budget);
  LinearCESinglePass pass(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                          0, stats);
  const int64_t rows = pass.rows(), classes = pass.classes(), dim = input.size(1);
  const auto acc_opts = input.options().dtype(pass.acc_dtype);
  // Every row's upstream gradient: 1 / normalizer, without a host sync.
  const Tensor grad_rows = normalized_row_grads(normalizer, rows, acc_opts);
  const bool half_weight = weight.scalar_type() != pass.acc_dtype;
  const int64_t accumulator_bytes = half_weight && output_mask[1] ? 4 * classes * dim : 0;
  pass.block_rows = choose_block_rows(rows, classes, row_block, memory_budget, accumulator_bytes, input.is_cuda());
  if (pass.block_rows == 0) {
    return recompute_sum_and_grad(input, weight, target, bias, class_weight, ignore_index, label_smoothing, z_loss,
                                  softcap, grad_rows, output_mask, stats);
  }
  pass.need_input = output_mask[0];
  pass.need_weight = output_mask[1];
  pass.need_bias = output_mask[2] && bias.has_value();
  pass.grad_rows = grad_rows;
  pass.state = pass.empty_row_state();
  pass.argmax = pass.empty_argmax();
  pass.lse = at::empty({2, rows}, acc_opts);
  pass.loss = at::empty({rows}, acc_opts);
  const bool one_block = pass.block_rows >= rows;
  // One block: its GEMM writes dW in the weight's dtype (rounded once); more:
  // an fp32 accumulator, rounded once at the end.
  pass.grad_input = pass.need_input ? empty_buffer({rows, dim}, input.options()) : at::empty({0}, input.options());
  pass.grad_weight_acc = !pass.need_weight ? at::empty({0}, weight.options())
                         : one_block && rows > 0 ? empty_buffer({classes, dim}, weight.options())
                                                 : zeros_buffer({classes, dim}, weight.options().dtype(pass.acc_dtype));
  pass.grad_bias_acc = pass.need_bias ? at::zeros({classes}, acc_opts) : at::empty({0}, acc_opts);
  single_pass(pass);
  const Tensor total = pass.loss.mul(grad_rows).sum();
  Tensor grad_weight = pass.need_weight ? to_buffer(pass.grad_weight_acc, weight.scalar_type()) : pass.grad_weight_acc;
  Tensor grad_bias = pass.need_bias ? pass.grad_bias_acc.to(bias->scalar_type()) : at::empty({0}, input.options());
  auto [lse, argmax, entropy] = row_statistics(pass, pass.state, pass.lse, pass.argmax);
  return {total, pass.grad_input, grad_weight, grad_bias, lse, argmax, entropy};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  // `lse` outputs/inputs are LseParts [2, N]: row max and log-sum (numerics.h).
  // `class_weight` is F.cross_entropy's weight= ([num_classes]); `stats` asks
  // for the per-row lse [N], argmax [N] and entropy [N] ([0] tensors without).
  m.def(
      "linear_ce_forward(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, int chunk_size, bool stats=False) -> "
      "(Tensor loss, Tensor lse, Tensor argmax, Tensor entropy)");
  m.def(
      "linear_ce_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor? class_weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap, "
      "int chunk_size, bool[3] output_mask, int vocab_start=0, int? num_classes=None) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_ce_check(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, int vocab_start, int num_classes) -> ()");
  m.def(
      "linear_ce_shard_forward(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "int ignore_index, float softcap, int vocab_start, int num_classes, int chunk_size, bool stats=False) -> "
      "(Tensor lse, Tensor target_logit, Tensor sum_logits, Tensor argmax, Tensor shifted)");
  m.def(
      "linear_ce_sum_and_grad(Tensor input, Tensor weight, Tensor target, Tensor? bias, Tensor? class_weight, "
      "Tensor? normalizer, int ignore_index, float label_smoothing, float z_loss, float softcap, int row_block, "
      "int memory_budget, bool stats, bool[3] output_mask) -> (Tensor loss_sum, Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias, Tensor lse, Tensor argmax, Tensor entropy)");
}

// Shape, dtype and device checks hold for any tensor (meta included); target
// values are scanned where they can be read.
TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("linear_ce_check", &linear_ce_check);
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("linear_ce_forward", &linear_ce_forward);
  m.impl("linear_ce_backward", &linear_ce_backward);
  m.impl("linear_ce_shard_forward", &linear_ce_shard_forward);
  m.impl("linear_ce_sum_and_grad", &linear_ce_sum_and_grad);
}

#ifdef FUSEDLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("linear_ce_forward", &linear_ce_forward);
  m.impl("linear_ce_backward", &linear_ce_backward);
  m.impl("linear_ce_shard_forward", &linear_ce_shard_forward);
  m.impl("linear_ce_sum_and_grad", &linear_ce_sum_and_grad);
}
#endif

}  // namespace fusedloss
