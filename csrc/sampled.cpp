// Binding layer of sampled softmax / NCE: argument validation, the column-chunk
// loop (GEMMs for shared candidates, row-wise gathered dots for the true columns
// and per-row candidates), the scatter of the weight/bias gradients into a dense
// or sparse result, and dispatch of the per-chunk kernels to the CPU or CUDA
// backend. Registered as torch ops fusedloss::sampled_forward/backward.
//
// Memory: besides the outputs, one [N, chunk] fp32 logits tile, the [6, N] row
// state, the fp32 dX accumulator [N, D], one [chunk, D] gathered weight block
// (shared candidates) or, on CUDA, an [N, chunk, D] outer-product block (per-row
// candidates; the chunk is sized to keep it within the workspace budget), and
// the gradient accumulator: [C, D] dense or [touched rows, D] sparse.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <vector>

#include "fusedloss/gemm.h"
#include "fusedloss/sampled.h"

#ifdef FUSEDLOSS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace fusedloss {
namespace {

using at::Tensor;

struct SampledOptions {
  int64_t mode;
  int64_t hit_mask;
  double label_smoothing;
  double true_label;
  int64_t chunk_size;
};

void check_index_tensor(const Tensor& ids, int64_t num_classes, const char* name) {
  // A host-side scan is free on the CPU; on CUDA the Python layer checks (one
  // sync, outside the op).
  if (!ids.is_cpu()) return;
  const Tensor flat = ids.contiguous().view(-1);
  const int64_t* p = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < num_classes, "sampled_loss: ", name, " contains ", p[i],
                      ", which is outside [0, ", num_classes, ")");
  }
}

void check_sampled_args(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                        const Tensor& true_classes, const Tensor& sampled, const std::optional<Tensor>& true_log_q,
                        const std::optional<Tensor>& sampled_log_q, const SampledOptions& o) {
  TORCH_CHECK_VALUE(input.dim() == 2, "sampled_loss: input must be [N, D], got shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "sampled_loss: weight must be 2-D [num_classes, D], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), "sampled_loss: input has D=", input.size(1),
                    " features but weight has D=", weight.size(1), " (weight must be [num_classes, D])");
  TORCH_CHECK_VALUE(weight.size(0) > 0, "sampled_loss: weight has no rows (num_classes=0)");
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()),
                   "sampled_loss: input must be float32, float64, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), "sampled_loss: weight dtype ",
                   weight.scalar_type(), " differs from input dtype ", input.scalar_type());
  const int64_t rows = input.size(0);
  TORCH_CHECK_TYPE(true_classes.scalar_type() == at::kLong, "sampled_loss: true_classes must be int64, got ",
                   true_classes.scalar_type());
  TORCH_CHECK_VALUE(true_classes.dim() == 2 && true_classes.size(0) == rows && true_classes.size(1) >= 1,
                    "sampled_loss: true_classes must be [N, num_true] with N=", rows, ", got ",
                    true_classes.sizes());
  TORCH_CHECK_TYPE(sampled.scalar_type() == at::kLong, "sampled_loss: sampled candidates must be int64, got ",
                   sampled.scalar_type());
  TORCH_CHECK_VALUE(sampled.dim() == 1 || (sampled.dim() == 2 && sampled.size(0) == rows),
                    "sampled_loss: sampled candidates must be [K] (shared) or [N, K] with N=", rows, ", got ",
                    sampled.sizes());
  const auto check_log_q = [&](const std::optional<Tensor>& log_q, const Tensor& like, const char* name) {
    if (!log_q.has_value()) return;
    TORCH_CHECK_TYPE(at::isFloatingType(log_q->scalar_type()), "sampled_loss: ", name,
                     " must be floating point, got ", log_q->scalar_type());
    TORCH_CHECK_VALUE(log_q->sizes() == like.sizes(), "sampled_loss: ", name, " must have shape ", like.sizes(),
                      ", got ", log_q->sizes());
    TORCH_CHECK_VALUE(log_q->device() == input.device(), "sampled_loss: ", name, " is on ", log_q->device(),
                      " but input is on ", input.device());
  };
  check_log_q(true_log_q, true_classes, "true_log_q");
  check_log_q(sampled_log_q, sampled, "sampled_log_q");
  TORCH_CHECK_VALUE(weight.device() == input.device() && true_classes.device() == input.device() &&
                        sampled.device() == input.device(),
                    "sampled_loss: input (", input.device(), "), weight (", weight.device(), "), true_classes (",
                    true_classes.device(), ") and sampled candidates (", sampled.device(),
                    ") must be on the same device");
  TORCH_CHECK_VALUE(input.device().is_cpu() || input.device().is_cuda(), "sampled_loss: unsupported device ",
                    input.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "sampled_loss: bias must be [",
                      weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "sampled_loss: bias dtype ", bias->scalar_type(),
                     " differs from input dtype ", input.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == input.device(), "sampled_loss: bias is on ", bias->device(),
                      " but input is on ", input.device());
  }
  TORCH_CHECK_VALUE(o.mode == int64_t(SampledMode::kSoftmax) || o.mode == int64_t(SampledMode::kNCE),
                    "sampled_loss: mode must be 0 (softmax) or 1 (NCE), got ", o.mode);
  TORCH_CHECK_VALUE(o.hit_mask >= int64_t(HitMask::kNone) && o.hit_mask <= int64_t(HitMask::kLastCopy),
                    "sampled_loss: hit_mask must be 0 (none), 1 (all copies) or 2 (last copy), got ", o.hit_mask);
  TORCH_CHECK_VALUE(o.hit_mask != int64_t(HitMask::kLastCopy) || sampled.dim() == 1,
                    "sampled_loss: last-copy (TensorFlow) hit masking needs shared [K] candidates");
  TORCH_CHECK_VALUE(o.label_smoothing >= 0.0 && o.label_smoothing <= 1.0,
                    "sampled_loss: label_smoothing must be in [0, 1], got ", o.label_smoothing);
  TORCH_CHECK_VALUE(o.mode == int64_t(SampledMode::kSoftmax) || o.label_smoothing == 0.0,
                    "sampled_loss: label_smoothing applies to sampled softmax only");
  check_index_tensor(true_classes, weight.size(0), "true_classes");
  check_index_tensor(sampled, weight.size(0), "sampled candidates");
}

// Candidate columns per chunk when each row has its own ids on CUDA: the
// backward forms an [N, chunk, D] outer-product block for index_add_, so the
// chunk keeps that block within chunk_columns_for's CUDA workspace (512 MiB).
// (The CPU scatters the outer products directly and uses chunk_columns_for.)
int64_t cuda_per_row_chunk_columns(int64_t rows, int64_t dim, int64_t columns, int64_t requested) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(columns, 1));
  const int64_t budget_bytes = int64_t(512) << 20;
  const int64_t bytes_per_column = std::max<int64_t>(rows, 1) * (dim + 1) * 4;
  return std::clamp<int64_t>(budget_bytes / bytes_per_column, 1, std::max<int64_t>(columns, 1));
}

// Routes each kernel to the device of the tensors it runs on.
struct SampledKernels {
  bool cuda;
  void* stream = nullptr;

  explicit SampledKernels(const Tensor& t) : cuda(t.is_cuda()) {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) stream = at::cuda::getCurrentCUDAStream().stream();
#else
    TORCH_CHECK(!cuda, "fusedloss was built without CUDA kernels; rebuild with FUSEDLOSS_FORCE_CUDA=1");
#endif
  }

  template <typename in_t, typename acc_t>
  void row_dot(const SampledParams& p, const in_t* x, const in_t* w, const int64_t* ids, int64_t id_stride,
               int64_t columns, acc_t* out) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::sampled_row_dot(p, x, w, ids, id_stride, columns, out, columns, stream);
#endif
    cpu::sampled_row_dot(p, x, w, ids, id_stride, columns, out, columns);
  }

  template <typename in_t, typename acc_t>
  void row_axpy(const SampledParams& p, const acc_t* dz, const in_t* w, const int64_t* ids, int64_t id_stride,
                int64_t columns, acc_t* dx) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::sampled_row_axpy(p, dz, columns, w, ids, id_stride, columns, dx, stream);
#endif
    cpu::sampled_row_axpy(p, dz, columns, w, ids, id_stride, columns, dx);
  }

  template <typename acc_t>
  void accumulate(const SampledParams& p, const SampledColumns<acc_t>& c, acc_t* logits,
                  SampledRowState<acc_t> state) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::sampled_accumulate_chunk(p, c, logits, state, stream);
#endif
    cpu::sampled_accumulate_chunk(p, c, logits, state);
  }

  template <typename acc_t>
  void finalize(const SampledParams& p, SampledRowState<acc_t> state, acc_t* loss, acc_t* stats) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::sampled_finalize(p, state, loss, stats, stream);
#endif
    cpu::sampled_finalize(p, state, loss, stats);
  }

  template <typename acc_t, typename grad_t>
  void grad(const SampledParams& p, const SampledColumns<acc_t>& c, const acc_t* logits, const acc_t* stats,
            const acc_t* grad_loss, grad_t* dlogits) const {
#ifdef FUSEDLOSS_WITH_CUDA
    if (cuda) return cuda::sampled_chunk_grad(p, c, logits, stats, grad_loss, dlogits, stream);
#endif
    if constexpr (std::is_same_v<acc_t, grad_t>) {
      cpu::sampled_chunk_grad(p, c, logits, stats, grad_loss, dlogits);
    } else {
      TORCH_INTERNAL_ASSERT(false, "CPU dlogits are always in the accumulation dtype");
    }
  }

  // dst[index[r]] += src[r] (rows of a [R, D] or [R] accumulator). The CPU
  // kernel is deterministic; on CUDA index_add_ uses atomics, or ATen's sort +
  // segment-sum path (index_put_ with accumulate) under
  // torch.use_deterministic_algorithms(True), so the sums are reproducible then.
  template <typename acc_t>
  void scatter_rows(Tensor& dst, const Tensor& index, const Tensor& src) const {
    if (cuda) {
      dst.index_add_(0, index, src);
      return;
    }
    const Tensor idx = index.contiguous(), values = src.contiguous();
    cpu::sampled_scatter_add_rows(values.data_ptr<acc_t>(), idx.data_ptr<int64_t>(), idx.numel(),
                                  dst.dim() == 1 ? 1 : dst.size(1), dst.data_ptr<acc_t>());
  }

  // dst[index[i * columns + j]] += dz[i, j] * x[i] for an [N, columns] dz.
  template <typename acc_t>
  void scatter_outer(Tensor& dst, const Tensor& index, const Tensor& dz, const Tensor& x) const {
    if (cuda) {
      dst.index_add_(0, index, (dz.unsqueeze(2) * x.unsqueeze(1)).view({-1, x.size(1)}));
      return;
    }
    const Tensor idx = index.contiguous();
    cpu::sampled_scatter_outer(dz.data_ptr<acc_t>(), x.data_ptr<acc_t>(), idx.data_ptr<int64_t>(), dz.size(0),
                               dz.size(1), x.size(1), dst.data_ptr<acc_t>());
  }
};

// One block of columns: the true columns, or a slice [start, start + columns)
// of the candidates.
struct ColumnChunk {
  bool is_true;
  bool per_row;  // ids differ per row (true columns, [N, K] candidates): row-wise kernels instead of a GEMM
  int64_t start;
  int64_t columns;
};

// Everything both passes share: validated, contiguous operands and the chunking.
struct SampledProblem {
  Tensor input_raw;      // [N, D] in the input dtype (row-wise kernels)
  Tensor input;          // [N, D] in the GEMM operand dtype
  Tensor weight;         // [C, D] as given
  Tensor bias;           // [C] in the accumulation dtype, or undefined
  Tensor true_classes;   // [N, T]
  Tensor sampled;        // [K] or [N, K]
  Tensor true_log_q;     // [N, T] accumulation dtype, or undefined
  Tensor sampled_log_q;  // like sampled, accumulation dtype, or undefined
  Tensor maskable;       // [K] bool for last-copy masking, or undefined
  at::ScalarType acc_dtype;
  at::ScalarType operand_dtype;
  SampledParams params;
  bool shared;
  int64_t num_sampled;
  std::vector<ColumnChunk> chunks;

  SampledProblem(const Tensor& input_, const Tensor& weight_, const std::optional<Tensor>& bias_,
                 const Tensor& true_classes_, const Tensor& sampled_, const std::optional<Tensor>& true_log_q_,
                 const std::optional<Tensor>& sampled_log_q_, const SampledOptions& o) {
    check_sampled_args(input_, weight_, bias_, true_classes_, sampled_, true_log_q_, sampled_log_q_, o);
    acc_dtype = accumulation_dtype(input_.scalar_type());
    operand_dtype = gemm_operand_dtype(input_);
    input_raw = input_.contiguous();
    input = input_raw.to(operand_dtype);
    weight = weight_.contiguous();
    if (bias_.has_value()) bias = bias_->contiguous().to(acc_dtype);
    true_classes = true_classes_.contiguous();
    sampled = sampled_.contiguous();
    if (true_log_q_.has_value()) true_log_q = true_log_q_->contiguous().to(acc_dtype);
    if (sampled_log_q_.has_value()) sampled_log_q = sampled_log_q_->contiguous().to(acc_dtype);
    shared = sampled.dim() == 1;
    num_sampled = sampled.size(-1);
    if (o.hit_mask == int64_t(HitMask::kLastCopy)) maskable = last_occurrence(sampled);
    const int64_t rows = input.size(0), dim = input.size(1);
    params = SampledParams{rows,  true_classes.size(1), dim, o.mode, o.hit_mask != int64_t(HitMask::kNone),
                           o.label_smoothing, o.true_label, false, 0, 0};
    chunks.push_back({true, true, 0, params.num_true});
    const int64_t chunk = (shared || !input.is_cuda())
                              ? chunk_columns_for(rows, num_sampled, o.chunk_size, input.is_cuda())
                              : cuda_per_row_chunk_columns(rows, dim, num_sampled, o.chunk_size);
    for (int64_t start = 0; start < num_sampled; start += chunk) {
      chunks.push_back({false, !shared, start, std::min(chunk, num_sampled - start)});
    }
  }

  // TensorFlow masks only the last copy of a duplicated candidate id (its hit
  // table maps id -> position and later positions overwrite earlier ones). A
  // stable sort puts copies in their original order, so the last of each run
  // of equal ids is that copy. O(K log K), no host sync.
  static Tensor last_occurrence(const Tensor& ids) {
    const auto [sorted, order] = at::sort(ids, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const int64_t k = ids.numel();
    Tensor last_sorted = at::ones({k}, ids.options().dtype(at::kBool));
    if (k > 1) last_sorted.narrow(0, 0, k - 1).copy_(sorted.narrow(0, 0, k - 1) != sorted.narrow(0, 1, k - 1));
    // Back to candidate order through the inverse permutation (a gather: no
    // scatter, so nothing non-deterministic under use_deterministic_algorithms).
    return last_sorted.index_select(0, at::argsort(order));
  }

  int64_t max_chunk_columns() const {
    int64_t m = 0;
    for (const auto& c : chunks) m = std::max(m, c.columns);
    return m;
  }

  SampledParams params_of(const ColumnChunk& c) const {
    SampledParams p = params;
    p.is_true_chunk = c.is_true;
    p.chunk_columns = c.columns;
    p.logits_stride = c.columns;
    return p;
  }

  // Pointer to the chunk's first id and the stride between rows.
  std::pair<const int64_t*, int64_t> ids_of(const ColumnChunk& c) const {
    if (c.is_true) return {true_classes.data_ptr<int64_t>(), params.num_true};
    return {sampled.data_ptr<int64_t>() + c.start, shared ? 0 : num_sampled};
  }

  template <typename acc_t>
  SampledColumns<acc_t> columns_of(const ColumnChunk& c) const {
    const auto [ids, id_stride] = ids_of(c);
    const Tensor& log_q = c.is_true ? true_log_q : sampled_log_q;
    const int64_t offset = c.is_true ? 0 : c.start;
    return SampledColumns<acc_t>{
        ids,
        id_stride,
        log_q.defined() ? log_q.data_ptr<acc_t>() + offset : nullptr,
        id_stride,
        (maskable.defined() && !c.is_true) ? maskable.data_ptr<bool>() + c.start : nullptr,
        bias.defined() ? bias.data_ptr<acc_t>() : nullptr,
        true_classes.data_ptr<int64_t>()};
  }

  // Raw logits x_i . W[id] of the chunk into the front of `workspace`. For
  // shared candidates `gathered` receives the chunk's [columns, D] weight rows
  // in the operand dtype (the backward reuses them).
  template <typename in_t, typename acc_t>
  Tensor chunk_logits(const ColumnChunk& c, const Tensor& workspace, const SampledKernels& kernels,
                      Tensor& gathered) const {
    const int64_t rows = params.num_rows;
    Tensor logits = workspace.narrow(0, 0, rows * c.columns).view({rows, c.columns});
    if (c.per_row) {
      const auto [ids, id_stride] = ids_of(c);
      kernels.row_dot(params_of(c), input_raw.data_ptr<in_t>(), weight.data_ptr<in_t>(), ids, id_stride, c.columns,
                      logits.data_ptr<acc_t>());
    } else {
      gathered = weight.index_select(0, sampled.narrow(0, c.start, c.columns)).to(operand_dtype);
      matmul_into(logits, input, gathered.t(), /*accumulate=*/false);
    }
    return logits;
  }

  // Every (row, column) id in chunk order: the true classes, then the candidates.
  Tensor all_ids() const { return at::cat({true_classes.view(-1), sampled.view(-1)}); }

  // The slice of a per-(row, column) map laid out like all_ids() that belongs
  // to chunk c, flattened row-major like the chunk's tile.
  Tensor chunk_slice(const Tensor& map, const ColumnChunk& c) const {
    const int64_t rows = params.num_rows, true_count = rows * params.num_true;
    if (c.is_true) return map.narrow(0, 0, true_count);
    const Tensor candidates = map.narrow(0, true_count, sampled.numel());
    if (shared) return candidates.narrow(0, c.start, c.columns);
    return candidates.view({rows, num_sampled}).narrow(1, c.start, c.columns).reshape(-1);
  }
};

// Dispatches on the input dtype; acc_t is float (double for double inputs).
#define FUSEDLOSS_DISPATCH_SAMPLED(dtype, name, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, [&] {            \
    using in_t = scalar_t;                                                                \
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;        \
    __VA_ARGS__();                                                                        \
  })

template <typename acc_t>
SampledRowState<acc_t> row_state_of(Tensor& state) {
  return {state[0].data_ptr<acc_t>(), state[1].data_ptr<acc_t>(), state[2].data_ptr<acc_t>(),
          state[3].data_ptr<acc_t>(), state[4].data_ptr<acc_t>(), state[5].data_ptr<acc_t>()};
}

std::tuple<Tensor, Tensor> sampled_forward(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                           const Tensor& true_classes, const Tensor& sampled,
                                           const std::optional<Tensor>& true_log_q,
                                           const std::optional<Tensor>& sampled_log_q, int64_t mode, int64_t hit_mask,
                                           double label_smoothing, double true_label, int64_t chunk_size,
                                           bool sparse_grad) {
  (void)sparse_grad;  // consumed by the backward only
  c10::DeviceGuard guard(input.device());
  const SampledOptions opts{mode, hit_mask, label_smoothing, true_label, chunk_size};
  const SampledProblem prob(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts);
  const int64_t rows = prob.params.num_rows;
  const auto acc_opts = input.options().dtype(prob.acc_dtype);
  Tensor state = at::zeros({6, rows}, acc_opts);
  state[0].fill_(-std::numeric_limits<double>::infinity());
  Tensor loss = at::empty({rows}, acc_opts);
  Tensor stats = at::empty({3, rows}, acc_opts);
  if (rows == 0) return {loss, stats};
  Tensor workspace = at::empty({rows * prob.max_chunk_columns()}, acc_opts);
  const SampledKernels kernels(input);

  FUSEDLOSS_DISPATCH_SAMPLED(input.scalar_type(), "sampled_forward", [&] {
    const SampledRowState<acc_t> row_state = row_state_of<acc_t>(state);
    for (const ColumnChunk& c : prob.chunks) {
      Tensor gathered;
      Tensor logits = prob.chunk_logits<in_t, acc_t>(c, workspace, kernels, gathered);
      kernels.accumulate(prob.params_of(c), prob.columns_of<acc_t>(c), logits.data_ptr<acc_t>(), row_state);
    }
    kernels.finalize(prob.params, row_state, loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
  });
  return {loss, stats};
}

std::tuple<Tensor, Tensor, Tensor> sampled_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& true_classes, const Tensor& sampled, const std::optional<Tensor>& true_log_q,
    const std::optional<Tensor>& sampled_log_q, const Tensor& stats, int64_t mode, int64_t hit_mask,
    double label_smoothing, double true_label, int64_t chunk_size, bool sparse_grad, std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(input.device());
  const SampledOptions opts{mode, hit_mask, label_smoothing, true_label, chunk_size};
  const SampledProblem prob(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts);
  const int64_t rows = prob.params.num_rows, dim = prob.params.dim, classes = weight.size(0);
  TORCH_CHECK_VALUE(grad_loss.numel() == rows && stats.numel() == 3 * rows,
                    "sampled_backward: grad_loss must have N=", rows, " elements and stats [3, N]");
  const bool need_input = output_mask[0], need_weight = output_mask[1], need_bias = output_mask[2] && bias.has_value();
  const auto acc_opts = input.options().dtype(prob.acc_dtype);
  const Tensor grad_rows = grad_loss.reshape({rows}).to(prob.acc_dtype).contiguous();
  const Tensor row_stats = stats.to(prob.acc_dtype).contiguous();

  // Weight/bias gradient rows are scattered (SampledKernels::scatter_*) at
  // `row_map`: the class ids themselves (dense [C, D] result) or, for
  // sparse_grad, each id's position among the sorted unique touched ids ([U, D]
  // values of a coalesced COO tensor).
  Tensor row_map, touched;
  int64_t out_rows = classes;
  if (need_weight || need_bias) {
    row_map = prob.all_ids();
    if (sparse_grad) {
      std::tie(touched, row_map) = at::_unique(row_map, /*sorted=*/true, /*return_inverse=*/true);
      out_rows = touched.numel();
    }
  }
  Tensor grad_input_acc = need_input ? at::zeros({rows, dim}, acc_opts) : Tensor();
  Tensor grad_weight_acc = need_weight ? at::zeros({out_rows, dim}, acc_opts) : Tensor();
  Tensor grad_bias_acc = need_bias ? at::zeros({out_rows}, acc_opts) : Tensor();

  if (rows > 0 && (need_input || need_weight || need_bias)) {
    Tensor workspace = at::empty({rows * prob.max_chunk_columns()}, acc_opts);
    // Shared-candidate dlogits feed GEMMs in the operand dtype; when that is the
    // accumulation dtype they overwrite the logits tile in place.
    Tensor dlogits_workspace = prob.operand_dtype == prob.acc_dtype
                                   ? workspace
                                   : at::empty({workspace.numel()}, input.options().dtype(prob.operand_dtype));
    // Rows with zero upstream gradient feed the weight gradient nothing, even
    // holding inf/NaN (see zero_rows_where).
    const Tensor input_for_weight = need_weight ? zero_rows_where(prob.input, grad_rows.eq(0)) : Tensor();
    const Tensor input_acc = need_weight ? input_for_weight.to(prob.acc_dtype) : Tensor();
    const SampledKernels kernels(input);
    FUSEDLOSS_DISPATCH_SAMPLED(input.scalar_type(), "sampled_backward", [&] {
      for (const ColumnChunk& c : prob.chunks) {
        const SampledParams p = prob.params_of(c);
        const SampledColumns<acc_t> cols = prob.columns_of<acc_t>(c);
        Tensor gathered;
        Tensor logits = prob.chunk_logits<in_t, acc_t>(c, workspace, kernels, gathered);
        const Tensor map = row_map.defined() ? prob.chunk_slice(row_map, c) : Tensor();
        if (c.per_row) {
          // dlogits in place, in the accumulation dtype; W rows read straight from weight.
          kernels.grad(p, cols, logits.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>(), grad_rows.data_ptr<acc_t>(),
                       logits.data_ptr<acc_t>());
          const auto [ids, id_stride] = prob.ids_of(c);
          if (need_input) {
            kernels.row_axpy(p, logits.data_ptr<acc_t>(), prob.weight.data_ptr<in_t>(), ids, id_stride, c.columns,
                             grad_input_acc.data_ptr<acc_t>());
          }
          if (need_weight) kernels.scatter_outer<acc_t>(grad_weight_acc, map, logits, input_acc);
          if (need_bias) kernels.scatter_rows<acc_t>(grad_bias_acc, map, logits.reshape(-1));
          continue;
        }
        Tensor dlogits = dlogits_workspace.narrow(0, 0, rows * c.columns).view({rows, c.columns});
        const auto run_grad = [&](auto* dlogits_ptr) {
          kernels.grad(p, cols, logits.data_ptr<acc_t>(), row_stats.data_ptr<acc_t>(), grad_rows.data_ptr<acc_t>(),
                       dlogits_ptr);
        };
        if (prob.operand_dtype == prob.acc_dtype) {
          run_grad(dlogits.data_ptr<acc_t>());
        } else if constexpr (std::is_same_v<acc_t, float>) {
          if (prob.operand_dtype == at::kBFloat16) run_grad(dlogits.data_ptr<at::BFloat16>());
          else run_grad(dlogits.data_ptr<at::Half>());
        }
        if (need_input) matmul_into(grad_input_acc, dlogits, gathered, /*accumulate=*/true);
        if (need_weight) {
          Tensor chunk_grad = at::empty({c.columns, dim}, acc_opts);
          matmul_into(chunk_grad, dlogits.t(), input_for_weight, /*accumulate=*/false);
          kernels.scatter_rows<acc_t>(grad_weight_acc, map, chunk_grad);
        }
        if (need_bias) kernels.scatter_rows<acc_t>(grad_bias_acc, map, dlogits.sum(0, false, prob.acc_dtype));
      }
    });
  }
  const auto finish = [&](const Tensor& acc, at::IntArrayRef dense_size, at::ScalarType dtype) {
    if (!sparse_grad) return acc.to(dtype);
    std::vector<int64_t> size(dense_size.begin(), dense_size.end());
    return at::_sparse_coo_tensor_unsafe(touched.unsqueeze(0), acc.to(dtype), size)._coalesced_(true);
  };
  Tensor grad_input = need_input ? grad_input_acc.to(input.scalar_type()) : at::empty({0}, input.options());
  Tensor grad_weight = need_weight ? finish(grad_weight_acc, weight.sizes(), weight.scalar_type())
                                   : at::empty({0}, weight.options());
  Tensor grad_bias = need_bias ? finish(grad_bias_acc, bias->sizes(), bias->scalar_type())
                               : at::empty({0}, input.options());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedloss, m) {
  m.def(
      "sampled_forward(Tensor input, Tensor weight, Tensor? bias, Tensor true_classes, Tensor sampled, "
      "Tensor? true_log_q, Tensor? sampled_log_q, int mode, int hit_mask, float label_smoothing, "
      "float true_label, int chunk_size, bool sparse_grad) -> (Tensor loss, Tensor stats)");
  m.def(
      "sampled_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias, Tensor true_classes, "
      "Tensor sampled, Tensor? true_log_q, Tensor? sampled_log_q, Tensor stats, int mode, int hit_mask, "
      "float label_smoothing, float true_label, int chunk_size, bool sparse_grad, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("sampled_forward", &sampled_forward);
  m.impl("sampled_backward", &sampled_backward);
}

#ifdef FUSEDLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("sampled_forward", &sampled_forward);
  m.impl("sampled_backward", &sampled_backward);
}
#endif

}  // namespace fusedloss
