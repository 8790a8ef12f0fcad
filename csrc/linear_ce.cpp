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

void check_linear_ce_args(const Tensor& input, const Tensor& weight, const Tensor& target,
                          const std::optional<Tensor>& bias, double label_smoothing, double z_loss,
                          double softcap, int64_t ignore_index) {
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
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "linear_cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0, "linear_cross_entropy: z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0.0, "linear_cross_entropy: softcap must be positive (or None), got ", softcap);
  if (input.is_cpu()) {
    // A host-side scan is free on the CPU; on CUDA the Python layer checks (one
    // sync, outside the op) and the kernels never index memory with a target.
    const int64_t* t = target.contiguous().data_ptr<int64_t>();
    const int64_t num_classes = weight.size(0);
    for (int64_t i = 0; i < target.numel(); ++i) {
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
  void finalize(const LinearCEParams& p, const int64_t* target, LinearCERowState<acc_t> state, acc_t* lse,
                acc_t* loss) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::linear_ce_finalize(p, target, state, lse, loss, stream);
#endif
    cpu::linear_ce_finalize(p, target, state, lse, loss);
  }

  template <typename acc_t, typename grad_t>
  void grad(const LinearCEParams& p, const acc_t* logits, const acc_t* bias, const int64_t* target,
            const acc_t* lse, const acc_t* grad_loss, grad_t* dlogits) const {
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

// Everything both passes share: validated, contiguous operands in the dtypes
// the GEMMs and kernels want, and the chunk geometry.
struct LinearCEProblem {
  Tensor input;   // [N, D] in the GEMM operand dtype
  Tensor weight;  // [V, D] as given (converted chunk by chunk on the CPU)
  Tensor target;  // [N] int64
  Tensor bias;    // [V] in the accumulation dtype, or undefined
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  LinearCEParams params;
  int64_t chunk_size;

  LinearCEProblem(const Tensor& input_, const Tensor& weight_, const Tensor& target_,
                  const std::optional<Tensor>& bias_, int64_t ignore_index, double label_smoothing,
                  double z_loss, double softcap, int64_t requested_chunk) {
    check_linear_ce_args(input_, weight_, target_, bias_, label_smoothing, z_loss, softcap, ignore_index);
    acc_dtype = accumulation_dtype(input_.scalar_type());
    operand_dtype = gemm_operand_dtype(input_);
    input = input_.contiguous().to(operand_dtype);
    weight = weight_.contiguous();
    target = target_.contiguous().view(-1);
    if (bias_.has_value()) bias = bias_->contiguous().to(acc_dtype);
    const int64_t rows = input.size(0), classes = weight.size(0);
    chunk_size = chunk_columns_for(rows, classes, requested_chunk, input.is_cuda());
    params = LinearCEParams{rows, classes, 0, 0, 0, ignore_index, label_smoothing, z_loss, softcap};
  }

  // Computes the raw logits of vocabulary columns [start, start + columns) into
  // the front of `workspace` and points `params` at that chunk.
  Tensor chunk_logits(const Tensor& workspace, int64_t start, int64_t columns, Tensor& weight_chunk) {
    const int64_t rows = input.size(0);
    weight_chunk = weight.narrow(0, start, columns).to(operand_dtype);
    Tensor logits = workspace.narrow(0, 0, rows * columns).view({rows, columns});
    matmul_into(logits, input, weight_chunk.t(), /*accumulate=*/false);
    params.chunk_start = start;
    params.chunk_columns = columns;
    params.logits_stride = columns;
    return logits;
  }

  template <typename acc_t>
  const acc_t* bias_chunk(int64_t start) const {
    return bias.defined() ? bias.data_ptr<acc_t>() + start : nullptr;
  }
};

std::tuple<Tensor, Tensor> linear_ce_forward(const Tensor& input, const Tensor& weight, const Tensor& target,
                                             const std::optional<Tensor>& bias, int64_t ignore_index,
                                             double label_smoothing, double z_loss, double softcap,
                                             int64_t chunk_size) {
  c10::DeviceGuard guard(input.device());
  LinearCEProblem prob(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size);
  const int64_t rows = prob.params.num_rows, classes = prob.params.num_classes;
  const auto acc_opts = input.options().dtype(prob.acc_dtype);
  Tensor state = at::zeros({4, rows}, acc_opts);
  state[0].fill_(-std::numeric_limits<double>::infinity());
  Tensor lse = at::empty({rows}, acc_opts);
  Tensor loss = at::empty({rows}, acc_opts);
  if (rows == 0) return {loss, lse};
  Tensor workspace = at::empty({rows * prob.chunk_size}, acc_opts);
  const ChunkKernels kernels(input);

  AT_DISPATCH_FLOATING_TYPES(prob.acc_dtype, "linear_ce_forward", [&] {
    using acc_t = scalar_t;
    const LinearCERowState<acc_t> row_state{state[0].data_ptr<acc_t>(), state[1].data_ptr<acc_t>(),
                                            state[2].data_ptr<acc_t>(), state[3].data_ptr<acc_t>()};
    const int64_t* tgt = prob.target.data_ptr<int64_t>();
    for (int64_t start = 0; start < classes; start += prob.chunk_size) {
      Tensor weight_chunk;
      Tensor logits = prob.chunk_logits(workspace, start, std::min(prob.chunk_size, classes - start), weight_chunk);
      kernels.accumulate(prob.params, logits.data_ptr<acc_t>(), prob.bias_chunk<acc_t>(start), tgt, row_state);
    }
    kernels.finalize(prob.params, tgt, row_state, lse.data_ptr<acc_t>(), loss.data_ptr<acc_t>());
  });
  return {loss, lse};
}

std::tuple<Tensor, Tensor, Tensor> linear_ce_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const Tensor& target,
    const std::optional<Tensor>& bias, const Tensor& lse, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, int64_t chunk_size, std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(input.device());
  LinearCEProblem prob(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, chunk_size);
  const int64_t rows = prob.params.num_rows, classes = prob.params.num_classes;
  TORCH_CHECK_VALUE(grad_loss.numel() == rows && lse.numel() == rows,
                    "linear_ce_backward: grad_loss and lse must have N=", rows, " elements");
  const bool need_input = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2] && bias.has_value();
  const auto acc_opts = input.options().dtype(prob.acc_dtype);
  const Tensor grad_rows = grad_loss.reshape({rows}).to(prob.acc_dtype).contiguous();
  const Tensor lse_rows = lse.reshape({rows}).to(prob.acc_dtype).contiguous();

  Tensor grad_input_acc = need_input ? at::zeros({rows, input.size(1)}, acc_opts) : Tensor();
  Tensor grad_weight = need_weight ? at::empty_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, weight.options());
  Tensor grad_bias_acc = need_bias ? at::empty({classes}, acc_opts) : Tensor();
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
      using acc_t = scalar_t;
      const int64_t* tgt = prob.target.data_ptr<int64_t>();
      for (int64_t start = 0; start < classes; start += prob.chunk_size) {
        const int64_t columns = std::min(prob.chunk_size, classes - start);
        Tensor weight_chunk;
        Tensor logits = prob.chunk_logits(workspace, start, columns, weight_chunk);
        Tensor dlogits = dlogits_workspace.narrow(0, 0, rows * columns).view({rows, columns});
        const auto run_grad = [&](auto* dlogits_ptr) {
          kernels.grad(prob.params, logits.data_ptr<acc_t>(), prob.bias_chunk<acc_t>(start), tgt,
                       lse_rows.data_ptr<acc_t>(), grad_rows.data_ptr<acc_t>(), dlogits_ptr);
        };
        if (prob.operand_dtype == prob.acc_dtype) {
          run_grad(dlogits.data_ptr<acc_t>());
        } else if constexpr (std::is_same_v<acc_t, float>) {
          if (prob.operand_dtype == at::kBFloat16) run_grad(dlogits.data_ptr<at::BFloat16>());
          else run_grad(dlogits.data_ptr<at::Half>());
        }
        if (need_input) matmul_into(grad_input_acc, dlogits, weight_chunk, /*accumulate=*/true);
        if (need_weight) {
          Tensor grad_weight_chunk = grad_weight.narrow(0, start, columns);
          matmul_into(grad_weight_chunk, dlogits.t(), prob.input, /*accumulate=*/false);
        }
        if (need_bias) grad_bias_acc.narrow(0, start, columns).copy_(dlogits.sum(0, false, prob.acc_dtype));
      }
    });
  } else if (need_bias) {
    grad_bias_acc.zero_();
  }
  Tensor grad_input = need_input ? grad_input_acc.to(input.scalar_type()) : at::empty({0}, input.options());
  Tensor grad_bias = need_bias ? grad_bias_acc.to(bias->scalar_type()) : at::empty({0}, input.options());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def(
      "linear_ce_forward(Tensor input, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, int chunk_size) -> (Tensor loss, Tensor lse)");
  m.def(
      "linear_ce_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
      "Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap, int chunk_size, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("linear_ce_forward", &linear_ce_forward);
  m.impl("linear_ce_backward", &linear_ce_backward);
}

#ifdef FUSEDLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("linear_ce_forward", &linear_ce_forward);
  m.impl("linear_ce_backward", &linear_ce_backward);
}
#endif

}  // namespace fusedloss
