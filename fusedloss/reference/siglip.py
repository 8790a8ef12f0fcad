"""Plain-PyTorch SigLIP loss: open_clip's ``SigLipLoss._loss`` (it builds the
B x B logits and labels), the semantics fusedloss.siglip_loss must reproduce;
the test oracle and the benchmarks' baseline. The similarity GEMM runs in the
input dtype and the rest in fp32, like contrastive.py's references."""
import torch
import torch.nn.functional as F

from .. import _common, _validate


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, reduction="mean"):
    _validate.check_reduction(reduction)
    dots = image_features @ text_features.T
    dots = dots.double() if dots.dtype == torch.float64 else dots.float()
    logits = logit_scale * dots + logit_bias
    batch = image_features.shape[0]
    # open_clip's get_ground_truth: 2 * eye - 1.
    labels = 2 * torch.eye(batch, logits.shape[1], device=logits.device, dtype=logits.dtype) - 1
    rows = -F.logsigmoid(labels * logits).sum(1)
    if reduction == "mean":
        return rows.sum() / batch  # open_clip: sum over all pairs / B
    return _common.reduce_rows(rows, None, reduction, rows.shape)
