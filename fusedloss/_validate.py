"""Argument checks shared by the Python wrappers: each raises a TypeError or
ValueError naming the argument, before any sampling or kernel work."""
import numbers

import torch


def check_int(value, name, minimum=None):
    """``value`` as an int; Python and NumPy integers only (a float or bool
    would otherwise be truncated or read as 0/1 without notice)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_int(value, name):
    return check_int(value, name, minimum=1)


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

