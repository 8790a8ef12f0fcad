"""Argument checks shared by the Python wrappers (and the reference ops): each
raises a TypeError, ValueError or IndexError naming the argument, before any
sampling or kernel work."""
import math
import numbers

import torch

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _integral(value, name, expected):
    """``value`` as an int; Python and NumPy integers only (a float or bool
    would otherwise be truncated or read as 0/1 without notice)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return int(value)


def check_int(value, name, minimum=None):
    value = _integral(value, name, "an int")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_int(value, name):
    return check_int(value, name, minimum=1)


def check_optional_positive_int(value, name):
    """None or an int > 0 (a float such as 512.0 is rejected, not truncated)."""
    if value is None:
        return None
    value = _integral(value, name, "a positive int or None")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_finite(value, name, *, positive=False, allow_none=False):
    """A finite Python number (optionally > 0); returns it as a float."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, got {value}")
    return float(value)


def check_normalizer(normalizer, reduction, fn):
    """None, a positive finite number, or a 1-element tensor (its value is not
    read: no host sync), valid only with reduction='sum', whose total it divides."""
    if normalizer is None:
        return None
    if reduction != "sum":
        raise ValueError(f"{fn}: normalizer= divides the summed loss; pass reduction='sum' with it, "
                         f"got reduction={reduction!r}")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.is_complex() or normalizer.dtype == torch.bool:
            raise ValueError(f"{fn}: normalizer must be a number or a 1-element real tensor, got a "
                             f"{normalizer.dtype} tensor of shape {tuple(normalizer.shape)}")
        return normalizer.reshape(())
    return check_finite(normalizer, "normalizer", positive=True)


def check_optional_tensor(value, name, fn):
    if value is not None and not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(value).__name__}")
    return value


def check_generator(generator, device, name="generator"):
    """``generator`` is None or a ``torch.Generator`` of ``device``'s type
    (torch's own error for a mismatch names neither the argument nor the fix)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    device = torch.device(device)
    if generator.device.type != device.type:
        raise ValueError(f"{name} is on {generator.device} but the candidates are drawn on {device}; "
                         f"create it with torch.Generator(device={device.type!r})")
    return generator


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
