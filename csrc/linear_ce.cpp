// Binding layer of the fused linear cross-entropy: argument validation, the
// chunk loop with its GEMMs, and dispatch of the per-chunk kernels to the CPU or
// CUDA backend. Registered as torch ops fusedloss::linear_ce_forward/backward.
//
// Memory: besides the outputs, one [N, chunk] fp32 logits tile (plus a
// half-precision dlogits tile on CUDA), the [4, N] row state, the fp32 dX
// accumulator [N, D] and the fp32 bias-gradient accumulator [V]. Never N x V.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "fusedloss/gemm.h"
#include "fusedloss/linear_ce.h"

#ifdef FUSEDLOSS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace fusedloss {
namespace {

using at::Tensor;

// `vocab_start` / `num_classes` describe a vocabulary shard: weight holds rows
// [vocab_start, vocab_start + V_local) of a num_classes-row classifier (the
// single-device ops pass 0 and V_local). Targets range over all num_classes.
void check_linear_ce_args(const Tensor& input, const Tensor& weight, const Tensor& target,
                          const std::optional<Tensor>& bias, double label_smoothing, double z_loss,
                          double softcap, int64_t ignore_index, int64_t vocab_start, int64_t num_classes) {
  TORCH_CHECK_VALUE(input.dim() == 2, "linear_cross_entropy: input must be [N, D] after flattening, got ",
                    input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "linear_cross_entropy: weight must be 2-D [V, D], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), "linear_cross_entropy: input has D=", input.size(1),
                    " features but weight has D=", weight.size(1), " (weight must be [V, D])");
  TORCH_CHECK_VALUE(weight.size(0) > 0, "linear_cross_entropy: weight has no rows (V=0)");
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()),
                   "linear_cross_entropy: input must be float32, float64, bfloat16 or float16, got ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), "linear_cross_entropy: weight dtype ",
                   weight.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "linear_cross_entropy: target must be int64, got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.numel() == input.size(0), "linear_cross_entropy: target has ", target.numel(),
                    " elements but input has ", input.size(0), " rows");
  TORCH_CHECK_VALUE(weight.device() == input.device() && target.device() == input.device(),
                    "linear_cross_entropy: input (", input.device(), "), weight (", weight.device(),
                    ") and target (", target.device(), ") must be on the same device");
  TORCH_CHECK_VALUE(input.device().is_cpu() || input.device().is_cuda(),
                    "linear_cross_entropy: unsupported device ", input.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "linear_cross_entropy: bias must be [V]=[", weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "linear_cross_entropy: bias dtype ",
                     bias->scalar_type(), " differs from input dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), "linear_cross_entropy: bias is on ",
                      bias->device(), " but input is on ", input.device());
  }
  TORCH_CHECK_VALUE(vocab_start >= 0 && vocab_start + weight.size(0) <= num_classes,
                    "linear_cross_entropy: the weight shard covers classes [", vocab_start, ", ",
                    vocab_start + weight.size(0), ") which is not inside [0, num_classes=", num_classes, ")");
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "linear_cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0, "linear_cross_entropy: z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0.0, "linear_cross_entropy: softcap must be positive (or None), got ", softcap);
  if (input.is_cpu()) {
    // A host-side scan is free on the CPU; on CUDA the Python layer checks (one
    // sync, outside the op) and the kernels never index memory with a target.
    // Keep the contiguous copy alive while scanning it (a strided target).
    const Tensor flat = target.contiguous();
    const int64_t* t = flat.data_ptr<int64_t>();
    for (int64_t i = 0; i < flat.numel(); ++i) {
      TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < num_classes),
                        "linear_cross_entropy: target[", i, "]=", t[i], " is outside [0, ", num_classes,
                        ") and is not ignore_index=", ignore_index);
    }
  }
}

// Routes each per-chunk kernel to the device of the tensors it runs on.
struct ChunkKernels {
  bool cuda;
  void* stream = nullptr;

  explicit ChunkKernels(const Tensor& t) : cuda(t.is_cuda()) {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) stream = at::cuda::getCurrentCUDAStream().stream();
#else
    TORCH_CHECK(!cuda, "fusedloss was built without CUDA kernels; rebuild with FUSEDLOSS_FORCE_CUDA=1");
#endif
  }

  template <typename acc_t>
  void accumulate(const LinearCEParams& p, acc_t* logits, const acc_t* bias, const int64_t* target,
                  LinearCERowState<acc_t> state) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::linear_ce_accumulate_chunk(p, logits, bias, target, state, stream);
#endif
    cpu::linear_ce_accumulate_chunk(p, logits, bias, target, state);
  }

  template <typename acc_t>
  void finalize(const LinearCEParams& p, const int64_t* target, LinearCERowState<acc_t> state, LseArray<acc_t> lse,
                acc_t* loss) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::linear_ce_finalize(p, target, state, lse, loss, stream);
#endif
    cpu::linear_ce_finalize(p, target, state, lse, loss);
  }

  template <typename acc_t, typename grad_t>
  void grad(const LinearCEParams& p, const acc_t* logits, const acc_t* bias, const int64_t* target,
            LseArray<const acc_t> lse, const acc_t* grad_loss, grad_t* dlogits) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::linear_ce_chunk_grad(p, logits, bias, target, lse, grad_loss, dlogits, stream);
#endif
    if constexpr (std::is_same_v<acc_t, grad_t>) {
      cpu::linear_ce_chunk_grad(p, logits, bias, target, lse, grad_loss, dlogits);
    } else {
      TORCH_INTERNAL_ASSERT(false, "CPU dlogits are always in the accumulation dtype");
    }
  }
};

// Everything the ops share: validated, contiguous operands in the dtypes the
// GEMMs and kernels want, and the chunk geometry.
struct LinearCEProblem {
  Tensor input;   // [N, D] in the GEMM operand dtype
  Tensor weight;  // [V, D] as given (converted chunk by chunk on the CPU)
  Tensor target;  // [N] int64
  Tensor bias;    // [V] in the accumulation dtype, or undefined
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  LinearCEParams params;
  int64_t chunk_size;

  int64_t vocab_start;  // vocabulary index of weight's first row (0 unless sharded)

  LinearCEProblem(const Tensor& input_, const Tensor& weight_, const Tensor& target_,
                  const std::optional<Tensor>& bias_, int64_t ignore_index, double label_smoothing,
                  double z_loss, double softcap, int64_t requested_chunk, int64_t vocab_start_ = 0,
                  std::optional<int64_t> num_classes = std::nullopt)
      : vocab_start(vocab_start_) {
    const int64_t total_classes = num_classes.value_or(weight_.dim() == 2 ? weight_.size(0) : 0);
    check_linear_ce_args(input_, weight_, target_, bias_, label_smoothing, z_loss, softcap, ignore_index,
                         vocab_start, total_classes);
    acc_dtype = accumulation_dtype(input_.scalar_type());
    operand_dtype = gemm_operand_dtype(input_);
    target = target_.contiguous().view(-1);
    // An ignored row takes no part in any GEMM (see zero_rows_where).
    input = zero_rows_where(input_.contiguous().to(operand_dtype), target.eq(ignore_index));
    weight = weight_.contiguous();
    if (bias_.has_value()) bias = bias_->contiguous().to(acc_dtype);
    const int64_t rows = input.size(0);
    chunk_size = chunk_columns_for(rows, classes(), requested_chunk, input.is_cuda());
    params = LinearCEParams{rows, total_classes, 0, 0, 0, ignore_index, label_smoothing, z_loss, softcap, false};
  }

  int64_t rows() const { return params.num_rows; }
  // Rows of the (local) weight: the columns the chunk loops walk.
  int64_t classes() const { return weight.size(0); }

  // Raw logits of rows [row_start, row_start + row_count) against vocabulary
  // columns [start, start + columns), computed into the front of `workspace`;
  // points `params` at that tile. `weight_chunk` receives the operand rows.
  Tensor tile_logits(const Tensor& workspace, int64_t row_start, int64_t row_count, int64_t start,
                     int64_t columns, Tensor& weight_chunk) {
    weight_chunk = weight.narrow(0, start, columns).to(operand_dtype);
    Tensor logits = workspace.narrow(0, 0, row_count * columns).view({row_count, columns});
    matmul_into(logits, input.narrow(0, row_start, row_count), weight_chunk.t(), /*accumulate=*/false);
    params.num_rows = row_count;
    params.chunk_start = vocab_start + start;
    params.chunk_columns = columns;
    params.logits_stride = columns;
    return logits;
  }

  template <typename acc_t>
  const acc_t* bias_chunk(int64_t start) const {
    return bias.defined() ? bias.data_ptr<acc_t>() + start : nullptr;
  }
};

template <typename acc_t>
LinearCERowState<acc_t> row_state_at(const Tensor& state, int64_t row) {
  return {state[0].data_ptr<acc_t>() + row, state[1].data_ptr<acc_t>() + row, state[2].data_ptr<acc_t>() + row,
          state[3].data_ptr<acc_t>() + row};
}

Tensor empty_row_state(int64_t rows, const at::TensorOptions& acc_opts) {
  Tensor state = at::zeros({4, rows}, acc_opts);
  state[0].fill_(-std::numeric_limits<double>::infinity());
  return state;
}

// Writes dlogits of the tile held in `logits` into `dlogits` (same shape),
// picking the dlogits element type from the tensor.
template <typename acc_t>
void tile_grad(const ChunkKernels& kernels, const LinearCEProblem& prob, const Tensor& logits, Tensor& dlogits,
               int64_t row_start, int64_t column_start, const Tensor& lse, const Tensor& grad_rows) {
  const int64_t* tgt = prob.target.data_ptr<int64_t>() + row_start;
  const LseArray<const acc_t> row_lse = lse_array_at<const acc_t>(lse, row_start);
  const acc_t* grad_ptr = grad_rows.data_ptr<acc_t>() + row_start;
  const auto run = [&](auto* out) {
    kernels.grad(prob.params, logits.data_ptr<acc_t>(), prob.bias_chunk<acc_t>(column_start), tgt, row_lse,
                 grad_ptr, out);
  };
  if (dlogits.scalar_type() == prob.acc_dtype) {
    run(dlogits.data_ptr<acc_t>());
  } else if constexpr (std::is_same_v<acc_t, float>) {
    if (dlogits.scalar_type() == at::kBFloat16) run(dlogits.data_ptr<at::BFloat16>());
    else run(dlogits.data_ptr<at::Half>());
  }
}

// The chunked forward pass: fills the row state [4, N] (max, sum_exp,
// sum_logits, target_logit), the per-row lse parts [2, N] (max, log-sum) and
// loss of the weight's columns.
void forward_chunks(LinearCEProblem& prob, Tensor& state, Tensor& lse, Tensor& loss) {
  const int64_t rows = prob.rows(), classes = prob.classes();
  const auto acc_opts = prob.input.options().dtype(prob.acc_dtype);
  state = empty_row_state(rows, acc_opts);
  lse = at::empty({2, rows}, acc_opts);
  loss = at::empty({rows}, acc_opts);
  if (rows == 0) return;
  Tensor workspace = at::empty({rows * prob.chunk_size}, acc_opts);
  const ChunkKernels kernels(prob.input);

  AT_DISPATCH_FLOATING_TYPES(prob.acc_dtype, "linear_ce_forward", [&] {
    using acc_t = scalar_t;
    const int64_t* tgt = prob.target.data_ptr<int64_t>();
    for (int64_t start = 0; start < classes; start += prob.chunk_size) {
      Tensor weight_chunk;
      Tensor logits =
          prob.tile_logits(workspace, 0, rows, start, std::min(prob.chunk_size, classes - start), weight_chunk);
      kernels.accumulate(prob.params, logits.data_ptr<acc_t>(), prob.bias_chunk<acc_t>(start), tgt,
                         row_state_at<acc_t>(state, 0));
    }
    kernels.finalize(prob.params, tgt, row_state_at<acc_t>(state, 0), lse_array_at<acc_t>(lse, 0),
                     loss.data_ptr<acc_t>());
  });
}

std::tuple<Tensor, Tensor> linear_ce_forward(const Tensor& input, const Tensor& weight, const Tensor& target,
                                             const std::optional<Tensor>& bias, int64_t ignore_index,
                                             double label_smoothing, double z_loss, double softcap,
                                             int64_t chunk_size) {
  c10::DeviceGuard guard(input.device());
  LinearCEProblem prob(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size);
  Tensor state, lse, loss;
  forward_chunks(prob, state, lse, loss);
  return {loss, lse};
}

// Vocabulary-parallel forward: the statistics of this shard's columns only,
// which the caller combines across ranks (fusedloss/distributed.py). lse holds
// the shard-local log-sum-exp parts [2, N] (max, log-sum), target_logit is 0 where the target lies in another
// shard, sum_logits sums the shard's (softcapped) logits. Targets range over
// [0, num_classes).
std::tuple<Tensor, Tensor, Tensor> linear_ce_shard_forward(const Tensor& input, const Tensor& weight,
                                                           const Tensor& target, const std::optional<Tensor>& bias,
                                                           int64_t ignore_index, double softcap,
                                                           int64_t vocab_start, int64_t num_classes,
                                                           int64_t chunk_size) {
  c10::DeviceGuard guard(input.device());
  LinearCEProblem prob(input, weight, target, bias, ignore_index, 0.0, 0.0, softcap, chunk_size, vocab_start,
                       num_classes);
  Tensor state, lse, loss;
  forward_chunks(prob, state, lse, loss);
  return {lse, state[3].clone(), state[2].clone()};
}

std::tuple<Tensor, Tensor, Tensor> linear_ce_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const Tensor& target,
    const std::optional<Tensor>& bias, const Tensor& lse, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, int64_t chunk_size, std::array<bool, 3> output_mask, int64_t vocab_start,
    std::optional<int64_t> num_classes) {
  c10::DeviceGuard guard(input.device());
  // With a vocabulary shard, lse is the GLOBAL one (combined across ranks) and
  // the gradient is that of this shard's columns of the full softmax.
  LinearCEProblem prob(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
                       vocab_start, num_classes);
  const int64_t rows = prob.rows(), classes = prob.classes();
  TORCH_CHECK_VALUE(grad_loss.numel() == rows && lse.numel() == 2 * rows,
                    "linear_ce_backward: grad_loss must have N=", rows, " elements and lse [2, N]");
  const bool need_input = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2] && bias.has_value();
  const auto acc_opts = input.options().dtype(prob.acc_dtype);
  const Tensor grad_rows = grad_loss.reshape({rows}).to(prob.acc_dtype).contiguous();
  const Tensor lse_rows = lse.reshape({2, rows}).to(prob.acc_dtype).contiguous();

  Tensor grad_input_acc = need_input ? at::zeros({rows, input.size(1)}, acc_opts) : Tensor();
  Tensor grad_weight = need_weight ? at::empty_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  Tensor grad_bias_acc = need_bias ? at::zeros({classes}, acc_opts) : Tensor();
  if (rows == 0 && need_weight) grad_weight.zero_();

  if (rows > 0 && (need_input || need_weight || need_bias)) {
    Tensor workspace = at::empty({rows * prob.chunk_size}, acc_opts);
    // dlogits feed the GEMMs in the operand dtype; when that is the accumulation
    // dtype they overwrite the logits tile in place.
    Tensor dlogits_workspace = prob.operand_dtype == prob.acc_dtype
                                   ? workspace
                                   : at::empty({rows * prob.chunk_size}, input.options().dtype(prob.operand_dtype));
    const ChunkKernels kernels(input);
    AT_DISPATCH_FLOATING_TYPES(prob.acc_dtype, "linear_ce_backward", [&] {
      for (int64_t start = 0; start < classes; start += prob.chunk_size) {
        const int64_t columns = std::min(prob.chunk_size, classes - start);
        Tensor weight_chunk;
        Tensor logits = prob.tile_logits(workspace, 0, rows, start, columns, weight_chunk);
        Tensor dlogits = dlogits_workspace.narrow(0, 0, rows * columns).view({rows, columns});
        tile_grad<scalar_t>(kernels, prob, logits, dlogits, 0, start, lse_rows, grad_rows);
        if (need_input) matmul_into(grad_input_acc, dlogits, weight_chunk, /*accumulate=*/true);
        if (need_weight) {
          Tensor grad_weight_chunk = grad_weight.narrow(0, start, columns);
          matmul_into(grad_weight_chunk, dlogits.t(), prob.input, /*accumulate=*/false);
        }
        if (need_bias) grad_bias_acc.narrow(0, start, columns).add_(dlogits.sum(0, false, prob.acc_dtype));
      }
    });
  }
  Tensor grad_input = need_input ? grad_input_acc.to(input.scalar_type()) : at::empty({0}, input.options());
  Tensor grad_bias = need_bias ? grad_bias_acc.to(bias->scalar_type()) : at::empty({0}, input.options());
  return {grad_input, grad_weight, grad_bias};
}

// Rows per block of the single-pass sum-and-gradient path: as many as fit the
// workspace with the whole vocabulary. Below kMinRowBlock rows, re-reading the
// V x D weight gradient once per block costs more than the GEMM it saves.
constexpr int64_t kMinRowBlock = 256;

int64_t row_block_for(int64_t rows, int64_t classes, int64_t requested, bool cuda) {
  if (requested > 0) return std::min(requested, rows);
  const int64_t budget_bytes = cuda ? (int64_t(1) << 30) : (int64_t(128) << 20);
  return std::min(rows, budget_bytes / (classes * 8));
}

// sum_i loss_i and its gradients in ONE pass over row blocks: each block's
// full-vocabulary logits tile is formed once and turned into dlogits in place,
// so the op costs 6·N·D·V FLOPs instead of forward + recompute backward's 8.
// Only for fp32/fp64 (the weight gradient is its own fp32 accumulator); when
// the vocabulary is too large for blocks of kMinRowBlock rows it falls back to
// the chunked forward + backward with a unit upstream gradient.
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_ce_sum_and_grad(
    const Tensor& input, const Tensor& weight, const Tensor& target, const std::optional<Tensor>& bias,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, int64_t row_block,
    std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(input.device());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                   "linear_ce_sum_and_grad: only float32/float64 inputs (got ", input.scalar_type(), ")");
  LinearCEProblem prob(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, 0);
  const int64_t rows = prob.rows(), classes = prob.classes();
  const int64_t block = row_block_for(rows, classes, row_block, input.is_cuda());
  if (rows > 0 && block < std::min(rows, kMinRowBlock) && row_block <= 0) {
    auto [loss, lse] = linear_ce_forward(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, 0);
    auto [gi, gw, gb] = linear_ce_backward(at::ones_like(loss), input, weight, target, bias, lse, ignore_index,
                                           label_smoothing, z_loss, softcap, 0, output_mask, 0, std::nullopt);
    return {loss.sum(), gi, gw, gb};
  }
  const bool need_input = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2] && bias.has_value();
  const auto acc_opts = input.options().dtype(prob.acc_dtype);
  Tensor grad_input = need_input ? at::empty({rows, input.size(1)}, acc_opts) : at::empty({0}, acc_opts);
  Tensor grad_weight = need_weight ? at::zeros({classes, input.size(1)}, acc_opts) : at::empty({0}, acc_opts);
  Tensor grad_bias = need_bias ? at::zeros({classes}, acc_opts) : at::empty({0}, acc_opts);
  Tensor state = empty_row_state(rows, acc_opts);
  Tensor lse = at::empty({2, rows}, acc_opts);
  Tensor loss = at::empty({rows}, acc_opts);
  const Tensor unit_grad = at::ones({rows}, acc_opts);
  if (rows == 0) return {loss.sum(), grad_input, grad_weight, grad_bias};
  Tensor workspace = at::empty({block * classes}, acc_opts);
  const ChunkKernels kernels(input);

  AT_DISPATCH_FLOATING_TYPES(prob.acc_dtype, "linear_ce_sum_and_grad", [&] {
    using acc_t = scalar_t;
    for (int64_t row_start = 0; row_start < rows; row_start += block) {
      const int64_t count = std::min(block, rows - row_start);
      const int64_t* tgt = prob.target.data_ptr<int64_t>() + row_start;
      Tensor weight_all;
      Tensor logits = prob.tile_logits(workspace, row_start, count, 0, classes, weight_all);
      prob.params.tile_transformed = true;
      kernels.accumulate(prob.params, logits.data_ptr<acc_t>(), prob.bias_chunk<acc_t>(0), tgt,
                         row_state_at<acc_t>(state, row_start));
      kernels.finalize(prob.params, tgt, row_state_at<acc_t>(state, row_start), lse_array_at<acc_t>(lse, row_start),
                       loss.data_ptr<acc_t>() + row_start);
      tile_grad<acc_t>(kernels, prob, logits, logits, row_start, 0, lse, unit_grad);
      prob.params.tile_transformed = false;
      if (need_input) {
        Tensor grad_input_rows = grad_input.narrow(0, row_start, count);
        matmul_into(grad_input_rows, logits, weight_all, /*accumulate=*/false);
      }
      if (need_weight)
        matmul_into(grad_weight, logits.t(), prob.input.narrow(0, row_start, count), /*accumulate=*/row_start > 0);
      if (need_bias) grad_bias.add_(logits.sum(0));
    }
  });
  return {loss.sum(), grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def(
      "linear_ce_forward(Tensor input, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, int chunk_size) -> (Tensor loss, Tensor lse)");
  m.def(
      "linear_ce_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap, int chunk_size, "
      "bool[3] output_mask, int vocab_start=0, int? num_classes=None) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_ce_shard_forward(Tensor input, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
      "float softcap, int vocab_start, int num_classes, int chunk_size) -> "
      "(Tensor lse, Tensor target_logit, Tensor sum_logits)");
  m.def(
      "linear_ce_sum_and_grad(Tensor input, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, int row_block, bool[3] output_mask) -> "
      "(Tensor loss_sum, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
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
