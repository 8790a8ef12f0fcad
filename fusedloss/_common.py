"""Argument handling shared by the Python wrappers of every loss."""
import torch

REDUCTIONS = ("none", "mean", "sum")


def acc_dtype(dtype):
    """dtype of the losses and statistics the ops return: fp64 stays fp64
    (gradcheck), everything else accumulates and returns fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


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


def as_rows(t):
    """[..., D] as [rows, D] (reshape(-1, D) is ambiguous when D = 0)."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def as_index_tensor(target, name="target"):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {target.dtype}")
    return target.long()


def should_check_values(t):
    """Data-dependent checks (target ranges) need a host sync on CUDA; skip them
    while tracing or capturing a CUDA graph, where they are impossible, and on
    meta tensors, which hold no values."""
    if torch.compiler.is_compiling() or t.is_meta:
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def is_traced(t):
    """True under torch.compile / AOT autograd tracing (fake or functional tensors)."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t) or torch._is_functional_tensor(t)


def forbid_double_backward(fn, grad):
    """Raise from a backward asked to build a graph (``create_graph=True``, e.g.
    a gradient penalty): the fused backwards are not differentiable, and
    returning a gradient without a graph would silently drop the second-order
    term. Not while tracing (torch.compile reports double backward itself)."""
    if torch.is_grad_enabled() and not is_traced(grad):
        raise RuntimeError(
            f"fusedloss.{fn}: double backward (create_graph=True) is not supported; the fused backward is "
            "not differentiable. Differentiate the plain-PyTorch twin in fusedloss.reference instead."
        )


def check_same_device(fn, **tensors):
    """ValueError naming the first tensor (None skipped) on another device than
    the first one. Must run before the op: a tensor on `meta` would otherwise
    route the whole call to the fake kernel and return uninitialised memory."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on the same device")


def check_finite(value, name, *, positive=False, allow_none=False):
    """A finite Python number (optionally > 0); returns it as a float."""
    import math
    import numbers

    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, got {value}")
    return float(value)


def check_optional_positive_int(value, name):
    """None or an int > 0 (a float such as 512.0 is rejected, not truncated)."""
    import numbers

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def check_index_range(index, upper, name, ignore_value=None):
    """Raise IndexError unless every entry is in [0, upper) (or equals ignore_value)."""
    if not should_check_values(index) or index.numel() == 0:
        return
    bad = (index < 0) | (index >= upper)
    if ignore_value is not None:
        bad &= index != ignore_value
    if bool(bad.any()):
        first = index[bad].flatten()[0].item()
        extra = f" and is not ignore_index={ignore_value}" if ignore_value is not None else ""
        raise IndexError(f"{name} contains {first}, which is outside [0, {upper}){extra}")


def autocast_inputs(device_type, *tensors):
    """Under torch.autocast, run the fused op in the autocast dtype (like a
    Linear layer would) so mixed fp32 weights / bf16 activations just work."""
    # Autocast exists for real devices only (asking about `meta` raises).
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
