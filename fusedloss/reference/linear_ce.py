"""Plain-PyTorch linear cross-entropy: materialises the [N, V] logits.

The semantics fusedloss.linear_cross_entropy must reproduce; the test oracle and
the benchmarks' baseline. The logits GEMM runs in the input dtype and the
softmax in fp32, like a typical training loop (``F.cross_entropy(logits.float())``).
"""
import torch
import torch.nn.functional as F

from .. import _common, _validate


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, softcap=None, reduction="mean"):
    _validate.check_reduction(reduction)
    logits = F.linear(input, weight, bias).reshape(-1, weight.shape[0])
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat_target = target.reshape(-1)
    rows = F.cross_entropy(logits, flat_target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    valid = flat_target != ignore_index
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    return _common.reduce_rows(rows, valid, reduction, target.shape)
