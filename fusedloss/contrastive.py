"""InfoNCE family: InfoNCE (in-batch + extra negatives), SimCLR's NT-Xent and
CLIP's symmetric loss, without ever materialising the B x B similarity matrix.

All three are one fused problem: query rows Q [R, D] scored against key
columns K [C, D] with logits ``scale * Q @ K.T``, row i's positive at column
``positives[i]``, optionally its own column masked (NT-Xent), optionally the
column-wise (key -> query) term (CLIP, symmetric InfoNCE). A reduced loss that
will be differentiated runs ``fusedloss::contrastive_sum_and_grad``, the single
pass over row blocks that forms the gradients in the forward (three GEMMs);
otherwise ``contrastive_forward`` walks the columns in tiles with an online
log-sum-exp per row (a tile holds every row, so the column-wise LSE of its
columns is complete in the same pass) and its backward recomputes each tile
(see :func:`clip_loss` and csrc/README.md).

``normalize=True`` L2-normalises in Python with ``F.normalize`` (autograd
through it; O(B*D) extra memory, nothing quadratic).
"""
import numbers

import torch
import torch.nn.functional as F

from . import _common, _ops, _validate


def _check_features(name, t, like=None):
    """Shape/dtype/device checks the Python layer must do itself because it
    reshapes (concatenates, normalises) before the op sees the tensors."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if like is not None:
        other, other_name = like
        if t.shape[1] != other.shape[1]:
            raise ValueError(f"{name} has D={t.shape[1]} features but {other_name} has D={other.shape[1]}")
        if t.dtype != other.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from {other_name} dtype {other.dtype}")
        if t.device != other.device:
            raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}")


def check_pairs(first, second, first_name, second_name, negatives=None):
    """[B, D] positive pairs (row i of each), plus optional [M, D] negatives:
    the validation shared by the single-device and distributed losses."""
    _check_features(first_name, first)
    _check_features(second_name, second, like=(first, first_name))
    if second.shape[0] != first.shape[0]:
        raise ValueError(f"{first_name} has B={first.shape[0]} rows but {second_name} has {second.shape[0]}; "
                         "row i of each must be a positive pair")
    if negatives is not None:
        _check_features("negatives", negatives, like=(first, first_name))


def _check_tiling(tile_size, memory_budget=None):
    _validate.check_optional_positive_int(tile_size, "tile_size")
    _validate.check_optional_positive_int(memory_budget, "memory_budget")


def scalar_argument(value, name, features, positive=True):
    """A float or a 0-dim floating tensor (> 0 when ``positive``), as a 0-dim
    tensor on the features' device (tensors keep their autograd graph; a
    float is a constant)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != features.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {features.device}")
        # One host sync on CUDA, skipped while compiling / capturing (like the
        # target-range checks of the other losses).
        if positive and _validate.should_check_values(value):
            v = value.detach()
            if not bool((v > 0) & torch.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite, got {v.item()}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    value = _validate.check_finite(value, name, positive=positive)
    return torch.tensor(value, dtype=_common.acc_dtype(features.dtype), device=features.device)


def _logit_scale(temperature, scale, default_temperature, features):
    """The logits' multiplier: 1 / temperature, or ``scale`` as given
    (sentence-transformers' convention, e.g. 20.0 with cosine similarity);
    the two exclude each other, and with neither the default temperature applies."""
    if temperature is not None and scale is not None:
        raise ValueError(f"give temperature= or scale= (= 1 / temperature), not both: got temperature={temperature} "
                         f"and scale={scale}")
    if scale is not None:
        return scalar_argument(scale, "scale", features)
    temperature = default_temperature if temperature is None else temperature
    return 1.0 / scalar_argument(temperature, "temperature", features)


def _info_nce_scale(query, key, negatives, temperature, reduction, tile_size, memory_budget=None, scale=None):
    """The argument checks of :func:`info_nce_loss` (and of its distributed
    twin); returns the logit scale (1 / temperature, or ``scale``)."""
    _validate.check_reduction(reduction)
    _check_tiling(tile_size, memory_budget)
    check_pairs(query, key, "query", "key", negatives)
    return _logit_scale(temperature, scale, 0.07, query)


def _info_nce_features(query, key, negatives, normalize):
    """query, key and negatives as the op scores them: in the autocast dtype,
    L2-normalised if asked."""
    query, key, negatives = _common.autocast_inputs(query.device.type, query, key, negatives)
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    return query, key, negatives


def _clip_scale(image_features, text_features, logit_scale, reduction, tile_size, memory_budget=None):
    """The argument checks of :func:`clip_loss` (and of its distributed twin);
    returns the logit scale."""
    _validate.check_reduction(reduction)
    _check_tiling(tile_size, memory_budget)
    check_pairs(image_features, text_features, "image_features", "text_features")
    return scalar_argument(logit_scale, "logit_scale", image_features)


def _row_losses(rows, cols, positives, scale, tile_size, *, self_offset=None, symmetric=False):
    """Per-row losses of the fused op: cross-entropy of ``scale * rows @ cols.T``
    against column ``positives[i]`` (``symmetric``: averaged with the column
    term of each pair)."""
    scale = scale.to(_common.acc_dtype(rows.dtype))
    loss, _, _ = _ops.ops.contrastive_forward(rows, cols, positives, scale, self_offset, symmetric,
                                              int(tile_size or 0))
    return loss


def _fused(rows, cols, positives, scale, *, self_offset, symmetric, reduction, tile_size, memory_budget):
    """The reduced loss; for a loss that will be differentiated, by default
    the single pass (the gradients formed in the forward, three GEMMs a step
    instead of four), unless tile_size asks for the recompute pair."""
    if tile_size is None and _common.wants_single_pass(reduction, rows.device, rows, cols, scale):
        acc = _common.acc_dtype(rows.dtype)
        mask = [rows.requires_grad, cols.requires_grad, scale.requires_grad]
        # mean: the op divides by the number of pairs (a device tensor, no
        # host sync), so its stored gradients need no rescaling.
        normalizer = None if reduction == "sum" else torch.full((), rows.shape[0], dtype=acc, device=rows.device)
        total, *_ = _ops.ops.contrastive_sum_and_grad(rows, cols, positives, scale.to(acc), normalizer, self_offset,
                                                      symmetric, 0, memory_budget or 0, mask)
        return total
    loss = _row_losses(rows, cols, positives, scale, tile_size, self_offset=self_offset, symmetric=symmetric)
    return _common.reduce_rows(loss, None, reduction, loss.shape)


def _check_log_q(log_q, name, rows, like):
    """A [rows] floating tensor of log sampling probabilities on like's device."""
    if log_q is None:
        return None
    if not isinstance(log_q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(log_q).__name__}")
    if tuple(log_q.shape) != (rows,):
        raise ValueError(f"{name} must be [{rows}] (one log-probability per column), got shape {tuple(log_q.shape)}")
    if not log_q.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {log_q.dtype}")
    if log_q.device != like.device:
        raise ValueError(f"{name} is on {log_q.device} but the features are on {like.device}")
    return log_q


def _log_q_corrected(query, cols, scale, log_q):
    """query and columns whose dot products are the logits minus log q:
    ``scale * [q, 1] . [k_j, -log q_j / scale] = scale * q . k_j - log q_j``.
    One extra feature, so the fused op, its GEMMs and both of its algorithms
    apply the correction unchanged; autograd through ``-log q / scale`` keeps
    d(scale) exact (the kernels' d(scale) counts the extra column, its
    gradient removes it again)."""
    ones = torch.ones(query.shape[0], 1, dtype=query.dtype, device=query.device)
    offset = (-log_q.to(_common.acc_dtype(query.dtype)) / scale).to(cols.dtype)
    return torch.cat([query, ones], dim=1), torch.cat([cols, offset.unsqueeze(1)], dim=1)


def info_nce_loss(query, key, *, negatives=None, temperature=None, scale=None, normalize=False, symmetric=False,
                  reduction="mean", tile_size=None, memory_budget=None, key_log_q=None, negative_log_q=None):
    """InfoNCE with in-batch negatives (plus optional extra negatives).

    Args:
        query: [B, D]; key: [B, D], row i of each is a positive pair.
        negatives: optional [M, D] extra negatives shared by every query; they
            take no part in the key -> query term.
        temperature: float or 0-dim tensor (> 0, receives a gradient);
            logits are ``query @ key.T / temperature``. Default 0.07.
        scale: instead of ``temperature``, the multiplier itself (float or
            0-dim tensor > 0): logits ``scale * query @ key.T``, as
            sentence-transformers' ``MultipleNegativesRankingLoss(scale=20.0)``
            with ``normalize=True`` (cosine similarity). Giving both is an error.
        normalize: L2-normalise queries, keys and negatives first.
        symmetric: per pair, the mean of the query -> key term (CE over the
            B + M columns) and the key -> query term (CE over the B queries).
        reduction: ``"none"`` ([B] per pair), ``"sum"`` or ``"mean"`` (over B).
        tile_size: key columns per tile of the recompute algorithm (default:
            sized to a fixed workspace). Giving it forces that algorithm.
        memory_budget: bytes of the single pass's logits tile (see
            :func:`clip_loss`).
        key_log_q: optional [B] log of each key's sampling probability,
            subtracted from its logit in every row (the sampling-bias
            correction of in-batch negatives for two-tower retrieval,
            TF-Recommenders' ``candidate_sampling_probability``); columns
            without it are not corrected.
        negative_log_q: optional [M] the same for the extra negatives. The
            key -> query term of ``symmetric`` is unchanged by either (a
            column's correction is constant over its softmax).

    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    scale = _info_nce_scale(query, key, negatives, temperature, reduction, tile_size, memory_budget, scale)
    key_log_q = _check_log_q(key_log_q, "key_log_q", key.shape[0], query)
    if negative_log_q is not None and negatives is None:
        raise ValueError("negative_log_q needs negatives")
    negative_log_q = _check_log_q(negative_log_q, "negative_log_q", 0 if negatives is None else negatives.shape[0],
                                  query)
    query, key, negatives = _info_nce_features(query, key, negatives, normalize)
    cols = key if negatives is None else torch.cat([key, negatives])
    if key_log_q is not None or negative_log_q is not None:
        parts = [key_log_q if key_log_q is not None else query.new_zeros(key.shape[0])]
        if negatives is not None:
            parts.append(negative_log_q if negative_log_q is not None else query.new_zeros(negatives.shape[0]))
        query, cols = _log_q_corrected(query, cols, scale, torch.cat([p.to(parts[0].dtype) for p in parts]))
    positives = torch.arange(query.shape[0], device=query.device)
    return _fused(query, cols, positives, scale, self_offset=None, symmetric=symmetric, reduction=reduction,
                  tile_size=tile_size, memory_budget=memory_budget)


def nt_xent_loss(hidden, *, temperature=None, scale=None, normalize=True, reduction="mean", tile_size=None,
                 memory_budget=None):
    """SimCLR's NT-Xent on hidden [2N, D], rows i and i + N being two views.

    Each of the 2N rows is an anchor: its positive is the other view, its
    negatives the other 2N - 2 rows (its own similarity is masked out).
    ``reduction="none"`` gives the 2N per-anchor losses, ``"mean"`` their mean
    (SimCLR's ``objective.py`` returns twice that). ``temperature`` defaults
    to 0.5; ``scale`` (= 1 / temperature) may be given instead, as in
    :func:`info_nce_loss`. ``tile_size`` and ``memory_budget`` as in
    :func:`clip_loss`.
    """
    _validate.check_reduction(reduction)
    _check_tiling(tile_size, memory_budget)
    _check_features("hidden", hidden)
    if hidden.shape[0] % 2 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must have an even, non-zero number of rows [2N, D] (views i and i+N), "
                         f"got {hidden.shape[0]}")
    scale = _logit_scale(temperature, scale, 0.5, hidden)
    (hidden,) = _common.autocast_inputs(hidden.device.type, hidden)
    if normalize:
        hidden = F.normalize(hidden, dim=-1)
    rows = hidden.shape[0]
    positives = (torch.arange(rows, device=hidden.device) + rows // 2) % rows
    return _fused(hidden, hidden, positives, scale, self_offset=0, symmetric=False, reduction=reduction,
                  tile_size=tile_size, memory_budget=memory_budget)


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean", tile_size=None, memory_budget=None):
    """CLIP's symmetric loss: per pair, the mean of the image -> text and the
    text -> image cross-entropy of ``logit_scale * image @ text.T`` (targets on
    the diagonal). ``logit_scale`` is the multiplier (already exponentiated), a
    float or a 0-dim tensor that receives a gradient. Features are used as
    given (CLIP models normalise them). ``"mean"`` equals
    ``(F.cross_entropy(X, y) + F.cross_entropy(X.T, y)) / 2``.

    Algorithms (all three losses): a reduced loss that will be differentiated
    (bf16, fp32, fp64; fp16 takes the recompute pair so that a GradScaler's
    scale reaches the gradients before they are rounded) runs the single pass
    by default: row blocks whose [R_block, C] fp32 tile
    of logits fits ``memory_budget`` (default 256 MiB on the CPU, 4 GiB on
    CUDA, where it is opt-in with FUSEDLOSS_CUDA_SINGLE_PASS=1 until validated
    on a GPU), the gradients formed in the forward (three GEMMs a step). The
    symmetric loss needs every column's log-sum-exp first, so it runs single
    pass only when the whole [B, B] tile fits; otherwise, for
    ``reduction="none"``, or when ``tile_size`` (key columns per tile) is
    given, the recompute pair runs: a tiled forward and a backward that
    recomputes each tile (four GEMMs, a [B, tile] workspace).
    """
    scale = _clip_scale(image_features, text_features, logit_scale, reduction, tile_size, memory_budget)
    image_features, text_features = _common.autocast_inputs(image_features.device.type, image_features,
                                                            text_features)
    positives = torch.arange(image_features.shape[0], device=image_features.device)
    return _fused(image_features, text_features, positives, scale, self_offset=None, symmetric=True,
                  reduction=reduction, tile_size=tile_size, memory_budget=memory_budget)


class InfoNCELoss(_common.LossModule):
    """Module form of :func:`info_nce_loss`; call as ``loss(query, key, negatives=None)``.
    ``temperature`` (or ``scale``) may be a float or a 0-dim tensor / Parameter (learnable)."""

    def __init__(self, temperature=None, *, scale=None, normalize=False, symmetric=False, reduction="mean",
                 tile_size=None, memory_budget=None):
        super().__init__(reduction, temperature=temperature, scale=scale, normalize=normalize, symmetric=symmetric,
                         tile_size=tile_size, memory_budget=memory_budget)

    def forward(self, query, key, negatives=None):
        return info_nce_loss(query, key, negatives=negatives, temperature=self.temperature, scale=self.scale,
                             normalize=self.normalize, symmetric=self.symmetric, reduction=self.reduction,
                             tile_size=self.tile_size, memory_budget=self.memory_budget)

    def extra_repr(self):
        return (f"temperature={self.temperature}, scale={self.scale}, normalize={self.normalize}, "
                f"symmetric={self.symmetric}, reduction={self.reduction!r}")


class NTXentLoss(_common.LossModule):
    """Module form of :func:`nt_xent_loss`; call as ``loss(hidden)``."""

    def __init__(self, temperature=None, *, scale=None, normalize=True, reduction="mean", tile_size=None,
                 memory_budget=None):
        super().__init__(reduction, temperature=temperature, scale=scale, normalize=normalize, tile_size=tile_size,
                         memory_budget=memory_budget)

    def forward(self, hidden):
        return nt_xent_loss(hidden, temperature=self.temperature, scale=self.scale, normalize=self.normalize,
                            reduction=self.reduction, tile_size=self.tile_size, memory_budget=self.memory_budget)

    def extra_repr(self):
        return (f"temperature={self.temperature}, scale={self.scale}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


class ClipLoss(_common.LossModule):
    """Module form of :func:`clip_loss`; call as ``loss(image_features, text_features, logit_scale)``."""

    def __init__(self, *, reduction="mean", tile_size=None, memory_budget=None):
        super().__init__(reduction, tile_size=tile_size, memory_budget=memory_budget)

    def forward(self, image_features, text_features, logit_scale):
        return clip_loss(image_features, text_features, logit_scale, reduction=self.reduction,
                         tile_size=self.tile_size, memory_budget=self.memory_budget)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
