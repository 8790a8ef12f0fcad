"""Fused linear + softmax cross-entropy over a full vocabulary.

``linear_cross_entropy(x, W, y)`` equals
``F.cross_entropy(softcap(x @ W.T + b), y, ...) + z_loss * mean(lse**2)``
but never materialises the [N, V] logits: the kernels walk the vocabulary in
chunks, keeping an online log-sum-exp per row, and the backward recomputes
each chunk's logits to form its gradient (see csrc/README.md).
"""
from typing import NamedTuple

import torch

from . import _common, _ops, _validate


class LinearCEOutput(NamedTuple):
    """What ``linear_cross_entropy(..., return_stats=True)`` returns: the loss
    and per-token statistics of the same pass over the vocabulary, each shaped
    like ``target`` and computed from the (softcapped) logits ``z``:
    ``lse = logsumexp(z)``, ``argmax`` (int64; the first index on ties, like
    ``torch.argmax``) and ``entropy = -Σ softmax(z)·log_softmax(z)``. The
    statistics are not differentiated (no gradient flows through them; use
    ``z_loss=`` for an lse penalty). Rows whose target is ``ignore_index`` have
    their features zeroed before the GEMM, so they carry no statistics:
    ``lse`` and ``entropy`` are NaN there and ``argmax`` is -1."""
    loss: torch.Tensor
    lse: torch.Tensor
    argmax: torch.Tensor
    entropy: torch.Tensor


def _target_weights(class_weight, flat_target, valid):
    """class_weight[target] per row, 0 on ignored rows. The index is clamped:
    on CUDA under torch.compile targets are not range-checked (the kernels
    poison such a row with NaN instead), and a gather must not fault on them."""
    index = torch.where(valid, flat_target, 0).clamp(0, class_weight.shape[0] - 1)
    return torch.where(valid, class_weight[index], 0)


def _denominator(reduction, valid, flat_target, class_weight, normalizer):
    """What the summed loss is divided by, or None: the normalizer (with
    reduction='sum'), or for 'mean' the number of valid rows or, with class
    weights, Σ class_weight[target] over them (F.cross_entropy's rule), on the
    device (no host sync); 1 when no row is valid, so the mean is 0."""
    if normalizer is not None or reduction != "mean":
        return normalizer
    if class_weight is None:
        return valid.sum().clamp(min=1)
    total = _target_weights(class_weight, flat_target, valid).sum()
    return torch.where(valid.any(), total, torch.ones_like(total))


def _as_normalizer_tensor(denominator, like):
    """The op's normalizer argument: a 0-dim tensor of the loss dtype."""
    if denominator is None:
        return None
    if isinstance(denominator, torch.Tensor):
        return denominator.reshape(()).to(device=like.device, dtype=_common.acc_dtype(like.dtype))
    return torch.tensor(denominator, device=like.device, dtype=_common.acc_dtype(like.dtype))


def _reduce(row_losses, reduction, denominator, shape):
    """The per-row losses reduced (see _denominator)."""
    if reduction == "none":
        return row_losses.reshape(shape)
    total = row_losses.sum()
    if denominator is None:
        return total
    return total / (denominator.to(total.dtype) if isinstance(denominator, torch.Tensor) else denominator)


def _with_stats(loss, valid, shape, lse, argmax, entropy):
    """LinearCEOutput with the ignored rows' statistics masked and every
    statistic shaped like the target."""
    nan = torch.full((), float("nan"), dtype=lse.dtype, device=lse.device)
    return LinearCEOutput(loss, torch.where(valid, lse, nan).reshape(shape),
                          torch.where(valid, argmax, -1).reshape(shape), torch.where(valid, entropy, nan).reshape(shape))


def _coerce_operands(fn, input, weight, target, bias, class_weight=None):
    """What must happen before the op is dispatched: tensors (a missing weight
    is a TypeError, not a dispatcher error), an int64 target of the input's
    leading shape, and one device for all (a `meta` weight beside CPU inputs
    would otherwise route the call to the fake kernel). Shapes, dtypes, options
    and target ranges are checked once, by the C++ op."""
    for t, name in ((input, "input"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    _validate.check_optional_tensor(bias, "bias", fn)
    _validate.check_optional_tensor(class_weight, "class_weight", fn)
    if input.dim() < 1:
        raise ValueError(f"{fn}: input must be [..., D], got a 0-dim tensor")
    target = _validate.as_index_tensor(target)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} must equal input.shape[:-1] = "
                         f"{tuple(input.shape[:-1])}")
    _validate.check_same_device(fn, input=input, weight=weight, target=target, bias=bias, class_weight=class_weight)
    return target


def _check_cuda_targets(flat_target, input, weight, ignore_index):
    """The target range on CUDA (one host sync; the C++ op scans CPU targets
    itself), after the op's shape checks would have passed: a transposed
    weight must be reported as a shape error by the op, not as targets out of
    range here."""
    if flat_target.is_cuda and weight.dim() == 2 and weight.shape[1] == input.shape[-1]:
        _validate.check_index_range(flat_target, weight.shape[0], "target", ignore_index)


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, softcap=None, reduction="mean", class_weight=None, normalizer=None,
                         return_stats=False, chunk_size=None, memory_budget=None):
    """Cross-entropy of ``softcap(input @ weight.T + bias)`` against ``target``.

    Args:
        input: [..., D] hidden states (fp32, bf16, fp16; fp64 on the CPU).
        weight: [V, D] classifier / unembedding matrix, same dtype as ``input``.
        target: [...] integer class indices in [0, V) or ``ignore_index``.
        bias: optional [V].
        ignore_index: rows with this target get zero loss and zero gradient.
        label_smoothing: PyTorch's ``F.cross_entropy`` label smoothing.
        z_loss: adds ``z_loss * lse**2`` per row (PaLM's auxiliary loss); under
            ``mean`` this is ``z_loss * mean(lse**2)`` over non-ignored rows.
        softcap: if set, logits become ``softcap * tanh(logits / softcap)``.
        reduction: ``"none"`` (shape of ``target``), ``"sum"`` or ``"mean"``
            (over non-ignored rows; 0 when every row is ignored).
        class_weight: optional [V] per-class weights, ``F.cross_entropy``'s
            ``weight=``: a row's loss is ``w[y]·((1-eps)·(lse - z_y) + z_loss·lse²)
            + eps/V·Σ_j w_j·(lse - z_j)``, and ``mean`` divides by
            ``Σ w[y]`` over non-ignored rows (summed on the device, no host
            sync). Not differentiated.
        normalizer: with ``reduction="sum"``, the loss is the sum divided by
            this number or 1-element tensor (its value is never read on the
            host: no sync). For a global token count across micro-batches or
            ranks, e.g. transformers' ``num_items_in_batch`` (see the README's
            data-parallel recipe).
        return_stats: also return the per-token ``lse``, ``argmax`` and
            ``entropy`` of the same pass as a :class:`LinearCEOutput` (not
            differentiated); argmax and entropy are only computed when asked.
        chunk_size: vocabulary columns per chunk of the recompute algorithm
            (default: sized to a fixed workspace, 32 MiB on the CPU and 512 MiB
            on CUDA). For a reduced loss that requires grad, the default
            instead forms the gradients during the forward in one pass over
            row blocks (6·N·D·V FLOPs instead of 8; on the CPU, and on CUDA
            with FUSEDLOSS_CUDA_SINGLE_PASS=1 until it is validated on a GPU;
            not for fp16, whose gradients must see a GradScaler's scale
            before they are rounded); giving chunk_size forces the recompute
            algorithm.
        memory_budget: bytes the single pass may use beyond its inputs and
            gradients (default 256 MiB on the CPU, 4 GiB on CUDA): its
            [R, V] fp32 logits tile (R rows per block; all N rows when
            4·N·V fits) plus, when the rows take several blocks and the
            weight is bf16/fp16, a 4·V·D fp32 weight-gradient accumulator.
            When not even 64 rows (1024 on CUDA) fit, the recompute pair
            runs instead. On the CPU the tile's memory is recycled
            between calls (``fusedloss.empty_cache()`` frees it).

    Returns the loss in fp32 (fp64 for fp64 inputs), or a
    :class:`LinearCEOutput` with ``return_stats=True``. A DTensor weight (FSDP2,
    tensor parallel) goes to ``fusedloss.distributed.dtensor``.
    """
    fn = "linear_cross_entropy"
    if _common.is_dtensor(weight) or _common.is_dtensor(bias):
        from .distributed import dtensor
        return dtensor.linear_cross_entropy(input, weight, target, bias, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                            reduction=reduction, class_weight=class_weight, normalizer=normalizer,
                                            return_stats=return_stats, chunk_size=chunk_size,
                                            memory_budget=memory_budget)
    _validate.check_reduction(reduction)
    normalizer = _validate.check_normalizer(normalizer, reduction, fn)
    softcap = _validate.check_finite(softcap, "softcap", positive=True, allow_none=True)
    z_loss = _validate.check_finite(z_loss, "z_loss")
    label_smoothing = _validate.check_finite(label_smoothing, "label_smoothing")
    chunk_size = _validate.check_optional_positive_int(chunk_size, "chunk_size")
    memory_budget = _validate.check_optional_positive_int(memory_budget, "memory_budget")
    target = _coerce_operands(fn, input, weight, target, bias, class_weight)
    if class_weight is not None and class_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: class_weight is not differentiated; pass class_weight.detach()")
    input, weight, bias = _common.autocast_inputs(input.device.type, input, weight, bias)
    rows = _common.as_rows(input)
    flat_target = target.reshape(-1)
    _check_cuda_targets(flat_target, input, weight, ignore_index)
    options = (int(ignore_index), label_smoothing, z_loss, softcap or 0.0)
    return_stats = bool(return_stats)
    valid = flat_target != ignore_index
    denominator = _denominator(reduction, valid, flat_target, class_weight, normalizer)
    if chunk_size is None and _common.wants_single_pass(reduction, input.device, input, weight, bias):
        mask = [input.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
        # The op divides by the denominator itself (a device tensor, no host
        # sync), so its stored gradients need no rescaling.
        loss, _, _, _, lse, argmax, entropy = _ops.ops.linear_ce_sum_and_grad(
            rows, weight, flat_target, bias, class_weight, _as_normalizer_tensor(denominator, input), *options, 0,
            memory_budget or 0, return_stats, mask)
    else:
        row_losses, lse_parts, argmax, entropy = _ops.ops.linear_ce_forward(
            rows, weight, flat_target, bias, class_weight, *options, int(chunk_size or 0), return_stats)
        loss = _reduce(row_losses, reduction, denominator, target.shape)
        lse = lse_parts.sum(0) if return_stats else None
    return _with_stats(loss, valid, target.shape, lse, argmax, entropy) if return_stats else loss


class LinearCrossEntropyLoss(_common.LossModule):
    """Module form of :func:`linear_cross_entropy`; call as ``loss(input, weight, target, bias=None, *,
    normalizer=None)``."""

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                 class_weight=None, return_stats=False, chunk_size=None, memory_budget=None):
        super().__init__(reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                         softcap=softcap, return_stats=return_stats, chunk_size=chunk_size,
                         memory_budget=memory_budget)
        # A buffer, so that .to(device) moves it with the module.
        self.register_buffer("class_weight", class_weight)

    def forward(self, input, weight, target, bias=None, *, normalizer=None):
        return linear_cross_entropy(
            input, weight, target, bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, reduction=self.reduction, class_weight=self.class_weight,
            normalizer=normalizer, return_stats=self.return_stats, chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
        )

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}")

