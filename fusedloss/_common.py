"""Tensor plumbing shared by the Python wrappers of every loss (argument
checks live in ``_validate``, the ops' fake kernels and autograd in ``_ops``)."""
import os

import torch

from . import _validate

# The CUDA single passes have not run on a GPU yet (scripts/gpu_check.sh tests
# them with this set); until they have, CUDA defaults to the recompute pairs.
CUDA_SINGLE_PASS_ENV = "FUSEDLOSS_CUDA_SINGLE_PASS"


def wants_single_pass(reduction, device, *differentiable):
    """Form the gradients during the forward in one pass over row blocks (one
    GEMM fewer than the recompute pair) for a reduced loss that will be
    differentiated; the op itself falls back to the pair when no block fits
    its memory budget. Not for fp16: the single pass rounds its gradients to
    fp16 before it knows the upstream gradient, so a GradScaler's scale would
    come too late to keep them above fp16's range (≈ 6e-8); the recompute
    pair's backward forms them already scaled."""
    if reduction == "none" or not torch.is_grad_enabled():
        return False
    if device.type == "cuda" and os.environ.get(CUDA_SINGLE_PASS_ENV, "0") != "1":
        return False
    present = [t for t in differentiable if t is not None]
    if any(t.dtype == torch.float16 for t in present):
        return False
    return any(t.requires_grad for t in present)


def acc_dtype(dtype):
    """dtype of the losses and statistics the ops return: fp64 stays fp64
    (gradcheck), everything else accumulates and returns fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_rows(rows, valid, reduction, shape):
    """Reduce per-row losses. ``mean`` divides by the number of valid rows
    (PyTorch's ignore_index rule) and returns 0, not NaN, when there are none,
    so an all-padding micro-batch contributes nothing instead of poisoning the
    step."""
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    count = valid.sum() if valid is not None else torch.tensor(rows.numel(), device=rows.device)
    return total / count.clamp(min=1).to(total.dtype)


def is_dtensor(t):
    """Whether ``t`` is a DTensor; none can exist before torch.distributed.tensor
    is imported, so this imports nothing."""
    module = getattr(torch.distributed, "tensor", None)
    return module is not None and isinstance(t, module.DTensor)


def as_rows(t):
    """[..., D] as [rows, D] (reshape(-1, D) is ambiguous when D = 0)."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def autocast_inputs(device_type, *tensors):
    """Under torch.autocast, run the fused op in the autocast dtype (like a
    Linear layer would) so mixed fp32 weights / bf16 activations just work."""
    # Autocast exists for real devices only (asking about `meta` raises).
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


class LossModule(torch.nn.Module):
    """Base of the module forms of the losses: checks ``reduction`` and keeps
    it and the other options as attributes, which ``forward`` passes to the
    functional form (that validates the rest on every call)."""

    def __init__(self, reduction, **options):
        super().__init__()
        _validate.check_reduction(reduction)
        self.reduction = reduction
        for name, value in options.items():
            setattr(self, name, value)
