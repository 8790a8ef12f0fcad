"""SigLIP with the texts of every rank as negatives: see the package docstring."""
from .. import _common
from .. import siglip as _siglip
from ._collectives import gather, validated


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, reduction="mean", group=None,
                tile_size=None):
    """SigLIP's sigmoid loss of this rank's images against the texts of every
    rank in ``group``.

    The texts are all-gathered with autograd (the backward reduce-scatters, so
    each text gradient reaches the rank that produced it); local image i's
    positive is gathered text ``rank * B + i``, every other text a negative.
    This is open_clip's ``SigLipLoss(world_size=W)`` objective (its neighbour
    exchange sums the same blocks): ``"mean"`` is this rank's pairs summed and
    divided by its B, so the mean over ranks (what DDP's gradient averaging
    optimises) equals :func:`fusedloss.siglip_loss` on the concatenated batch.
    ``"none"`` gives this rank's [B] per-image sums. Every rank must pass the
    same B; ``logit_scale`` / ``logit_bias`` receive the gradient of the local
    loss (DDP's averaging, or a sum over ranks, combines them).
    """
    fn = "siglip_loss"
    scalars = None

    def local_check():
        nonlocal scalars
        scalars = _siglip.siglip_arguments(image_features, text_features, logit_scale, logit_bias, reduction,
                                           tile_size)
        return list(image_features.shape)

    rank, _, _ = validated(fn, group, image_features, local_check, ("the local batch size B", "the feature size D"))
    image_features, text_features = _common.autocast_inputs(image_features.device.type, image_features,
                                                            text_features)
    texts = gather(text_features, group)
    return _siglip.fused_siglip(image_features, texts, *scalars, positive_offset=rank * image_features.shape[0],
                                reduction=reduction, tile_size=tile_size)
