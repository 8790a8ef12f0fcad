// Binding layer of sampled softmax / NCE: the argument check (run once, by
// the forward op), the family's chunk logits (GEMMs for shared candidates,
// row-wise gathered dots for the true columns and per-row candidates) and
// kernels for the shared chunk driver, the scatter of the weight/bias
// gradients into a dense or sparse result, the single pass for shared
// candidates, and the op schemas. Registered as torch ops
// fusedloss::sampled_forward/backward (the recompute pair) and
// fusedloss::sampled_sum_and_grad (the single pass, csrc/README.md).
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

#include "fusedloss/backend.h"
#include "fusedloss/checks.h"
#include "fusedloss/chunk_driver.h"
#include "fusedloss/gemm.h"
#include "fusedloss/sampled.h"

namespace fusedloss {
namespace {

using at::Tensor;

constexpr const char* kOp = "sampled_loss";

struct SampledOptions {
  int64_t mode;
  int64_t hit_mask;
  double label_smoothing;
  double true_label;
  int64_t chunk_size;
};

// Every check of a sampled-loss call (shapes before index ranges).
void check_sampled(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                   const Tensor& true_classes, const Tensor& sampled, const std::optional<Tensor>& true_log_q,
                   const std::optional<Tensor>& sampled_log_q, const SampledOptions& o) {
  checks::classifier(kOp, input, weight, bias);
  const int64_t rows = input.size(0);
  checks::index_tensor(kOp, "true_classes", true_classes, input);
  TORCH_CHECK_VALUE(true_classes.dim() == 2 && true_classes.size(0) == rows && true_classes.size(1) >= 1, kOp,
                    ": true_classes must be [N, num_true] with N=", rows, ", got ", true_classes.sizes());
  checks::index_tensor(kOp, "sampled candidates", sampled, input);
  TORCH_CHECK_VALUE(sampled.dim() == 1 || (sampled.dim() == 2 && sampled.size(0) == rows), kOp,
                    ": sampled candidates must be [K] (shared) or [N, K] with N=", rows, ", got ", sampled.sizes());
  const auto check_log_q = [&](const std::optional<Tensor>& log_q, const Tensor& like, const char* name) {
    if (!log_q.has_value()) return;
    TORCH_CHECK_TYPE(at::isFloatingType(log_q->scalar_type()), kOp, ": ", name, " must be floating point, got ",
                     log_q->scalar_type());
    TORCH_CHECK_VALUE(log_q->sizes() == like.sizes(), kOp, ": ", name, " must have shape ", like.sizes(), ", got ",
                      log_q->sizes());
    TORCH_CHECK_VALUE(log_q->device() == input.device(), kOp, ": ", name, " is on ", log_q->device(),
                      " but input is on ", input.device());
  };
  check_log_q(true_log_q, true_classes, "true_log_q");
  check_log_q(sampled_log_q, sampled, "sampled_log_q");
  TORCH_CHECK_VALUE(o.mode == int64_t(SampledMode::kSoftmax) || o.mode == int64_t(SampledMode::kNCE), kOp,
                    ": mode must be 0 (softmax) or 1 (NCE), got ", o.mode);
  TORCH_CHECK_VALUE(o.hit_mask >= int64_t(HitMask::kNone) && o.hit_mask <= int64_t(HitMask::kLastCopy), kOp,
                    ": hit_mask must be 0 (none), 1 (all copies) or 2 (last copy), got ", o.hit_mask);
  TORCH_CHECK_VALUE(o.hit_mask != int64_t(HitMask::kLastCopy) || sampled.dim() == 1, kOp,
                    ": last-copy (TensorFlow) hit masking needs shared [K] candidates");
  checks::in_range(kOp, "label_smoothing", o.label_smoothing, 0.0, 1.0);
  TORCH_CHECK_VALUE(o.mode == int64_t(SampledMode::kSoftmax) || o.label_smoothing == 0.0, kOp,
                    ": label_smoothing applies to sampled softmax only");
  checks::index_range(kOp, "true_classes", true_classes, weight.size(0));
  checks::index_range(kOp, "sampled candidates", sampled, weight.size(0));
}

// Candidate columns per chunk of a CUDA backward over per-row ids under
// torch.use_deterministic_algorithms: it forms an [N, chunk, D] outer-product
// block for index_add_ (sorted, reproducible), so the chunk keeps that block
// within chunk_columns_for's CUDA workspace (512 MiB). Every other pass (the
// forward, the CPU, a CUDA backward scattering with atomics) uses
// chunk_columns_for.
int64_t cuda_per_row_chunk_columns(int64_t rows, int64_t dim, int64_t columns, int64_t requested) {
  if (requested > 0) return std::min(requested, std::max<int64_t>(columns, 1));
  const int64_t budget_bytes = int64_t(512) << 20;
  const int64_t bytes_per_column = std::max<int64_t>(rows, 1) * (dim + 1) * 4;
  return std::clamp<int64_t>(budget_bytes / bytes_per_column, 1, std::max<int64_t>(columns, 1));
}

// Chunk kinds: the true columns, a slice of shared [K] candidates (a GEMM
// against the gathered weight rows), or of per-row [N, K] candidates (row-wise
// gathered dots).
enum ChunkKind : int { kTrueColumns = 0, kSharedCandidates = 1, kPerRowCandidates = 2 };

// Validated operands prepared for the kernels. Checks nothing (the forward op did).
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
  Backend backend;
  std::vector<Chunk> chunk_list;
  Tensor gathered;  // [columns, D] operand rows of the shared chunk last formed (the dX GEMM reuses them)

  SampledProblem(const Tensor& input_, const Tensor& weight_, const std::optional<Tensor>& bias_,
                 const Tensor& true_classes_, const Tensor& sampled_, const std::optional<Tensor>& true_log_q_,
                 const std::optional<Tensor>& sampled_log_q_, const SampledOptions& o, bool backward_pass = false)
      : backend(input_) {
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
    params = SampledParams{rows,          weight.size(0),    true_classes.size(1), dim, o.mode,
                           o.hit_mask != int64_t(HitMask::kNone), o.label_smoothing, o.true_label, false, 0, 0};
    chunk_list.push_back({0, params.num_true, kTrueColumns});
    const int64_t chunk = backward_pass && !shared && materializes_outer_products()
                              ? cuda_per_row_chunk_columns(rows, dim, num_sampled, o.chunk_size)
                              : chunk_columns_for(rows, num_sampled, o.chunk_size, input.is_cuda());
    for (const Chunk& c : column_chunks(num_sampled, chunk, shared ? kSharedCandidates : kPerRowCandidates)) {
      chunk_list.push_back(c);
    }
  }

  int64_t rows() const { return params.num_rows; }
  const std::vector<Chunk>& chunks() const { return chunk_list; }
  at::TensorOptions options() const { return input.options(); }

  // Whether the per-row candidates' weight gradient goes through index_add_
  // of an outer-product block (CUDA, deterministic algorithms) rather than a
  // direct scatter (the CPU's ordered kernel, CUDA's atomics).
  bool materializes_outer_products() const {
    return backend.is_cuda() && at::globalContext().deterministicAlgorithms();
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

  SampledParams params_of(const Chunk& c) const {
    SampledParams p = params;
    p.is_true_chunk = c.kind == kTrueColumns;
    p.chunk_columns = c.columns;
    p.logits_stride = c.columns;
    return p;
  }

  // Pointer to the chunk's first id and the stride between rows.
  std::pair<const int64_t*, int64_t> ids_of(const Chunk& c) const {
    if (c.kind == kTrueColumns) return {true_classes.data_ptr<int64_t>(), params.num_true};
    return {sampled.data_ptr<int64_t>() + c.start, shared ? 0 : num_sampled};
  }

  template <typename acc_t>
  SampledColumns<acc_t> columns_of(const Chunk& c) const {
    const bool is_true = c.kind == kTrueColumns;
    const auto [ids, id_stride] = ids_of(c);
    const Tensor& log_q = is_true ? true_log_q : sampled_log_q;
    const int64_t offset = is_true ? 0 : c.start;
    return SampledColumns<acc_t>{
        ids,
        id_stride,
        log_q.defined() ? log_q.data_ptr<acc_t>() + offset : nullptr,
        id_stride,
        (maskable.defined() && !is_true) ? maskable.data_ptr<bool>() + c.start : nullptr,
        bias.defined() ? bias.data_ptr<acc_t>() : nullptr,
        true_classes.data_ptr<int64_t>()};
  }

  // Raw logits x_i . W[id] of the chunk.
  template <typename acc_t>
  void chunk_logits(const Chunk& c, Tensor& logits) {
    if (c.kind == kSharedCandidates) {
      gathered = weight.index_select(0, sampled.narrow(0, c.start, c.columns)).to(operand_dtype);
      matmul_into(logits, input, gathered.t(), /*accumulate=*/false);
      return;
    }
    const auto [ids, id_stride] = ids_of(c);
    with_typed_data<acc_t>(input_raw, [&](auto* x) {
      using in_t = std::remove_pointer_t<decltype(x)>;
      backend.run(FUSEDLOSS_KERNELS(sampled_row_dot<in_t, acc_t>), params_of(c), x, weight.data_ptr<in_t>(), ids,
                  id_stride, c.columns, logits.data_ptr<acc_t>(), c.columns);
    });
  }

  // The [6, N] row state (see SampledRowState) of rows not yet seen.
  Tensor empty_row_state() const {
    Tensor state = at::zeros({6, rows()}, options().dtype(acc_dtype));
    state[0].fill_(-std::numeric_limits<double>::infinity());
    return state;
  }

  template <typename acc_t>
  static SampledRowState<acc_t> row_state_at(const Tensor& state, int64_t row) {
    return {state[0].data_ptr<acc_t>() + row, state[1].data_ptr<acc_t>() + row, state[2].data_ptr<acc_t>() + row,
            state[3].data_ptr<acc_t>() + row, state[4].data_ptr<acc_t>() + row, state[5].data_ptr<acc_t>() + row};
  }

  // Every (row, column) id in chunk order: the true classes, then the candidates.
  Tensor all_ids() const { return at::cat({true_classes.view(-1), sampled.view(-1)}); }

  // The slice of a per-(row, column) map laid out like all_ids() that belongs
  // to chunk c, flattened row-major like the chunk's tile.
  Tensor chunk_slice(const Tensor& map, const Chunk& c) const {
    const int64_t rows = params.num_rows, true_count = rows * params.num_true;
    if (c.kind == kTrueColumns) return map.narrow(0, 0, true_count);
    const Tensor candidates = map.narrow(0, true_count, sampled.numel());
    if (shared) return candidates.narrow(0, c.start, c.columns);
    return candidates.view({rows, num_sampled}).narrow(1, c.start, c.columns).reshape(-1);
  }
};

struct SampledForward : SampledProblem {
  using SampledProblem::SampledProblem;
  Tensor state, loss, stats;

  template <typename acc_t>
  SampledRowState<acc_t> row_state() {
    return row_state_at<acc_t>(state, 0);
  }
  template <typename acc_t>
  void fold(const Chunk& c, Tensor& logits) {
    backend.run(FUSEDLOSS_KERNELS(sampled_accumulate_chunk<acc_t>), params_of(c), columns_of<acc_t>(c),
                logits.data_ptr<acc_t>(), row_state<acc_t>());
  }
  template <typename acc_t>
  void finalize() {
    backend.run(FUSEDLOSS_KERNELS(sampled_finalize<acc_t>), params, row_state<acc_t>(), loss.data_ptr<acc_t>(),
                stats.data_ptr<acc_t>());
  }

  void run() {
    const auto acc_opts = options().dtype(acc_dtype);
    state = empty_row_state();
    loss = at::empty({rows()}, acc_opts);
    stats = at::empty({3, rows()}, acc_opts);
    forward_chunks(*this);
  }
};

// Weight/bias gradient rows are scattered at `row_map`: the class ids
// themselves (dense [C, D] result) or, for sparse_grad, each id's position
// among the sorted unique touched ids ([U, D] values of a coalesced COO tensor).
struct SampledBackward : SampledProblem {
  using SampledProblem::SampledProblem;
  Tensor grad_rows, stats, row_map, touched;
  bool need_input = false, need_weight = false, need_bias = false;
  Tensor grad_input_acc, grad_weight_acc, grad_bias_acc;
  Tensor input_for_weight, input_acc;

  template <typename acc_t>
  Tensor chunk_dlogits(const Chunk& c, Tensor& logits, Tensor& dlogits_workspace) {
    // Row-wise chunks keep their dlogits in place, in the accumulation dtype
    // (the row kernels and scatters read them there); shared chunks write the
    // GEMM operand dtype.
    const Tensor& dlogits = c.kind == kSharedCandidates ? dlogits_workspace : logits;
    with_typed_data<acc_t>(dlogits, [&](auto* out) {
      using grad_t = std::remove_pointer_t<decltype(out)>;
      backend.run(FUSEDLOSS_KERNELS(sampled_chunk_grad<acc_t, grad_t>), params_of(c), columns_of<acc_t>(c),
                  logits.data_ptr<acc_t>(), stats.data_ptr<acc_t>(), grad_rows.data_ptr<acc_t>(), out);
    });
    return dlogits;
  }

  void chunk_gradients(const Chunk& c, const Tensor& dlogits) {
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "sampled_chunk_gradients", [&] {
      using acc_t = scalar_t;
      const Tensor map = row_map.defined() ? chunk_slice(row_map, c) : Tensor();
      if (c.kind == kSharedCandidates) {
        if (need_input) matmul_into(grad_input_acc, dlogits, gathered, /*accumulate=*/true);
        if (need_weight) {
          Tensor chunk_grad = empty_buffer({c.columns, params.dim}, options().dtype(acc_dtype));
          matmul_into(chunk_grad, dlogits.t(), input_for_weight, /*accumulate=*/false);
          scatter_rows<acc_t>(grad_weight_acc, map, chunk_grad);
        }
        if (need_bias) scatter_rows<acc_t>(grad_bias_acc, map, dlogits.sum(0, false, acc_dtype));
        return;
      }
      if (need_input) {
        const auto [ids, id_stride] = ids_of(c);
        with_typed_data<acc_t>(weight, [&](auto* w) {
          using in_t = std::remove_pointer_t<decltype(w)>;
          backend.run(FUSEDLOSS_KERNELS(sampled_row_axpy<in_t, acc_t>), params_of(c), dlogits.data_ptr<acc_t>(),
                      c.columns, w, ids, id_stride, c.columns, grad_input_acc.data_ptr<acc_t>());
        });
      }
      if (need_weight) scatter_outer<acc_t>(grad_weight_acc, map, dlogits, input_acc);
      if (need_bias) scatter_rows<acc_t>(grad_bias_acc, map, dlogits.reshape(-1));
    });
  }

  // dst[index[r]] += src[r] (rows of a [R, D] or [R] accumulator). The CPU
  // kernel is deterministic; on CUDA index_add_ uses atomics, or ATen's sort +
  // segment-sum path (index_put_ with accumulate) under
  // torch.use_deterministic_algorithms(True), so the sums are reproducible then.
  template <typename acc_t>
  void scatter_rows(Tensor& dst, const Tensor& index, const Tensor& src) const {
    if (backend.is_cuda()) {
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
    if (materializes_outer_products()) {
      dst.index_add_(0, index, (dz.unsqueeze(2) * x.unsqueeze(1)).view({-1, x.size(1)}));
      return;
    }
    const Tensor idx = index.contiguous(), values = dz.contiguous(), rows = x.contiguous();
    backend.run(FUSEDLOSS_KERNELS(sampled_scatter_outer<acc_t>), values.data_ptr<acc_t>(), rows.data_ptr<acc_t>(),
                idx.data_ptr<int64_t>(), values.size(0), values.size(1), rows.size(1), dst.data_ptr<acc_t>());
  }

  // The accumulators and scatter maps of the gradients asked for, given
  // every row's upstream gradient.
  void prepare_gradients(const Tensor& row_grads, bool sparse_grad, std::array<bool, 3> output_mask) {
    const int64_t n = rows(), dim = params.dim;
    need_input = output_mask[0];
    need_weight = output_mask[1];
    need_bias = output_mask[2] && bias.defined();
    const auto acc_opts = options().dtype(acc_dtype);
    grad_rows = row_grads.reshape({n}).to(acc_dtype).contiguous();
    int64_t out_rows = weight.size(0);
    if (need_weight || need_bias) {
      row_map = all_ids();
      if (sparse_grad) {
        std::tie(touched, row_map) = at::_unique(row_map, /*sorted=*/true, /*return_inverse=*/true);
        out_rows = touched.numel();
      }
    }
    grad_input_acc = need_input ? zeros_buffer({n, dim}, acc_opts) : Tensor();
    grad_weight_acc = need_weight ? zeros_buffer({out_rows, dim}, acc_opts) : Tensor();
    grad_bias_acc = need_bias ? at::zeros({out_rows}, acc_opts) : Tensor();
    if (need_weight) {
      // Rows with zero upstream gradient feed the weight gradient nothing, even
      // holding inf/NaN (see zero_rows_where).
      input_for_weight = zero_rows_where(input, grad_rows.eq(0));
      input_acc = input_for_weight.to(acc_dtype);
    }
  }

  // The gradients in the inputs' dtypes: dense, or coalesced sparse COO
  // tensors over the touched rows.
  std::tuple<Tensor, Tensor, Tensor> finish_gradients(const Tensor& input_, const Tensor& weight_,
                                                      const std::optional<Tensor>& bias_, bool sparse_grad) const {
    const auto finish = [&](const Tensor& acc, at::IntArrayRef dense_size, at::ScalarType dtype) {
      if (!sparse_grad) return to_buffer(acc, dtype);
      std::vector<int64_t> size(dense_size.begin(), dense_size.end());
      return at::_sparse_coo_tensor_unsafe(touched.unsqueeze(0), acc.to(dtype), size)._coalesced_(true);
    };
    Tensor grad_input = need_input ? to_buffer(grad_input_acc, input_.scalar_type()) : at::empty({0}, input_.options());
    Tensor grad_weight = need_weight ? finish(grad_weight_acc, weight_.sizes(), weight_.scalar_type())
                                     : at::empty({0}, weight_.options());
    Tensor grad_bias = need_bias ? finish(grad_bias_acc, bias_->sizes(), bias_->scalar_type())
                                 : at::empty({0}, input_.options());
    return {grad_input, grad_weight, grad_bias};
  }

  std::tuple<Tensor, Tensor, Tensor> run(const Tensor& grad_loss, const Tensor& stats_in, const Tensor& input_,
                                         const Tensor& weight_, const std::optional<Tensor>& bias_, bool sparse_grad,
                                         std::array<bool, 3> output_mask) {
    const int64_t n = rows();
    TORCH_CHECK_VALUE(grad_loss.numel() == n && stats_in.numel() == 3 * n, "sampled_backward: grad_loss must have N=",
                      n, " elements and stats [3, N]");
    stats = stats_in.to(acc_dtype).contiguous();
    prepare_gradients(grad_loss, sparse_grad, output_mask);
    if (need_input || need_weight || need_bias) backward_chunks(*this);
    return finish_gradients(input_, weight_, bias_, sparse_grad);
  }
};

// sum_i loss_i / normalizer and its gradients for shared [K] candidates in one
// pass over row blocks (chunk_driver.h's single_pass): the candidates' weight
// rows are gathered once; per block, the row-wise dot fills the true columns
// and one GEMM the candidates of an [R, T + K] fp32 tile, one row kernel folds,
// finalizes and writes the dlogits over it, and the gradients follow: dX rows
// from one GEMM (+ the true columns' axpy), the candidates' dW from dlogits^T X
// accumulated over blocks in fp32 and scattered once at the end (the true
// columns' rows scattered per block, in row order: deterministic on the CPU).
struct SampledSinglePass : SampledBackward {
  using SampledBackward::SampledBackward;
  int64_t block_rows = 0;
  Tensor state, loss, block_stats, candidate_grad_acc, candidate_bias_acc;
  Tensor inverse;          // 0-dim 1 / normalizer, applied after the row kernel (fp16 operands only)
  Tensor candidate_log_q;  // [K] log Q - bias[id], when there is a bias

  // The tile's row: the T true columns, then the K candidates from
  // candidate_offset(), both starts multiples of 16 elements (like the row
  // stride: aligned_columns).
  int64_t candidate_offset() const { return aligned_columns(params.num_true); }
  int64_t columns() const { return candidate_offset() + aligned_columns(num_sampled); }
  // The true columns' scatters read fp32 dlogits; the candidates' GEMMs get a copy.
  at::ScalarType dlogits_dtype() const { return acc_dtype; }
  std::vector<RowBlock> blocks() const { return row_blocks(rows(), block_rows); }

  // The params of block r's tile, describing its candidates.
  SampledParams block_params(const RowBlock& r) const {
    SampledParams p = params;
    p.num_rows = r.count;
    p.is_true_chunk = false;
    p.chunk_columns = num_sampled;
    p.logits_stride = columns();  // the tile's row stride
    return p;
  }

  // The column sources of chunk c for the rows of block r.
  template <typename acc_t>
  SampledColumns<acc_t> block_columns(const Chunk& c, const RowBlock& r) const {
    SampledColumns<acc_t> cols = columns_of<acc_t>(c);
    cols.true_classes += r.start * params.num_true;
    if (c.kind == kTrueColumns) {
      cols.ids += r.start * params.num_true;
      if (cols.log_q != nullptr) cols.log_q += r.start * params.num_true;
    } else if (candidate_log_q.defined()) {
      // Shared candidates: bias[id] - log Q folded into one [K] offset.
      cols.log_q = candidate_log_q.data_ptr<acc_t>();
      cols.bias = nullptr;
    }
    return cols;
  }

  // The shared candidates' log Q - bias[id] (what every row subtracts from
  // its raw logit), formed once instead of gathered per row; an invalid id's
  // bias entry is read clamped (its logit is NaN-poisoned by the kernels).
  void fold_candidate_offsets() {
    if (!bias.defined()) return;
    const Tensor ids = sampled.clamp(0, weight.size(0) - 1);
    Tensor offsets = bias.index_select(0, ids).neg();
    if (sampled_log_q.defined()) offsets.add_(sampled_log_q);
    candidate_log_q = offsets.contiguous();
  }

  Chunk true_columns() const { return {0, params.num_true, kTrueColumns}; }
  Chunk candidates() const { return {0, num_sampled, kSharedCandidates}; }
  const int64_t* true_ids_of(const RowBlock& r) const {
    return true_classes.data_ptr<int64_t>() + r.start * params.num_true;
  }

  template <typename acc_t>
  void fold_rows(const RowBlock& r, Tensor& tile) {
    with_typed_data<acc_t>(input_raw, [&](auto* x) {
      using in_t = std::remove_pointer_t<decltype(x)>;
      backend.run(FUSEDLOSS_KERNELS(sampled_row_dot<in_t, acc_t>), block_params(r), x + r.start * params.dim,
                  weight.data_ptr<in_t>(), true_ids_of(r), params.num_true, params.num_true,
                  tile.data_ptr<acc_t>(), columns());
    });
    Tensor candidate_logits = tile.narrow(1, candidate_offset(), num_sampled);
    matmul_into(candidate_logits, input.narrow(0, r.start, r.count), gathered.t(), /*accumulate=*/false);
  }

  template <typename acc_t>
  void rows_dlogits(const RowBlock& r, Tensor& tile, Tensor& /*dlogits: the tile itself*/) {
    backend.run(FUSEDLOSS_KERNELS(sampled_single_pass_rows<acc_t>), block_params(r),
                block_columns<acc_t>(true_columns(), r), block_columns<acc_t>(candidates(), r), candidate_offset(),
                tile.data_ptr<acc_t>(), row_state_at<acc_t>(state, r.start), loss.data_ptr<acc_t>() + r.start,
                block_stats.data_ptr<acc_t>(), grad_rows.data_ptr<acc_t>() + r.start);
  }

  void rows_gradients(const RowBlock& r, const Tensor& dlogits) {
    const int64_t t = params.num_true;
    const Tensor true_dlogits = dlogits.narrow(1, 0, t);
    const Tensor candidate_dlogits_acc = dlogits.narrow(1, candidate_offset(), num_sampled);
    const Tensor candidate_dlogits = candidate_dlogits_acc.to(operand_dtype);
    const Tensor true_map = row_map.defined() ? row_map.narrow(0, r.start * t, r.count * t) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "sampled_rows_gradients", [&] {
      using acc_t = scalar_t;
      if (need_input) {
        Tensor grad_input_rows = grad_input_acc.narrow(0, r.start, r.count);
        matmul_into(grad_input_rows, candidate_dlogits, gathered, /*accumulate=*/false);
        with_typed_data<acc_t>(weight, [&](auto* w) {
          using in_t = std::remove_pointer_t<decltype(w)>;
          backend.run(FUSEDLOSS_KERNELS(sampled_row_axpy<in_t, acc_t>), block_params(r), dlogits.data_ptr<acc_t>(),
                      columns(), w, true_ids_of(r), t, t, grad_input_rows.data_ptr<acc_t>());
        });
      }
      if (need_weight) {
        matmul_into(candidate_grad_acc, candidate_dlogits.t(), input_for_weight.narrow(0, r.start, r.count),
                    /*accumulate=*/r.start > 0);
        // With `inverse`, input_acc holds x / normalizer (sampled_sum_and_grad).
        scatter_outer<acc_t>(grad_weight_acc, true_map, true_dlogits.contiguous(),
                             input_acc.narrow(0, r.start, r.count));
      }
      if (need_bias) {
        candidate_bias_acc.add_(candidate_dlogits_acc.sum(0));
        scatter_rows<acc_t>(grad_bias_acc, true_map,
                            (inverse.defined() ? true_dlogits.mul(inverse) : true_dlogits.contiguous()).view(-1));
      }
    });
  }

  // t, multiplied in place by `inverse` when the row kernel left it out.
  const Tensor& scaled(const Tensor& t) const { return inverse.defined() ? t.mul_(inverse) : t; }

  // The candidates' gradient rows, accumulated over every block, scattered
  // (and dX, both scaled by `inverse` when the row kernel left it out).
  void finish_candidates() {
    if (need_input) scaled(grad_input_acc);
    if (!need_weight && !need_bias) return;
    const Tensor candidate_map = row_map.narrow(0, rows() * params.num_true, num_sampled);
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "sampled_scatter_candidates", [&] {
      if (need_weight) scatter_rows<scalar_t>(grad_weight_acc, candidate_map, scaled(candidate_grad_acc));
      if (need_bias) scatter_rows<scalar_t>(grad_bias_acc, candidate_map, scaled(candidate_bias_acc));
    });
  }
};

// The recompute pair with the single pass's interface, for per-row candidates
// and when no block fits the budget.
std::tuple<Tensor, Tensor, Tensor, Tensor> sampled_recompute_sum_and_grad(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& true_classes,
    const Tensor& sampled, const std::optional<Tensor>& true_log_q, const std::optional<Tensor>& sampled_log_q,
    const SampledOptions& opts, bool sparse_grad, const Tensor& grad_rows, std::array<bool, 3> output_mask) {
  SampledForward forward(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts);
  forward.run();
  SampledBackward backward(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts,
                           /*backward_pass=*/true);
  auto [gi, gw, gb] = backward.run(grad_rows, forward.stats, input, weight, bias, sparse_grad, output_mask);
  return {forward.loss.mul(grad_rows).sum(), gi, gw, gb};
}

// The loss and gradients of sum_i loss_i / normalizer (a 0-dim tensor, or
// none for 1) formed in the forward, so that the autograd backward only
// scales them; memory_budget bounds the tile in bytes (0: the default),
// row_block > 0 forces the block size. Shared [K] candidates only: per-row
// [N, K] candidates run the recompute pair.
std::tuple<Tensor, Tensor, Tensor, Tensor> sampled_sum_and_grad(
    const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& true_classes,
    const Tensor& sampled, const std::optional<Tensor>& true_log_q, const std::optional<Tensor>& sampled_log_q,
    const std::optional<Tensor>& normalizer, int64_t mode, int64_t hit_mask, double label_smoothing,
    double true_label, bool sparse_grad, int64_t row_block, int64_t memory_budget, std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(input.device());
  const SampledOptions opts{mode, hit_mask, label_smoothing, true_label, 0};
  check_sampled(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts);
  checks::normalizer(kOp, normalizer, input);
  TORCH_CHECK_VALUE(memory_budget >= 0, kOp, ": memory_budget must be >= 0 bytes, got ", memory_budget);
  const int64_t rows = input.size(0), dim = input.size(1);
  const Tensor grad_rows = normalized_row_grads(normalizer, rows, input.options().dtype(accumulation_dtype(
                                                                      input.scalar_type())));
  SampledSinglePass pass(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts);
  if (pass.shared) {
    pass.block_rows =
        sampled_single_pass_block_rows(rows, pass.params.num_true, pass.num_sampled, dim,
                                       pass.operand_dtype != pass.acc_dtype, input.is_cuda(), row_block, memory_budget);
  }
  if (!pass.shared || pass.block_rows == 0) {
    return sampled_recompute_sum_and_grad(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts,
                                          sparse_grad, grad_rows, output_mask);
  }
  const auto acc_opts = input.options().dtype(pass.acc_dtype);
  // The row kernel forms the dlogits of sum_i loss_i / normalizer directly,
  // except for fp16 GEMM operands: there it forms them for an upstream
  // gradient of 1 and the gradients are scaled by 1 / normalizer afterwards,
  // since a mean's dlogits (≈ p / N) would underflow in the fp16 copy.
  const bool scale_after = pass.operand_dtype == at::kHalf;
  pass.prepare_gradients(scale_after ? at::ones({rows}, acc_opts) : grad_rows, sparse_grad, output_mask);
  if (scale_after) {
    pass.inverse = grad_rows.numel() > 0 ? grad_rows[0] : at::ones({}, acc_opts);
    if (pass.need_weight) pass.input_acc = pass.input_acc.mul(pass.inverse);  // the true columns' outer products
  }
  pass.state = pass.empty_row_state();
  pass.loss = at::empty({rows}, acc_opts);
  pass.block_stats = at::empty({3, std::min(pass.block_rows, std::max<int64_t>(rows, 1))}, acc_opts);
  pass.gathered = weight.index_select(0, sampled).to(pass.operand_dtype);
  pass.fold_candidate_offsets();
  if (pass.need_weight) pass.candidate_grad_acc = zeros_buffer({pass.num_sampled, dim}, acc_opts);
  if (pass.need_bias) pass.candidate_bias_acc = at::zeros({pass.num_sampled}, acc_opts);
  single_pass(pass);
  pass.finish_candidates();
  auto [gi, gw, gb] = pass.finish_gradients(input, weight, bias, sparse_grad);
  return {pass.loss.mul(grad_rows).sum(), gi, gw, gb};
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
  check_sampled(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts);
  SampledForward pass(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts);
  pass.run();
  return {pass.loss, pass.stats};
}

// Checks only the sizes of what the forward produced.
std::tuple<Tensor, Tensor, Tensor> sampled_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& true_classes, const Tensor& sampled, const std::optional<Tensor>& true_log_q,
    const std::optional<Tensor>& sampled_log_q, const Tensor& stats, int64_t mode, int64_t hit_mask,
    double label_smoothing, double true_label, int64_t chunk_size, bool sparse_grad, std::array<bool, 3> output_mask) {
  c10::DeviceGuard guard(input.device());
  const SampledOptions opts{mode, hit_mask, label_smoothing, true_label, chunk_size};
  SampledBackward pass(input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, opts,
                       /*backward_pass=*/true);
  return pass.run(grad_loss, stats, input, weight, bias, sparse_grad, output_mask);
}

}  // namespace

int64_t sampled_single_pass_block_rows(int64_t rows, int64_t num_true, int64_t num_sampled, int64_t dim,
                                       bool half_operands, bool cuda, int64_t row_block, int64_t memory_budget) {
  // The tile's row (SampledSinglePass::columns): T + K fp32 logits, each part
  // padded to 16, plus a half-precision copy of the candidates' dlogits for
  // half GEMM operands (CUDA); once per pass, the candidates' fp32 [K, D]
  // gradient.
  const int64_t columns = aligned_columns(num_true) + aligned_columns(num_sampled);
  const int64_t half_copy = half_operands ? num_sampled / 2 : 0;
  // Default: 64 MiB on the CPU (twice the recompute pair's workspace: the
  // [2048, 16 + 4096] tile of the bench's shape in one block, 2-4 % faster
  // than two, where the second is a 263-row GEMM), 512 MiB on CUDA. A block
  // adds only its [K, D] dW accumulation, so smaller blocks cost little.
  const int64_t budget = memory_budget > 0 ? memory_budget : (cuda ? int64_t(512) << 20 : int64_t(64) << 20);
  return choose_block_rows(rows, columns + half_copy, row_block, budget, 4 * num_sampled * dim, cuda);
}

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
  m.def(
      "sampled_sum_and_grad(Tensor input, Tensor weight, Tensor? bias, Tensor true_classes, Tensor sampled, "
      "Tensor? true_log_q, Tensor? sampled_log_q, Tensor? normalizer, int mode, int hit_mask, "
      "float label_smoothing, float true_label, bool sparse_grad, int row_block, int memory_budget, "
      "bool[3] output_mask) -> (Tensor loss_sum, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("sampled_forward", &sampled_forward);
  m.impl("sampled_backward", &sampled_backward);
  m.impl("sampled_sum_and_grad", &sampled_sum_and_grad);
}

#ifdef FUSEDLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("sampled_forward", &sampled_forward);
  m.impl("sampled_backward", &sampled_backward);
  m.impl("sampled_sum_and_grad", &sampled_sum_and_grad);
}
#endif

}  // namespace fusedloss
