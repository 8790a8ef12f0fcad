"""InfoNCE and CLIP with the keys (and extra negatives) of every rank: see the
package docstring and docs/distributed.md."""
import torch

from .. import _common
from .. import contrastive as _contrastive
from ._collectives import gather, validated


def _gathered_contrastive(query, key, negatives, scale, symmetric, reduction, tile_size, group, rank):
    """query, key: this rank's [B, D] pairs (already validated and consistent
    across ranks); negatives [M, D] or None."""
    batch = query.shape[0]
    keys = gather(key, group)
    cols = keys if negatives is None else torch.cat([keys, gather(negatives, group)])
    positives = torch.arange(batch, device=query.device) + rank * batch
    loss = _contrastive._row_losses(query, cols, positives, scale, tile_size)
    if symmetric:
        # Key -> query term of the local keys: CE over every rank's queries
        # (extra negatives take no part in it).
        loss = 0.5 * (loss + _contrastive._row_losses(key, gather(query, group), positives, scale, tile_size))
    return _common.reduce_rows(loss, None, reduction, loss.shape)


def info_nce_loss(query, key, *, negatives=None, temperature=0.07, normalize=False, symmetric=False,
                  reduction="mean", group=None, tile_size=None):
    """InfoNCE against the keys (and extra negatives) of every rank in ``group``.

    Equals :func:`fusedloss.info_nce_loss` on the rank-ordered concatenation of
    all ranks' tensors, restricted to this rank's rows: ``"none"`` gives this
    rank's [B] per-pair losses, ``"sum"`` / ``"mean"`` their sum / mean
    (open_clip's ``local_loss``; sum the ranks' losses, or let DDP average the
    gradients, for the global objective). Every rank must pass the same B and
    the same number of extra negatives M (M = 0 on every rank, or > 0 on every
    rank). Gradients flow to the rank that produced each key / negative.
    """
    fn = "info_nce_loss"
    scale = None

    def local_check():
        nonlocal scale
        scale = _contrastive._info_nce_scale(query, key, negatives, temperature, reduction, tile_size)
        return [*query.shape, -1 if negatives is None else negatives.shape[0], int(symmetric), int(normalize)]

    rank, _, _ = validated(fn, group, query, local_check, (
        "the local batch size B (query rows)", "the feature size D",
        "the number of extra negatives (None counts as -1)", "symmetric", "normalize"))
    query, key, negatives = _contrastive._info_nce_features(query, key, negatives, normalize)
    return _gathered_contrastive(query, key, negatives, scale, symmetric, reduction, tile_size, group, rank)


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean", group=None, tile_size=None):
    """CLIP's symmetric loss over the image / text features of every rank in
    ``group`` (open_clip's ``gather_with_grad=True, local_loss=True``).

    Per local pair, the mean of the image -> text CE (over all ranks' texts)
    and the text -> image CE (over all ranks' images); ``"mean"`` is over this
    rank's B pairs. ``logit_scale`` is the multiplier (already exponentiated),
    a float or a 0-dim tensor; its gradient on each rank is that of the local
    loss (DDP's averaging, or a sum over ranks, combines them).
    """
    fn = "clip_loss"
    scale = None

    def local_check():
        nonlocal scale
        scale = _contrastive._clip_scale(image_features, text_features, logit_scale, reduction, tile_size)
        return list(image_features.shape)

    rank, _, _ = validated(fn, group, image_features, local_check, ("the local batch size B", "the feature size D"))
    image_features, text_features = _common.autocast_inputs(image_features.device.type, image_features,
                                                            text_features)
    return _gathered_contrastive(image_features, text_features, None, scale, True, reduction, tile_size, group,
                                 rank)
