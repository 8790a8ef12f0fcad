"""InfoNCE and CLIP with the keys (and extra negatives) of every rank: see the
package docstring and docs/distributed.md."""
import torch

from .. import _common
from .. import contrastive as _contrastive
from ._collectives import all_gather_rows, gather, validated


def _gathered_contrastive(query, key, negatives, scale, symmetric, reduction, tile_size, group, rank,
                          ids=(None, None, None)):
    """query, key: this rank's [B, D] pairs (already validated and consistent
    across ranks); negatives [M, D] or None; ids the checked (query_ids,
    key_ids, negative_ids), gathered like the features they name."""
    batch = query.shape[0]
    keys = gather(key, group)
    cols = keys if negatives is None else torch.cat([keys, gather(negatives, group)])
    positives = torch.arange(batch, device=query.device) + rank * batch
    query_ids, key_ids, negative_ids = (None if t is None else all_gather_rows(t, group) for t in ids)
    own = lambda gathered: gathered[rank * batch:(rank + 1) * batch]  # noqa: E731  this rank's rows' ids
    every = lambda gathered: gathered  # noqa: E731
    mask = _contrastive.pair_id_channels(own, every, cols.shape[0], query_ids, key_ids, negative_ids)
    loss = _contrastive._row_losses(query, cols, positives, scale, tile_size, ids=mask)
    if symmetric:
        # Key -> query term of the local keys: CE over every rank's queries
        # (extra negatives take no part in it); the id mask is symmetric, so
        # the local keys as rows carry the same channels.
        mask = _contrastive.pair_id_channels(own, every, keys.shape[0], query_ids, key_ids)
        loss = 0.5 * (loss + _contrastive._row_losses(key, gather(query, group), positives, scale, tile_size,
                                                      ids=mask))
    return _common.reduce_rows(loss, None, reduction, loss.shape)


def info_nce_loss(query, key, *, negatives=None, temperature=0.07, normalize=False, symmetric=False,
                  reduction="mean", group=None, tile_size=None, query_ids=None, key_ids=None, negative_ids=None):
    """InfoNCE against the keys (and extra negatives) of every rank in ``group``.

    Equals :func:`fusedloss.info_nce_loss` on the rank-ordered concatenation of
    all ranks' tensors, restricted to this rank's rows: ``"none"`` gives this
    rank's [B] per-pair losses, ``"sum"`` / ``"mean"`` their sum / mean
    (open_clip's ``local_loss``; sum the ranks' losses, or let DDP average the
    gradients, for the global objective). Every rank must pass the same B and
    the same number of extra negatives M (M = 0 on every rank, or > 0 on every
    rank). Gradients flow to the rank that produced each key / negative.
    ``query_ids`` / ``key_ids`` / ``negative_ids`` (every rank gives the same
    ones, or none) mask false negatives as in :func:`fusedloss.info_nce_loss`,
    across ranks: they are all-gathered with the features they name.
    """
    fn = "info_nce_loss"
    scale = ids = None

    def local_check():
        nonlocal scale, ids
        scale = _contrastive._info_nce_scale(query, key, negatives, temperature, reduction, tile_size)
        ids = _contrastive._info_nce_ids(query, key, negatives, query_ids, key_ids, negative_ids)
        return [*query.shape, -1 if negatives is None else negatives.shape[0], int(symmetric), int(normalize),
                *(int(t is not None) for t in ids)]

    rank, _, _ = validated(fn, group, query, local_check, (
        "the local batch size B (query rows)", "the feature size D",
        "the number of extra negatives (None counts as -1)", "symmetric", "normalize",
        "whether query_ids are given", "whether key_ids are given", "whether negative_ids are given"))
    query, key, negatives = _contrastive._info_nce_features(query, key, negatives, normalize)
    return _gathered_contrastive(query, key, negatives, scale, symmetric, reduction, tile_size, group, rank, ids)


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean", group=None, tile_size=None,
              image_ids=None, text_ids=None):
    """CLIP's symmetric loss over the image / text features of every rank in
    ``group`` (open_clip's ``gather_with_grad=True, local_loss=True``).

    Per local pair, the mean of the image -> text CE (over all ranks' texts)
    and the text -> image CE (over all ranks' images); ``"mean"`` is over this
    rank's B pairs. ``logit_scale`` is the multiplier (already exponentiated),
    a float or a 0-dim tensor; its gradient on each rank is that of the local
    loss (DDP's averaging, or a sum over ranks, combines them).
    ``image_ids`` / ``text_ids`` mask false negatives across ranks as in
    :func:`fusedloss.clip_loss` (every rank gives them, or none).
    """
    fn = "clip_loss"
    scale = ids = None

    def local_check():
        nonlocal scale, ids
        scale = _contrastive._clip_scale(image_features, text_features, logit_scale, reduction, tile_size)
        batch = image_features.shape[0]
        ids = (_contrastive.check_ids(image_ids, "image_ids", batch, image_features),
               _contrastive.check_ids(text_ids, "text_ids", batch, image_features), None)
        return [*image_features.shape, *(int(t is not None) for t in ids[:2])]

    rank, _, _ = validated(fn, group, image_features, local_check, (
        "the local batch size B", "the feature size D", "whether image_ids are given", "whether text_ids are given"))
    image_features, text_features = _common.autocast_inputs(image_features.device.type, image_features,
                                                            text_features)
    return _gathered_contrastive(image_features, text_features, None, scale, True, reduction, tile_size, group,
                                 rank, ids)
