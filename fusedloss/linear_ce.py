"""Fused linear + softmax cross-entropy over a full vocabulary.

``linear_cross_entropy(x, W, y)`` equals
``F.cross_entropy(softcap(x @ W.T + b), y, ...) + z_loss * mean(lse**2)``
but never materialises the [N, V] logits: the kernels walk the vocabulary in
chunks, keeping an online log-sum-exp per row, and the backward recomputes
each chunk's logits to form its gradient (see csrc/README.md).
"""
import torch

from . import _common, _ops, _validate


def _coerce_operands(fn, input, weight, target, bias):
    """What must happen before the op is dispatched: tensors (a missing weight
    is a TypeError, not a dispatcher error), an int64 target of the input's
    leading shape, and one device for all (a `meta` weight beside CPU inputs
    would otherwise route the call to the fake kernel). Shapes, dtypes, options
    and target ranges are checked once, by the C++ op."""
    for t, name in ((input, "input"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if input.dim() < 1:
        raise ValueError(f"{fn}: input must be [..., D], got a 0-dim tensor")
    target = _validate.as_index_tensor(target)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{fn}: target shape {tuple(target.shape)} must equal input.shape[:-1] = "
                         f"{tuple(input.shape[:-1])}")
    _validate.check_same_device(fn, input=input, weight=weight, target=target, bias=bias)
    return target


def _check_cuda_targets(flat_target, input, weight, ignore_index):
    """The target range on CUDA (one host sync; the C++ op scans CPU targets
    itself), after the op's shape checks would have passed: a transposed
    weight must be reported as a shape error by the op, not as targets out of
    range here."""
    if flat_target.is_cuda and weight.dim() == 2 and weight.shape[1] == input.shape[-1]:
        _validate.check_index_range(flat_target, weight.shape[0], "target", ignore_index)


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, softcap=None, reduction="mean", chunk_size=None, memory_budget=None):
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
        chunk_size: vocabulary columns per chunk of the recompute algorithm
            (default: sized to a fixed workspace, 32 MiB on the CPU and 512 MiB
            on CUDA). For a reduced loss that requires grad, the default
            instead forms the gradients during the forward in one pass over
            row blocks (6·N·D·V FLOPs instead of 8; on the CPU, and on CUDA
            with FUSEDLOSS_CUDA_SINGLE_PASS=1 until it is validated on a GPU);
            giving chunk_size forces the recompute algorithm.
        memory_budget: bytes the single pass may use beyond its inputs and
            gradients (default 256 MiB on the CPU, 4 GiB on CUDA): its
            [R, V] fp32 logits tile (R rows per block; all N rows when
            4·N·V fits) plus, when the rows take several blocks and the
            weight is bf16/fp16, a 4·V·D fp32 weight-gradient accumulator.
            When not even 64 rows (1024 on CUDA) fit, the recompute pair
            runs instead. The CPU keeps the tile between calls
            (``fusedloss.release_cpu_tile()`` frees it).

    Returns the loss in fp32 (fp64 for fp64 inputs). A DTensor weight (FSDP2,
    tensor parallel) goes to ``fusedloss.distributed.dtensor``.
    """
    if _common.is_dtensor(weight) or _common.is_dtensor(bias):
        from .distributed import dtensor
        return dtensor.linear_cross_entropy(input, weight, target, bias, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                            reduction=reduction, chunk_size=chunk_size, memory_budget=memory_budget)
    _validate.check_reduction(reduction)
    softcap = _validate.check_finite(softcap, "softcap", positive=True, allow_none=True)
    z_loss = _validate.check_finite(z_loss, "z_loss")
    label_smoothing = _validate.check_finite(label_smoothing, "label_smoothing")
    chunk_size = _validate.check_optional_positive_int(chunk_size, "chunk_size")
    memory_budget = _validate.check_optional_positive_int(memory_budget, "memory_budget")
    target = _coerce_operands("linear_cross_entropy", input, weight, target, bias)
    input, weight, bias = _common.autocast_inputs(input.device.type, input, weight, bias)
    rows = _common.as_rows(input)
    flat_target = target.reshape(-1)
    _check_cuda_targets(flat_target, input, weight, ignore_index)
    options = (int(ignore_index), label_smoothing, z_loss, softcap or 0.0)
    valid = flat_target != ignore_index
    if chunk_size is None and _common.wants_single_pass(reduction, input.device, input, weight, bias):
        mask = [input.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
        # mean: the op divides by the number of valid rows itself (a device
        # tensor, no host sync), so its stored gradients need no rescaling.
        normalizer = None if reduction == "sum" else valid.sum().clamp(min=1).to(_common.acc_dtype(input.dtype))
        total, *_ = _ops.ops.linear_ce_sum_and_grad(rows, weight, flat_target, bias, normalizer, *options, 0,
                                                    memory_budget or 0, mask)
        return total
    loss, _ = _ops.ops.linear_ce_forward(rows, weight, flat_target, bias, *options, int(chunk_size or 0))
    return _common.reduce_rows(loss, valid, reduction, target.shape)


class LinearCrossEntropyLoss(_common.LossModule):
    """Module form of :func:`linear_cross_entropy`; call as ``loss(input, weight, target, bias=None)``."""

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                 chunk_size=None, memory_budget=None):
        super().__init__(reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                         softcap=softcap, chunk_size=chunk_size, memory_budget=memory_budget)

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(
            input, weight, target, bias, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, reduction=self.reduction, chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
        )

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}")


def release_cpu_tile():
    """Free the logits tile the CPU single pass keeps between calls (at most
    its ``memory_budget``); the next call allocates it again."""
    _ops.ops.release_cpu_tile()
