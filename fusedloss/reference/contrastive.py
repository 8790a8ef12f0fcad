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


def info_nce_loss(query, key, *, negatives=None, temperature=0.07, normalize=False, symmetric=False,
                  reduction="mean", key_log_q=None, negative_log_q=None):
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
    loss = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        # key -> query: CE over the columns of the B x B block only.
        reverse = F.cross_entropy(logits[:, : key.shape[0]].T, labels, reduction="none")
        loss = 0.5 * (loss + reverse)
    return _common.reduce_rows(loss, None, reduction, loss.shape)


def nt_xent_loss(hidden, *, temperature=0.5, normalize=True, reduction="mean"):
    _validate.check_reduction(reduction)
    if normalize:
        hidden = F.normalize(hidden, dim=-1)
    rows = hidden.shape[0]
    logits = _logits(hidden, hidden, 1.0 / temperature)
    self_mask = torch.eye(rows, dtype=torch.bool, device=hidden.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    labels = (torch.arange(rows, device=hidden.device) + rows // 2) % rows
    loss = F.cross_entropy(logits, labels, reduction="none")
    return _common.reduce_rows(loss, None, reduction, loss.shape)


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean"):
    _validate.check_reduction(reduction)
    logits = _logits(image_features, text_features, logit_scale)
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    loss = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits.T, labels, reduction="none"))
    return _common.reduce_rows(loss, None, reduction, loss.shape)
