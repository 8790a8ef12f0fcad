"""Drop-in for torch's own ``F.linear_cross_entropy`` and
``nn.LinearCrossEntropyLoss`` (torch >= 2.14): same signatures, defaults,
results and dtypes, so a model switches with one import::

    from fusedloss.compat.torch import linear_cross_entropy, LinearCrossEntropyLoss

What runs fused (never materialising the logits): class-index targets (int64)
with a 2-D ``linear_weight`` ``[C, in_features]``, an optional ``(C,)``
``linear_bias``, class ``weight`` of the input's dtype that does not require
grad, any reduction and label smoothing. ``options`` (torch's chunking
strategy) is accepted and has no effect there: the fused op always chunks.
Everything else torch accepts (class-probability targets, K-dimensional
``linear_weight``, a class weight requiring grad) and every argument torch
rejects goes to torch's own function, so results and errors are torch's.

Like torch, ``reduction="mean"`` is NaN when every target is ignored (0 / 0),
with zero gradients; and the loss comes back in the input's dtype (torch
rounds its bf16/fp16 loss once; the fused loss is accumulated in fp32 and
rounded at the end).
"""
import torch
import torch.nn.functional as F

from .. import linear_ce as _linear_ce

__all__ = ["linear_cross_entropy"]

_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _torch_linear_cross_entropy():
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        raise RuntimeError("fusedloss.compat.torch: this torch has no F.linear_cross_entropy (torch >= 2.14); "
                           "the fused path covers class-index targets with a 2-D linear_weight only")
    return fn


def _runs_fused(input, linear_weight, target, linear_bias, weight, reduction, label_smoothing):
    """Whether the call is one the fused op computes exactly as torch does;
    every other call (and every invalid one) is torch's own."""
    tensors_ok = (
        all(isinstance(t, torch.Tensor) for t in (input, linear_weight, target))
        and input.dim() in (1, 2) and linear_weight.dim() == 2 and input.dtype in _FUSED_DTYPES
        and linear_weight.dtype == input.dtype and input.shape[-1] == linear_weight.shape[-1] > 0
        and target.dtype == torch.int64 and tuple(target.shape) == tuple(input.shape[:-1]) and target.numel() > 0
    )
    bias_ok = linear_bias is None or (isinstance(linear_bias, torch.Tensor) and linear_bias.dtype == input.dtype
                                      and tuple(linear_bias.shape) == (linear_weight.shape[0],))
    weight_ok = weight is None or (isinstance(weight, torch.Tensor) and weight.dtype == input.dtype
                                   and tuple(weight.shape) == (linear_weight.shape[0],)
                                   and not (weight.requires_grad and torch.is_grad_enabled()))
    options_ok = reduction in ("none", "mean", "sum") and isinstance(label_smoothing, (int, float)) \
        and not isinstance(label_smoothing, bool) and 0.0 <= label_smoothing <= 1.0
    return tensors_ok and bias_ok and weight_ok and options_ok


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None, label_smoothing: float = 0.0,
                         options: "LinearCrossEntropyOptions | None" = None) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy`` (same signature and
    results), fused where the module docstring says."""
    if not _runs_fused(input, linear_weight, target, linear_bias, weight, reduction, label_smoothing):
        return _torch_linear_cross_entropy()(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, options=options)
    ignore_index = -100 if ignore_index is None else ignore_index
    rows, targets = (input, target) if input.dim() == 2 else (input.unsqueeze(0), target.unsqueeze(0))
    kwargs = dict(ignore_index=ignore_index, label_smoothing=float(label_smoothing), class_weight=weight)
    if reduction == "mean":
        # torch's denominator, unclamped: the number of valid rows, or Σ w[y]
        # over them; 0 / 0 = NaN when every row is ignored.
        valid = targets != ignore_index
        denominator = valid.sum() if weight is None else _linear_ce._target_weights(weight, targets, valid).sum()
        kwargs.update(reduction="sum", normalizer=denominator)
    else:
        kwargs.update(reduction=reduction)
    loss = _linear_ce.linear_cross_entropy(rows, linear_weight, targets, linear_bias, **kwargs)
    if reduction == "none" and input.dim() == 1:
        loss = loss.squeeze(0)
    return loss.to(input.dtype)


_TorchModule = getattr(torch.nn, "LinearCrossEntropyLoss", None)

if _TorchModule is not None:  # torch >= 2.14
    __all__.append("LinearCrossEntropyLoss")

    class LinearCrossEntropyLoss(_TorchModule):
        """``torch.nn.LinearCrossEntropyLoss`` (a subclass: same constructor,
        parameters ``linear.weight`` / ``linear.bias``, state dict and repr;
        called as ``loss(input, target)``) whose forward is the fused
        :func:`linear_cross_entropy`."""

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features,
                                                        self.linear.in_features))
            linear_bias = None if self.linear.bias is None else \
                self.linear.bias.reshape((self.num_classes, *self.out_features))
            return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                        reduction=self.reduction, ignore_index=self.ignore_index,
                                        label_smoothing=self.label_smoothing, options=self.options)
