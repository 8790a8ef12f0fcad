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

False negatives by id (``query_ids`` / ``key_ids`` / ``negative_ids``,
``ids`` for NT-Xent, ``image_ids`` / ``text_ids`` for CLIP): a column that
refers to the same item as row i's positive is left out of row i's softmax
(TF-Recommenders' ``remove_accidental_hits``), the positive itself excepted;
the kernels select such entries out (exactly zero gradient, no ``-inf``
arithmetic). See :func:`info_nce_loss`.
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


def check_ids(ids, name, count, like):
    """A [count] integer tensor of item ids on like's device, as int64 (None
    stays None)."""
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of item ids, got {ids.dtype}")
    if tuple(ids.shape) != (count,):
        raise ValueError(f"{name} must be [{count}] (one id per row), got shape {tuple(ids.shape)}")
    if ids.device != like.device:
        raise ValueError(f"{name} is on {ids.device} but the features are on {like.device}")
    return ids.to(torch.int64)


# The op's arguments without ids: row_ids, col_ids, id_columns, id_penalty.
NO_IDS = (None, None, [], [])


def id_mask(num_cols, *channels, penalty=None):
    """The op's id arguments from channels ``(row ids [R], column ids [n])``
    (None: no channel): column j < n is masked for row i (other than row i's
    positive) when its id equals row i's in some channel; columns past n
    carry no id in that channel. With ``penalty=(match, differ)`` nothing is
    masked: an entry off the positive gets logit ``(scale + match) * dot``
    where the ids match and ``(scale + differ) * dot`` where they do not,
    differentiated as ``scale * dot``."""
    channels = [c for c in channels if c is not None]
    if not channels:
        return NO_IDS
    row_ids = torch.stack([rows for rows, _ in channels])
    col_ids = torch.stack([torch.cat([cols, cols.new_zeros(num_cols - cols.shape[0])]) for _, cols in channels])
    return row_ids, col_ids, [cols.shape[0] for _, cols in channels], [] if penalty is None else list(penalty)


def pair_id_channels(row_ids, col_ids, num_cols, query_ids, key_ids, negative_ids=None):
    """The id channels of query rows against key columns (then extra
    negatives): row i's positive is key i, so its id is ``key_ids[i]``
    (compared with every key's and each negative's id), and key j is the
    positive of query j, so it is also a positive of query i when
    ``query_ids[j] == query_ids[i]``. ``row_ids`` / ``col_ids`` select the
    rows' and the key columns' entries (the distributed layout: local rows,
    gathered columns)."""
    key_channel = query_channel = None
    if key_ids is not None:
        cols = col_ids(key_ids)
        key_channel = (row_ids(key_ids), cols if negative_ids is None else torch.cat([cols, negative_ids]))
    if query_ids is not None:
        query_channel = (row_ids(query_ids), col_ids(query_ids))
    return id_mask(num_cols, key_channel, query_channel)


def _row_losses(rows, cols, positives, scale, tile_size, *, self_offset=None, symmetric=False, ids=NO_IDS):
    """Per-row losses of the fused op: cross-entropy of ``scale * rows @ cols.T``
    against column ``positives[i]`` (``symmetric``: averaged with the column
    term of each pair), without the columns ``ids`` (id_mask) masks."""
    scale = scale.to(_common.acc_dtype(rows.dtype))
    row_ids, col_ids, id_columns, id_penalty = ids
    loss, _, _ = _ops.ops.contrastive_forward(rows, cols, positives, scale, row_ids, col_ids, self_offset, id_columns,
                                              id_penalty, symmetric, int(tile_size or 0))
    return loss


def _fused(rows, cols, positives, scale, *, self_offset, symmetric, reduction, tile_size, memory_budget,
           ids=NO_IDS):
    """The reduced loss; for a loss that will be differentiated, by default
    the single pass (the gradients formed in the forward, three GEMMs a step
    instead of four), unless tile_size asks for the recompute pair."""
    if tile_size is None and _common.wants_single_pass(reduction, rows.device, rows, cols, scale):
        acc = _common.acc_dtype(rows.dtype)
        mask = [rows.requires_grad, cols.requires_grad, scale.requires_grad]
        # mean: the op divides by the number of pairs (a device tensor, no
        # host sync), so its stored gradients need no rescaling.
        normalizer = None if reduction == "sum" else torch.full((), rows.shape[0], dtype=acc, device=rows.device)
        row_ids, col_ids, id_columns, id_penalty = ids
        total, *_ = _ops.ops.contrastive_sum_and_grad(rows, cols, positives, scale.to(acc), normalizer, row_ids,
                                                      col_ids, self_offset, id_columns, id_penalty, symmetric, 0,
                                                      memory_budget or 0, mask)
        return total
    loss = _row_losses(rows, cols, positives, scale, tile_size, self_offset=self_offset, symmetric=symmetric, ids=ids)
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


def _info_nce_ids(query, key, negatives, query_ids, key_ids, negative_ids):
    """The checked id tensors of :func:`info_nce_loss` (and its distributed twin)."""
    batch = query.shape[0]
    query_ids = check_ids(query_ids, "query_ids", batch, query)
    key_ids = check_ids(key_ids, "key_ids", batch, query)
    if negative_ids is not None:
        if negatives is None:
            raise ValueError("negative_ids needs negatives")
        if key_ids is None:
            raise ValueError("negative_ids needs key_ids (a negative is compared with the id of each row's positive "
                             "key)")
    negative_ids = check_ids(negative_ids, "negative_ids", 0 if negatives is None else negatives.shape[0], query)
    return query_ids, key_ids, negative_ids


def info_nce_loss(query, key, *, negatives=None, temperature=None, scale=None, normalize=False, symmetric=False,
                  reduction="mean", tile_size=None, memory_budget=None, key_log_q=None, negative_log_q=None,
                  query_ids=None, key_ids=None, negative_ids=None):
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
        key_ids: optional [B] integer id of the item each key is (a document,
            a product). Row i's positive is key i; any other key j with
            ``key_ids[j] == key_ids[i]`` is the same item, a false negative,
            and is left out of row i's softmax (and, ``symmetric``, row i out
            of column j's): TF-Recommenders' ``remove_accidental_hits``.
        query_ids: optional [B] id of each query: key j is the positive of
            query j, so when ``query_ids[j] == query_ids[i]`` it is a positive
            of query i as well and is left out of row i's softmax too.
        negative_ids: optional [M] ids of the extra negatives (needs
            ``key_ids``): negative m is left out of row i's softmax when
            ``negative_ids[m] == key_ids[i]``.
            The positive itself is never masked; masked entries get exactly
            zero gradient. Without ids, nothing is masked and the kernels run
            the loops they ran before ids existed.

    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    scale = _info_nce_scale(query, key, negatives, temperature, reduction, tile_size, memory_budget, scale)
    key_log_q = _check_log_q(key_log_q, "key_log_q", key.shape[0], query)
    if negative_log_q is not None and negatives is None:
        raise ValueError("negative_log_q needs negatives")
    negative_log_q = _check_log_q(negative_log_q, "negative_log_q", 0 if negatives is None else negatives.shape[0],
                                  query)
    query_ids, key_ids, negative_ids = _info_nce_ids(query, key, negatives, query_ids, key_ids, negative_ids)
    query, key, negatives = _info_nce_features(query, key, negatives, normalize)
    cols = key if negatives is None else torch.cat([key, negatives])
    if key_log_q is not None or negative_log_q is not None:
        parts = [key_log_q if key_log_q is not None else query.new_zeros(key.shape[0])]
        if negatives is not None:
            parts.append(negative_log_q if negative_log_q is not None else query.new_zeros(negatives.shape[0]))
        query, cols = _log_q_corrected(query, cols, scale, torch.cat([p.to(parts[0].dtype) for p in parts]))
    positives = torch.arange(query.shape[0], device=query.device)
    same = lambda ids: ids  # noqa: E731  (rows and key columns are the same B pairs)
    ids = pair_id_channels(same, same, cols.shape[0], query_ids, key_ids, negative_ids)
    return _fused(query, cols, positives, scale, self_offset=None, symmetric=symmetric, reduction=reduction,
                  tile_size=tile_size, memory_budget=memory_budget, ids=ids)


def _nt_xent_ids(ids, hidden):
    """NT-Xent's ids, [N] (one per sample, both views) or [2N], as one per row."""
    rows = hidden.shape[0]
    if isinstance(ids, torch.Tensor) and tuple(ids.shape) == (rows // 2,):
        return check_ids(ids, "ids", rows // 2, hidden).repeat(2)
    if isinstance(ids, torch.Tensor) and tuple(ids.shape) != (rows,):
        raise ValueError(f"ids must be [N]=[{rows // 2}] (one per sample) or [2N]=[{rows}] (one per row), got shape "
                         f"{tuple(ids.shape)}")
    return check_ids(ids, "ids", rows, hidden)


def nt_xent_loss(hidden, *, temperature=None, scale=None, normalize=True, reduction="mean", tile_size=None,
                 memory_budget=None, ids=None):
    """SimCLR's NT-Xent on hidden [2N, D], rows i and i + N being two views.

    Each of the 2N rows is an anchor: its positive is the other view, its
    negatives the other 2N - 2 rows (its own similarity is masked out).
    ``reduction="none"`` gives the 2N per-anchor losses, ``"mean"`` their mean
    (SimCLR's ``objective.py`` returns twice that). ``temperature`` defaults
    to 0.5; ``scale`` (= 1 / temperature) may be given instead, as in
    :func:`info_nce_loss`. ``tile_size`` and ``memory_budget`` as in
    :func:`clip_loss`.

    ``ids``: optional integer ids of the underlying samples, [N] (sample i's
    two views, rows i and i + N, share ``ids[i]``) or [2N] (one per row). Row
    i's negatives then exclude every other row with its positive's id: two
    draws of the same image in one batch are not pushed apart.
    """
    _validate.check_reduction(reduction)
    _check_tiling(tile_size, memory_budget)
    _check_features("hidden", hidden)
    if hidden.shape[0] % 2 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must have an even, non-zero number of rows [2N, D] (views i and i+N), "
                         f"got {hidden.shape[0]}")
    scale = _logit_scale(temperature, scale, 0.5, hidden)
    rows = hidden.shape[0]
    ids = _nt_xent_ids(ids, hidden)
    (hidden,) = _common.autocast_inputs(hidden.device.type, hidden)
    if normalize:
        hidden = F.normalize(hidden, dim=-1)
    positives = (torch.arange(rows, device=hidden.device) + rows // 2) % rows
    mask = NO_IDS if ids is None else id_mask(rows, (ids[positives], ids))
    return _fused(hidden, hidden, positives, scale, self_offset=0, symmetric=False, reduction=reduction,
                  tile_size=tile_size, memory_budget=memory_budget, ids=mask)


def clip_loss(image_features, text_features, logit_scale, *, reduction="mean", tile_size=None, memory_budget=None,
              image_ids=None, text_ids=None):
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

    ``image_ids`` / ``text_ids``: optional [B] integer ids of the images and
    the captions. Pair j is left out of pair i's image -> text softmax and of
    its text -> image softmax when they share the image or the caption
    (``image_ids[j] == image_ids[i]`` or ``text_ids[j] == text_ids[i]``): the
    mask is symmetric, as the loss is.
    """
    scale = _clip_scale(image_features, text_features, logit_scale, reduction, tile_size, memory_budget)
    batch = image_features.shape[0]
    image_ids = check_ids(image_ids, "image_ids", batch, image_features)
    text_ids = check_ids(text_ids, "text_ids", batch, image_features)
    image_features, text_features = _common.autocast_inputs(image_features.device.type, image_features,
                                                            text_features)
    positives = torch.arange(batch, device=image_features.device)
    same = lambda ids: ids  # noqa: E731
    ids = pair_id_channels(same, same, batch, image_ids, text_ids)
    return _fused(image_features, text_features, positives, scale, self_offset=None, symmetric=True,
                  reduction=reduction, tile_size=tile_size, memory_budget=memory_budget, ids=ids)


class InfoNCELoss(_common.LossModule):
    """Module form of :func:`info_nce_loss`; call as ``loss(query, key, negatives=None, *, query_ids=None,
    key_ids=None, negative_ids=None)``.
    ``temperature`` (or ``scale``) may be a float or a 0-dim tensor / Parameter (learnable)."""

    def __init__(self, temperature=None, *, scale=None, normalize=False, symmetric=False, reduction="mean",
                 tile_size=None, memory_budget=None):
        super().__init__(reduction, temperature=temperature, scale=scale, normalize=normalize, symmetric=symmetric,
                         tile_size=tile_size, memory_budget=memory_budget)

    def forward(self, query, key, negatives=None, *, query_ids=None, key_ids=None, negative_ids=None):
        return info_nce_loss(query, key, negatives=negatives, temperature=self.temperature, scale=self.scale,
                             normalize=self.normalize, symmetric=self.symmetric, reduction=self.reduction,
                             tile_size=self.tile_size, memory_budget=self.memory_budget, query_ids=query_ids,
                             key_ids=key_ids, negative_ids=negative_ids)

    def extra_repr(self):
        return (f"temperature={self.temperature}, scale={self.scale}, normalize={self.normalize}, "
                f"symmetric={self.symmetric}, reduction={self.reduction!r}")


class NTXentLoss(_common.LossModule):
    """Module form of :func:`nt_xent_loss`; call as ``loss(hidden, ids=None)``."""

    def __init__(self, temperature=None, *, scale=None, normalize=True, reduction="mean", tile_size=None,
                 memory_budget=None):
        super().__init__(reduction, temperature=temperature, scale=scale, normalize=normalize, tile_size=tile_size,
                         memory_budget=memory_budget)

    def forward(self, hidden, ids=None):
        return nt_xent_loss(hidden, temperature=self.temperature, scale=self.scale, normalize=self.normalize,
                            reduction=self.reduction, tile_size=self.tile_size, memory_budget=self.memory_budget,
                            ids=ids)

    def extra_repr(self):
        return (f"temperature={self.temperature}, scale={self.scale}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}")


class ClipLoss(_common.LossModule):
    """Module form of :func:`clip_loss`; call as ``loss(image_features, text_features, logit_scale, *,
    image_ids=None, text_ids=None)``."""

    def __init__(self, *, reduction="mean", tile_size=None, memory_budget=None):
        super().__init__(reduction, tile_size=tile_size, memory_budget=memory_budget)

    def forward(self, image_features, text_features, logit_scale, *, image_ids=None, text_ids=None):
        return clip_loss(image_features, text_features, logit_scale, reduction=self.reduction,
                         tile_size=self.tile_size, memory_budget=self.memory_budget, image_ids=image_ids,
                         text_ids=text_ids)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
