"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023), fused: open_clip's
``SigLipLoss`` without the B x B logits.

Logits ``logit_scale * I @ T.T + logit_bias``; the pair (i, j) has label +1 on
the diagonal and -1 elsewhere and loss ``-log sigmoid(label * logit)``; the
loss sums every pair and divides by the batch size B (open_clip's
convention). One op, ``fusedloss::siglip_sum_and_grad``, walks the text columns
in tiles and forms the loss and all four gradients in the same pass (no
softmax, so nothing to wait for); the autograd backward only scales them.
``reduction="none"`` uses ``siglip_forward`` and a recomputing backward.
See csrc/siglip.cpp.
"""

import torch

from . import _common, _ops, _validate
from .contrastive import check_pairs, scalar_argument


def siglip_arguments(image_features, text_features, logit_scale, logit_bias, reduction, tile_size):
    """The argument checks of :func:`siglip_loss` (and of its distributed
    twin); returns (logit_scale, logit_bias) as 0-dim tensors."""
    _validate.check_reduction(reduction)
    _validate.check_optional_positive_int(tile_size, "tile_size")
    check_pairs(image_features, text_features, "image_features", "text_features")
    if image_features.shape[0] == 0:
        raise ValueError("image_features has no rows: SigLIP needs at least one image-text pair")
    return (scalar_argument(logit_scale, "logit_scale", image_features, positive=False),
            scalar_argument(logit_bias, "logit_bias", image_features, positive=False))


def fused_siglip(image, text, scale, bias, *, positive_offset, reduction, tile_size):
    """The loss of ``image`` rows against ``text`` columns, row i's positive at
    column ``i + positive_offset`` (none when outside the columns); ``"mean"``
    divides the sum by the number of image rows."""
    tile = int(tile_size or 0)
    tensors = (image, text, scale, bias)
    # The one pass on CUDA too (validated by scripts/gpu_check.sh's SigLIP
    # cases), never for fp16 (see _common.wants_single_pass).
    if (reduction != "none" and torch.is_grad_enabled() and image.dtype != torch.float16
            and any(t.requires_grad for t in tensors)):
        mask = [t.requires_grad for t in tensors]
        total, *_ = _ops.ops.siglip_sum_and_grad(*tensors, positive_offset, tile, mask)
        return total if reduction == "sum" else total / image.shape[0]
    rows = _ops.ops.siglip_forward(*tensors, positive_offset, tile)
    return _common.reduce_rows(rows, None, reduction, rows.shape)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, reduction="mean", tile_size=None):
    """SigLIP's sigmoid loss, equal to open_clip's ``SigLipLoss()(image_features,
    text_features, logit_scale, logit_bias)`` on the same inputs.

    Args:
        image_features, text_features: [B, D], row i of each a positive pair
            (used as given: SigLIP models normalise them).
        logit_scale: the multiplier, **already exponentiated** as open_clip's
            models pass it (``model.logit_scale.exp()``); a float or a 0-dim
            tensor, which receives a gradient.
        logit_bias: the additive bias (open_clip initialises it to -10); a float
            or a 0-dim tensor, which receives a gradient.
        reduction: ``"mean"`` (open_clip's: the sum over all B x B pairs divided
            by B), ``"sum"`` (over all pairs) or ``"none"`` ([B]: row i sums
            image i's pairs with every text).
        tile_size: text columns per tile (default: sized to a fixed workspace).

    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    scale, bias = siglip_arguments(image_features, text_features, logit_scale, logit_bias, reduction, tile_size)
    image_features, text_features = _common.autocast_inputs(image_features.device.type, image_features,
                                                            text_features)
    return fused_siglip(image_features, text_features, scale, bias, positive_offset=0, reduction=reduction,
                        tile_size=tile_size)


class SigLipLoss(_common.LossModule):
    """Module form of :func:`siglip_loss` (open_clip's name); call as
    ``loss(image_features, text_features, logit_scale, logit_bias)``."""

    def __init__(self, *, reduction="mean", tile_size=None):
        super().__init__(reduction, tile_size=tile_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, reduction=self.reduction,
                           tile_size=self.tile_size)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
