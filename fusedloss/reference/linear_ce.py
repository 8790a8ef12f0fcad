"""Plain-PyTorch linear cross-entropy: materialises the [N, V] logits.

The semantics fusedloss.linear_cross_entropy must reproduce; the test oracle and
the benchmarks' baseline. The logits GEMM runs in the input dtype and the
softmax in fp32, like a typical training loop (``F.cross_entropy(logits.float())``).
"""
import torch
import torch.nn.functional as F

from .. import _common, _validate
from ..linear_ce import LinearCEOutput, _denominator, _reduce, _target_weights, _with_stats


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, softcap=None, reduction="mean", class_weight=None, normalizer=None,
                         return_stats=False):
    _validate.check_reduction(reduction)
    normalizer = _validate.check_normalizer(normalizer, reduction, "reference.linear_cross_entropy")
    logits = F.linear(input, weight, bias).reshape(-1, weight.shape[0])
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat_target = target.reshape(-1)
    weights = None if class_weight is None else class_weight.to(logits.dtype)
    rows = F.cross_entropy(logits, flat_target, weight=weights, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    valid = flat_target != ignore_index
    lse = torch.logsumexp(logits, dim=-1)
    if z_loss:
        target_weight = valid if weights is None else _target_weights(weights, flat_target, valid)
        rows = rows + z_loss * target_weight * lse.square()
    loss = _reduce(rows, reduction, _denominator(reduction, valid, flat_target, weights, normalizer), target.shape)
    if not return_stats:
        return loss
    with torch.no_grad():
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        return _with_stats(loss, valid, target.shape, lse.detach(), logits.argmax(-1), entropy)


__all__ = ["LinearCEOutput", "linear_cross_entropy"]
