"""Plain-PyTorch InfoNCE, NT-Xent and CLIP losses: they build the full B x B
(or 2N x 2N, or B x (B + M)) similarity matrix.

The semantics fusedloss.info_nce_loss / nt_xent_loss / clip_loss must
reproduce; the test oracle and the benchmarks' baseline. The similarity GEMM
runs in the input dtype and the softmax in fp32, like a typical training loop.
"""
import torch
import torch.nn.functional as F

from .. import _common, _validate


def _logits(rows, cols, scale):
    dots = rows @ cols.T
    dots = dots.double() if dots.dtype == torch.float64 else dots.float()
    return dots * scale


def _false_negatives(logits, positives, *channels):
    """logits with -inf where a column shares an id with the row's positive in
    some channel ``(row ids [R], column ids [n])`` (columns past n carry no
    id), the positive itself excepted: the materialised id mask."""
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for row_ids, col_ids in channels:
        if row_ids is not None:
            mask[:, : col_ids.shape[0]] |= row_ids[:, None] == col_ids[None, :]
    mask[torch.arange(logits.shape[0], device=logits.device), positives] = False
    return logits.masked_fill(mask, float("-inf"))


def _pair_channels(query_ids, key_ids, negative_ids=None):
    key_cols = None if key_ids is None else (key_ids if negative_ids is None else torch.cat([key_ids, negative_ids]))
    return (key_ids, key_cols), (query_ids, query_ids)


def info_nce_loss(query, key, *, negatives=None, temperature=0.07, normalize=False, symmetric=False,
                  reduction="mean", key_log_q=None, negative_log_q=None, query_ids=None, key_ids=None,
                  negative_ids=None):
    _validate.check_reduction(reduction)
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    cols = key if negatives is None else torch.cat([key, negatives])
    logits = _logits(query, cols, 1.0 / temperature)
    if key_log_q is not None:  # sampling-bias correction of each column's logit
        logits[:, : key.shape[0]] -= key_log_q.to(logits.dtype)
    if negative_log_q is not None:
        logits[:, key.shape[0]:] -= negative_log_q.to(logits.dtype)
    labels = torch.arange(query.shape[0], device=query.device)
    logits = _false_negatives(logits, labels, *_pair_channels(query_ids, key_ids, negative_ids))
    loss = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        # key -> query: CE over the columns of the B x B block only.
        reverse = F.cross_entropy(logits[:, : key.shape[0]].T, labels, reduction="none")
        loss = 0.5 * (loss + reverse)
    return _common.reduce_rows(loss, None, reduction, loss.shape)


def nt_xent_loss(hidden, *, temperature=0.5, normalize=True, reduction="mean", ids=None):
    _validate.check_reduction(reduction)
    if normalize:
        hidden = F.normalize(hidden, dim=-1)
    rows = hidden.shape[0]
    logits = _logits(hidden, hidden, 1.0 / temperature)
    self_mask = torch.eye(rows, dtype=torch.bool, device=hidden.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    labels = (torch.arange(rows, device=hidden.device) + rows // 2) % rows
    if ids is not None:
        ids = ids.repeat(2) if ids.shape[0] == rows // 2 else ids
        logits = _false_negatives(logits, labels, (ids[labels], ids))
    loss = F.cross_entropy(logits, labels, reduction="none")
    return _common.reduce_rows(loss, None, reduction, loss.shape)


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean", image_ids=None, text_ids=None):
    _validate.check_reduction(reduction)
    logits = _logits(image_features, text_features, logit_scale)
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    logits = _false_negatives(logits, labels, *_pair_channels(image_ids, text_ids))
    loss = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits.T, labels, reduction="none"))
    return _common.reduce_rows(loss, None, reduction, loss.shape)
