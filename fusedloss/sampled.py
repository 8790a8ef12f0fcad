"""Sampled softmax and NCE losses with TensorFlow's semantics, fused.

``sampled_softmax_loss(x, W, y, K)`` scores each row against its true classes
and K sampled candidate classes (shared by the batch, or per row, or the other
rows' targets) and never materialises the [N, num_true + K] logits nor a
gathered [K, D] copy beyond one chunk: the kernels walk the candidates in
chunks with an online log-sum-exp (softmax) or a running sum of sigmoid
cross-entropies (NCE), and the backward recomputes each chunk (see
docs/sampled.md).

Differences from ``tf.nn.sampled_softmax_loss`` / ``tf.nn.nce_loss`` (which
``fusedloss.compat.tf`` reproduces to the letter):

- an accidental hit masks *every* copy of the true class among the candidates
  (TensorFlow masks only the last copy of a duplicated id);
- NCE labels the true columns 1 (TensorFlow uses 1/num_true);
- masked columns are skipped, not offset by -FLT_MAX, so bf16/fp16 losses stay
  finite and masked columns get exactly zero gradient;
- ``subtract_log_q`` is public (False gives word2vec-style negative sampling).
"""
import dataclasses
from typing import Any, Optional

import torch

from . import _common, _ops, _validate
# The op's enums (defined once in csrc/include/fusedloss/sampled.h, read by _ops), also names of this module.
from ._ops import HIT_ALL_COPIES, HIT_LAST_COPY, HIT_NONE, NCE, SOFTMAX  # noqa: F401
from ._validate import check_generator, check_positive_int
from .samplers import LogUniformSampler, UniformSampler


@dataclasses.dataclass(frozen=True)
class SampledOptions:
    """The settings of one sampled loss, everything but its tensors and
    generator: built by :func:`sampled_softmax_loss` / :func:`nce_loss`,
    ``fusedloss.compat.tf`` and ``fusedloss.distributed``, and read by the
    drivers (:func:`_sampled_loss`, the distributed ``_sharded_sampled``)."""

    mode: int                          # SOFTMAX or NCE (the op's enum)
    num_sampled: Optional[int] = None  # K; unused with sampled_values or sampler="in_batch"
    num_classes: Optional[int] = None  # range of the targets and the sampler; None: weight.shape[0]
    sampler: Any = "log_uniform"       # "log_uniform", "uniform", "in_batch" or an object with .sample(...)
    unique: bool = True                # draw without replacement
    hit_mask: int = HIT_ALL_COPIES     # accidental hits masked: HIT_NONE, HIT_ALL_COPIES, HIT_LAST_COPY (TensorFlow)
    subtract_log_q: bool = True
    label_smoothing: float = 0.0       # softmax only
    true_label: float = 1.0            # NCE's label of a true column (TensorFlow: 1 / num_true)
    reduction: str = "mean"
    sparse_grad: bool = False
    chunk_size: Optional[int] = None     # forces the recompute pair
    memory_budget: Optional[int] = None  # bytes of the single pass's [rows, T + K] tile

    @classmethod
    def native(cls, mode, *, remove_accidental_hits, **settings):
        """Options of the native API, where an accidental hit masks every copy of the true class."""
        return cls(mode, hit_mask=HIT_ALL_COPIES if remove_accidental_hits else HIT_NONE, **settings)

    @property
    def fn(self):
        """The public function the errors name."""
        return "sampled_softmax_loss" if self.mode == SOFTMAX else "nce_loss"


def _check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _true_classes(target, rows):
    target = _validate.as_index_tensor(_check_tensor(target, "target"))
    if target.dim() == 1:
        target = target.unsqueeze(1)
    if target.dim() != 2 or target.shape[0] != rows or target.shape[1] < 1:
        raise ValueError(f"target must be [N] or [N, num_true] with N={rows}, got shape {tuple(target.shape)}")
    return target


def _make_sampler(sampler, num_classes):
    if hasattr(sampler, "sample"):  # a fusedloss.samplers.CandidateSampler or a duck-typed one
        return sampler
    if sampler == "log_uniform":
        return LogUniformSampler(num_classes)
    if sampler == "uniform":
        return UniformSampler(num_classes)
    raise ValueError(
        f"sampler must be 'log_uniform', 'uniform', 'in_batch' or an object with .sample(...), got {sampler!r}"
    )


def in_batch_candidates(true_classes):
    """In-batch negatives: every row's true classes become candidates of every
    row. The expected count of a candidate is how often its class occurs in the
    batch, so subtracting log Q corrects for frequent classes appearing more
    often (sampling-bias correction); each copy of a class is a column.
    Returns TensorFlow's triple."""
    flat = true_classes.reshape(-1)
    _, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    freq = counts.to(torch.float32)[inverse]
    return flat, freq.view(true_classes.shape), freq


def _check_sampled_values(sampled_values, true_classes, rows, device):
    if not isinstance(sampled_values, (tuple, list)) or len(sampled_values) != 3:
        raise ValueError("sampled_values must be a tuple (sampled, true_expected_count, sampled_expected_count)")
    sampled, true_count, sampled_count = sampled_values
    sampled = _validate.as_index_tensor(_check_tensor(sampled, "sampled_values[0]"), "sampled_values[0]")
    true_count = _check_tensor(true_count, "sampled_values[1]")
    sampled_count = _check_tensor(sampled_count, "sampled_values[2]")
    if sampled.dim() not in (1, 2) or (sampled.dim() == 2 and sampled.shape[0] != rows):
        raise ValueError(
            f"sampled_values[0] must be [K] (shared) or [N, K] (per row) with N={rows}, got {tuple(sampled.shape)}"
        )
    if tuple(sampled_count.shape) != tuple(sampled.shape):
        raise ValueError(
            f"sampled_values[2] (sampled expected counts) must have the shape of sampled_values[0] "
            f"{tuple(sampled.shape)}, got {tuple(sampled_count.shape)}"
        )
    if true_count.dim() == 1:
        true_count = true_count.unsqueeze(1)
    shape = tuple(true_classes.shape)
    if true_count.dim() != 2 or true_count.shape[0] != rows or true_count.shape[1] not in (1, shape[1]):
        raise ValueError(
            f"sampled_values[1] (true expected counts) must be [N, num_true]={list(shape)} or [N, 1], "
            f"got {tuple(true_count.shape)}"
        )
    for t, name in ((sampled, "sampled_values[0]"), (true_count, "sampled_values[1]"),
                    (sampled_count, "sampled_values[2]")):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but input is on {device}")
    for t, name in ((true_count, "sampled_values[1]"), (sampled_count, "sampled_values[2]")):
        if not t.is_floating_point():
            raise TypeError(f"{name} (expected counts) must be floating point, got {t.dtype}")
    return sampled, true_count.expand(shape), sampled_count


def _check_log_q_counts(true_count, sampled_count):
    """Expected counts must be positive and finite to subtract their log (TensorFlow
    returns NaN losses instead). Data-dependent, so skipped where values cannot be read."""
    for t, name in ((true_count, "sampled_values[1] (true expected counts)"),
                    (sampled_count, "sampled_values[2] (sampled expected counts)")):
        if t.numel() == 0 or not _validate.should_check_values(t):
            continue
        bad = ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            raise ValueError(f"{name} must be positive and finite when subtract_log_q=True (log Q would be -inf or "
                             f"NaN), got {t[bad].flatten()[0].item()}; a class the sampler cannot draw has count 0")


def _candidates(options, true_classes, num_classes, generator, prefix="", share=None):
    """Candidates when the caller gives no sampled_values: the batch's targets
    (``sampler="in_batch"``) or a draw of the options' sampler, passed through
    ``share`` (the distributed losses broadcast one draw). Returns TensorFlow's
    triple and the hit mask to apply."""
    if options.sampler == "in_batch":
        # A row's own targets are among the candidates: they must never act as negatives.
        return in_batch_candidates(true_classes), HIT_ALL_COPIES
    if options.num_sampled is None:
        raise ValueError(f"{prefix}num_sampled is required unless sampled_values or sampler='in_batch' is given")
    drawn = _make_sampler(options.sampler, num_classes).sample(true_classes, options.num_sampled,
                                                               unique=options.unique, generator=generator)
    return (drawn if share is None else share(drawn)), options.hit_mask


def _sampled_loss(options, *, input, weight, target, bias=None, sampled_values=None, generator=None):
    """The driver of the native, TF-compatible and distributed sampled losses:
    checks, candidates, the fused op; returns the reduced losses. A DTensor
    weight goes to ``fusedloss.distributed.dtensor``."""
    if _common.is_dtensor(weight) or _common.is_dtensor(bias):
        from .distributed import dtensor
        return dtensor.sampled_loss(options, input=input, weight=weight, target=target, bias=bias,
                                    sampled_values=sampled_values, generator=generator)
    _validate.check_reduction(options.reduction)
    input = _check_tensor(input, "input")
    weight = _check_tensor(weight, "weight")
    if input.dim() != 2:
        raise ValueError(f"input must be [N, D], got shape {tuple(input.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [num_classes, D], got shape {tuple(weight.shape)}")
    _validate.check_optional_positive_int(options.chunk_size, "chunk_size")
    _validate.check_optional_positive_int(options.memory_budget, "memory_budget")
    rows = input.shape[0]
    true_classes = _true_classes(target, rows)
    _validate.check_same_device(options.fn, input=input, weight=weight, target=true_classes, bias=bias)
    check_generator(generator, input.device)
    num_classes = options.num_classes
    num_classes = weight.shape[0] if num_classes is None else check_positive_int(num_classes, "num_classes")
    if num_classes > weight.shape[0]:
        raise ValueError(f"num_classes={num_classes} exceeds the {weight.shape[0]} rows of weight")
    _validate.check_index_range(true_classes, num_classes, "target")

    hit_mask = options.hit_mask
    if sampled_values is None:
        sampled_values, hit_mask = _candidates(options, true_classes, num_classes, generator)
    sampled, true_count, sampled_count = _check_sampled_values(sampled_values, true_classes, rows, input.device)
    _validate.check_index_range(sampled, num_classes, "sampled candidates")
    if options.subtract_log_q:
        _check_log_q_counts(true_count, sampled_count)

    acc = _common.acc_dtype(input.dtype)
    # Expected counts carry no gradient (TensorFlow's stop_gradient); log Q is
    # taken in fp32 whatever the input dtype, so bf16 inputs need no bf16 counts.
    true_log_q = torch.log(true_count.detach().to(acc)) if options.subtract_log_q else None
    sampled_log_q = torch.log(sampled_count.detach().to(acc)) if options.subtract_log_q else None
    input, weight, bias = _common.autocast_inputs(input.device.type, input, weight, bias)
    if (sampled.dim() == 1 and options.chunk_size is None
            and _common.wants_single_pass(options.reduction, input.device, input, weight, bias)):
        # Shared candidates: the gradients formed in the forward (one gather,
        # three GEMMs); mean divides inside the op (no host sync).
        acc_rows = torch.full((), rows, dtype=acc, device=input.device)
        normalizer = None if options.reduction == "sum" else acc_rows
        mask = [input.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
        total, *_ = _ops.ops.sampled_sum_and_grad(
            input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, normalizer, options.mode,
            hit_mask, float(options.label_smoothing), float(options.true_label), bool(options.sparse_grad), 0,
            int(options.memory_budget or 0), mask)
        return total
    loss, _ = _ops.ops.sampled_forward(
        input, weight, bias, true_classes, sampled, true_log_q, sampled_log_q, options.mode, hit_mask,
        float(options.label_smoothing), float(options.true_label), int(options.chunk_size or 0),
        bool(options.sparse_grad),
    )
    return _common.reduce_rows(loss, None, options.reduction, (rows,))


def sampled_softmax_loss(input, weight, target, num_sampled, bias=None, *, num_classes=None, sampler="log_uniform",
                         unique=True, sampled_values=None, remove_accidental_hits=True, subtract_log_q=True,
                         label_smoothing=0.0, reduction="mean", generator=None, sparse_grad=False, chunk_size=None,
                         memory_budget=None):
    """Sampled softmax cross-entropy (``tf.nn.sampled_softmax_loss`` semantics).

    Row i's logits are ``[x_i.W[y_it] + b[y_it] - log Q(y_it)]_t`` for its
    num_true true classes and ``x_i.W[s_j] + b[s_j] - log Q(s_j)`` for the
    candidates s; the loss is the softmax cross-entropy with target 1/num_true
    on each true column (optionally label-smoothed over the row's unmasked
    columns).

    Args:
        input: [N, D] hidden states (fp32, bf16, fp16; fp64 on the CPU).
        weight: [num_classes, D] class embeddings, same dtype as ``input``;
            or a DTensor (FSDP2's ``Shard(0)``, ``Replicate``): see docs/distributed.md.
        target: [N] or [N, num_true] int64 class ids.
        num_sampled: K, candidates to draw (ignored with ``sampled_values`` or ``sampler="in_batch"``).
        bias: optional [num_classes].
        num_classes: range of the sampler (default ``weight.shape[0]``).
        sampler: ``"log_uniform"`` (TensorFlow's default), ``"uniform"``,
            ``"in_batch"`` (the batch's targets as candidates, log Q from their
            in-batch frequency, the row's own targets always masked as
            accidental hits) or a sampler object from ``fusedloss.samplers``.
        unique: sample without replacement (TensorFlow's rejection sampling).
        sampled_values: ``(sampled, true_expected_count, sampled_expected_count)``
            overriding the sampler; ``sampled`` is [K] (shared) or [N, K]
            (per-row negatives, with sampled counts [N, K]).
        remove_accidental_hits: drop every candidate column equal to one of the
            row's true classes (exactly zero gradient).
        subtract_log_q: subtract log(expected count) from every logit.
        label_smoothing: eps; the target puts (1-eps)/num_true + eps/M on each
            true column and eps/M on each other unmasked column (M unmasked columns).
        reduction: ``"none"`` ([N]), ``"sum"`` or ``"mean"``.
        generator: ``torch.Generator`` on the device of ``input`` for the sampler.
        sparse_grad: return sparse COO gradients for ``weight`` and ``bias``
            (only the touched rows, duplicates summed, coalesced).
        chunk_size: candidate columns per chunk of the recompute algorithm
            (default: sized to a fixed workspace); giving it forces that algorithm.
        memory_budget: bytes of the single pass's fp32 logits tile. With
            shared [K] candidates, a reduced loss that will be differentiated
            (not fp16: see fusedloss/_common.wants_single_pass) gathers the candidates' weight rows once and forms the gradients
            in the forward over row blocks whose [R, num_true + K] tile fits
            the budget (default 64 MiB on the CPU, 512 MiB on CUDA: a
            block only adds a [K, D] dW accumulation, so smaller blocks
            cost little; on CUDA it is
            opt-in with FUSEDLOSS_CUDA_SINGLE_PASS=1 until validated on a GPU);
            extra memory ≈ 4·R·(num_true + K) + 8·K·D bytes. Otherwise (per-row
            candidates, ``reduction="none"``, no block of 64 rows fits) the
            recompute pair runs: a chunked forward and a backward that
            recomputes each chunk.
    """
    options = SampledOptions.native(
        SOFTMAX, num_sampled=num_sampled, num_classes=num_classes, sampler=sampler, unique=unique,
        remove_accidental_hits=remove_accidental_hits, subtract_log_q=subtract_log_q, label_smoothing=label_smoothing,
        reduction=reduction, sparse_grad=sparse_grad, chunk_size=chunk_size, memory_budget=memory_budget)
    return _sampled_loss(options, input=input, weight=weight, target=target, bias=bias, sampled_values=sampled_values,
                         generator=generator)


def nce_loss(input, weight, target, num_sampled, bias=None, *, num_classes=None, sampler="log_uniform", unique=True,
             sampled_values=None, remove_accidental_hits=False, subtract_log_q=True, reduction="mean",
             generator=None, sparse_grad=False, chunk_size=None, memory_budget=None):
    """Noise-contrastive estimation (``tf.nn.nce_loss`` semantics): the sum over
    the row's true and candidate columns of the sigmoid cross-entropy, with
    label 1 on each true column (TensorFlow: 1/num_true, see
    ``fusedloss.compat.tf.nce_loss``) and 0 on the candidates. Arguments as in
    :func:`sampled_softmax_loss`; ``remove_accidental_hits=True`` gives
    "sampled logistic"."""
    options = SampledOptions.native(
        NCE, num_sampled=num_sampled, num_classes=num_classes, sampler=sampler, unique=unique,
        remove_accidental_hits=remove_accidental_hits, subtract_log_q=subtract_log_q, reduction=reduction,
        sparse_grad=sparse_grad, chunk_size=chunk_size, memory_budget=memory_budget)
    return _sampled_loss(options, input=input, weight=weight, target=target, bias=bias, sampled_values=sampled_values,
                         generator=generator)


class _SampledLossModule(_common.LossModule):
    def __init__(self, num_classes, num_sampled=None, *, sampler="log_uniform", unique=True,
                 remove_accidental_hits=True, subtract_log_q=True, reduction="mean", sparse_grad=False,
                 chunk_size=None, memory_budget=None):
        super().__init__(reduction, unique=unique, remove_accidental_hits=remove_accidental_hits,
                         subtract_log_q=subtract_log_q, sparse_grad=sparse_grad, chunk_size=chunk_size,
                         memory_budget=memory_budget)
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.num_sampled = None if num_sampled is None else check_positive_int(num_sampled, "num_sampled")
        _validate.check_optional_positive_int(chunk_size, "chunk_size")
        _validate.check_optional_positive_int(memory_budget, "memory_budget")
        self.sampler = sampler if sampler == "in_batch" else _make_sampler(sampler, self.num_classes)

    def _options(self):
        return dict(num_classes=self.num_classes, sampler=self.sampler, unique=self.unique,
                    remove_accidental_hits=self.remove_accidental_hits, subtract_log_q=self.subtract_log_q,
                    reduction=self.reduction, sparse_grad=self.sparse_grad, chunk_size=self.chunk_size,
                    memory_budget=self.memory_budget)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, num_sampled={self.num_sampled}, sampler={self.sampler}, "
                f"unique={self.unique}, remove_accidental_hits={self.remove_accidental_hits}, "
                f"subtract_log_q={self.subtract_log_q}, reduction={self.reduction!r}")


class SampledSoftmaxLoss(_SampledLossModule):
    """Module form of :func:`sampled_softmax_loss` owning the sampler and options;
    call as ``loss(input, weight, target, bias=None, sampled_values=None, generator=None)``."""

    def __init__(self, num_classes, num_sampled=None, *, label_smoothing=0.0, **kwargs):
        super().__init__(num_classes, num_sampled, **kwargs)
        self.label_smoothing = label_smoothing

    def forward(self, input, weight, target, bias=None, sampled_values=None, generator=None):
        return sampled_softmax_loss(input, weight, target, self.num_sampled, bias, sampled_values=sampled_values,
                                    generator=generator, label_smoothing=self.label_smoothing, **self._options())


class NCELoss(_SampledLossModule):
    """Module form of :func:`nce_loss` (``remove_accidental_hits=False`` by default)."""

    def __init__(self, num_classes, num_sampled=None, *, remove_accidental_hits=False, **kwargs):
        super().__init__(num_classes, num_sampled, remove_accidental_hits=remove_accidental_hits, **kwargs)

    def forward(self, input, weight, target, bias=None, sampled_values=None, generator=None):
        return nce_loss(input, weight, target, self.num_sampled, bias, sampled_values=sampled_values,
                        generator=generator, **self._options())
