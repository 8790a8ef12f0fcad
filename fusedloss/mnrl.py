"""sentence-transformers' ``MultipleNegativesRankingLoss`` (v6.2.0) in full —
``directions``, ``partition_mode``, ``hardness_mode`` / ``hardness_strength``,
hard-negative columns — on the fused contrastive op: no [B, B] block is ever
materialised.

Each query row i has up to four blocks of candidates (ST's
``compute_loss_from_embeddings``): query_to_doc (q_i against every document,
hard negatives included; its positive d_i), query_to_query (q_i against the
other queries), doc_to_query (d_i against the queries) and doc_to_doc (d_i
against the documents, the documents of query i excluded). Each block is one
call of the fused op (``reduction="none"``, the recompute pair) whose per-row
loss is the block's log-sum-exp minus the logit of a column the row keeps,
computed again in autograd (O(B·D)): so every block's LSE is differentiable
without its [B, C] logits. ``"joint"`` takes the log-sum-exp of the blocks'
LSEs (one softmax over all of them), ``"per_direction"`` their mean; the loss
is that minus the positive logit. With query_to_doc alone the op's own loss is
the answer, and a reduced loss runs its single pass.

The masks are the op's: query_to_query's self column is its self mask,
doc_to_doc's same-query documents an id mask (the id of a document is its
query's index). The hardness penalty ``alpha * stop_grad(sim)`` on some
query_to_doc negatives is the op's id penalty: with the same ids, entries of
a query's own documents (other than the positive) and of other queries'
documents get logits ``(scale + alpha_match) * sim`` and ``(scale +
alpha_differ) * sim``, differentiated as ``scale * sim``.
"""
import numbers

import torch
import torch.nn.functional as F

from . import _common, _validate
from . import contrastive as _contrastive

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


def _check_options(directions, partition_mode, hardness_mode, hardness_strength):
    """ST's own argument rules, as ValueErrors / TypeErrors raised before any
    kernel runs; returns the directions as a tuple."""
    if isinstance(directions, str) or not all(isinstance(d, str) for d in directions):
        raise TypeError(f"directions must be a tuple of direction names, got {directions!r}")
    directions = tuple(directions)
    if not directions:
        raise ValueError("directions: at least one direction must be given")
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"directions: unknown {sorted(unknown)}; valid: {list(DIRECTIONS)}")
    if "query_to_doc" not in directions:
        raise ValueError("directions must include 'query_to_doc' (it holds the positive pair)")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError("partition_mode='per_direction' needs every direction to contain the positive pair: "
                         "'query_to_query' and 'doc_to_doc' do not; use partition_mode='joint'")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be None or one of {list(HARDNESS_MODES)}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, numbers.Real):
        raise TypeError(f"hardness_strength must be a float, got {type(hardness_strength).__name__}")
    _validate.check_finite(hardness_strength, "hardness_strength")
    if hardness_strength < 0:
        raise ValueError(f"hardness_strength must be non-negative, got {hardness_strength}")
    return directions


def _check_documents(query, positive, negatives):
    """query / positive [B, D] pairs and the hard-negative columns as a list of
    [B, D] tensors (negative block k holds query i's k-th hard negative in row i)."""
    _contrastive.check_pairs(query, positive, "query", "positive")
    if negatives is None:
        negatives = []
    elif isinstance(negatives, torch.Tensor):
        negatives = [negatives]
    else:
        negatives = list(negatives)
    for k, block in enumerate(negatives):
        name = f"negatives[{k}]"
        _contrastive._check_features(name, block, like=(query, "query"))
        if block.shape[0] != query.shape[0]:
            raise ValueError(f"{name} has {block.shape[0]} rows but query has B={query.shape[0]}: hard-negative "
                             "block k holds query i's k-th hard negative in row i")
    return negatives


def _penalty(hardness_mode, hardness_strength):
    """(alpha on a query's own documents, alpha on other queries' documents),
    or None (ST applies the penalty only with a positive strength)."""
    if hardness_mode is None or hardness_strength == 0:
        return None
    alpha = float(hardness_strength)
    return {"hard_negatives": (alpha, 0.0), "in_batch_negatives": (0.0, alpha),
            "all_negatives": (alpha, alpha)}[hardness_mode]


def _row_dots(a, b, scale):
    """scale * <a_i, b_i> per row, accumulated like the op's GEMMs (fp32 for
    bf16 / fp16, fp64 for fp64)."""
    acc = _common.acc_dtype(a.dtype)
    return scale * (a.to(acc) * b.to(acc)).sum(-1)


def mnrl_rows(query, positive, queries, docs, offset, scale, directions, partition_mode, penalty, tile_size):
    """Per-row MNRL loss [B] of the local rows.

    query, positive: this process's [B, D] rows; queries [W, D] every query
    and docs [(1 + n) W, D] every document (all positives, then each block of
    hard negatives) of the batch the rows are part of — W = B on one device,
    the gathered batch across ranks — and offset the index of local row 0
    among them. scale: 0-dim tensor.
    """
    batch, world_batch = query.shape[0], queries.shape[0]
    rows = torch.arange(batch, device=query.device) + offset
    # The id of every document: the index of its query (docs hold whole blocks of W).
    owner = torch.arange(world_batch, device=query.device).repeat(docs.shape[0] // world_batch)
    to_doc = _contrastive.NO_IDS if penalty is None else _contrastive.id_mask(docs.shape[0], (rows, owner),
                                                                               penalty=penalty)

    def row_losses(r, c, positives, **kw):
        return _contrastive._row_losses(r, c, positives, scale, tile_size, **kw)

    positive_logit = _row_dots(query, positive, scale)
    # Each block's LSE: its per-row loss plus the logit of the column taken as
    # the row's "positive" (any column the row keeps).
    lses = [row_losses(query, docs, rows, ids=to_doc) + positive_logit]
    # A row's next query (and that query's positive document): neither masked
    # in the same-type blocks. With one query in all, those blocks are empty.
    neighbour = (rows + 1) % world_batch
    if "query_to_query" in directions and world_batch > 1:
        lses.append(row_losses(query, queries, neighbour, self_offset=offset)
                    + _row_dots(query, queries[neighbour], scale))
    if "doc_to_query" in directions:
        lses.append(row_losses(positive, queries, rows) + positive_logit)
    if "doc_to_doc" in directions and world_batch > 1:
        own_docs = _contrastive.id_mask(docs.shape[0], (rows, owner))
        lses.append(row_losses(positive, docs, neighbour, ids=own_docs) + _row_dots(positive, docs[neighbour], scale))
    lses = torch.stack(lses)
    lse = torch.logsumexp(lses, 0) if partition_mode == "joint" else lses.mean(0)
    return lse - positive_logit


def prepare(query, positive, negatives, scale, directions, partition_mode, hardness_mode, hardness_strength,
            normalize, reduction, tile_size, memory_budget=None):
    """The checks and feature preparation shared with the distributed twin:
    returns (query, positive, negatives, scale, directions, penalty)."""
    _validate.check_reduction(reduction)
    _contrastive._check_tiling(tile_size, memory_budget)
    negatives = _check_documents(query, positive, negatives)
    directions = _check_options(directions, partition_mode, hardness_mode, hardness_strength)
    scale = _contrastive.scalar_argument(scale, "scale", query)
    query, positive, *negatives = _common.autocast_inputs(query.device.type, query, positive, *negatives)
    if normalize:  # cosine similarity, ST's default similarity_fct
        query, positive = F.normalize(query, dim=-1), F.normalize(positive, dim=-1)
        negatives = [F.normalize(n, dim=-1) for n in negatives]
    scale = scale.to(_common.acc_dtype(query.dtype))
    return query, positive, negatives, scale, directions, _penalty(hardness_mode, hardness_strength)


def mnrl_loss(query, positive, negatives=None, *, scale=20.0, directions=("query_to_doc",), partition_mode="joint",
              hardness_mode=None, hardness_strength=0.0, normalize=True, reduction="mean", tile_size=None,
              memory_budget=None):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` on embeddings.

    Equals ``MultipleNegativesRankingLoss(model, scale, similarity_fct,
    directions=..., partition_mode=..., hardness_mode=...,
    hardness_strength=...).compute_loss_from_embeddings([query, positive,
    *negatives], None)`` (``similarity_fct=cos_sim`` with ``normalize=True``,
    ``dot_score`` with ``normalize=False``), gradients included.

    Args:
        query: [B, D] anchors; positive: [B, D], row i the positive of query i.
        negatives: optional hard negatives: one [B, D] tensor or a list of
            them (ST's columns after the positive), row i of each a hard
            negative of query i; every query scores every one of them.
        scale: the logits' multiplier (``1 / temperature``), float or 0-dim
            tensor (> 0, receives a gradient).
        directions: the candidate blocks, ``"query_to_doc"`` (required),
            ``"query_to_query"``, ``"doc_to_query"``, ``"doc_to_doc"``.
        partition_mode: ``"joint"`` (one softmax per row over every selected
            block) or ``"per_direction"`` (the mean of the blocks'
            log-partitions; only query_to_doc and doc_to_query).
        hardness_mode: None, ``"in_batch_negatives"`` (other queries'
            documents), ``"hard_negatives"`` (the query's own hard negatives)
            or ``"all_negatives"``: those query_to_doc logits get
            ``+ hardness_strength * stop_grad(sim)``.
        hardness_strength: alpha (>= 0); 0 disables the penalty.
        normalize: cosine similarity (L2-normalise the embeddings first).
        reduction: ``"mean"`` (ST's), ``"sum"`` or ``"none"`` ([B]).
        tile_size, memory_budget: as in :func:`fusedloss.info_nce_loss`.

    Memory: the op's tiles and O((1 + n)·B·D) — never a [B, B] block.
    Returns the loss in fp32 (fp64 for fp64 inputs).
    """
    query, positive, negatives, scale, directions, penalty = prepare(
        query, positive, negatives, scale, directions, partition_mode, hardness_mode, hardness_strength, normalize,
        reduction, tile_size, memory_budget)
    docs = torch.cat([positive, *negatives]) if negatives else positive
    batch = query.shape[0]
    if directions == ("query_to_doc",):
        # The op's loss is the answer: a reduced differentiated loss runs its single pass.
        rows = torch.arange(batch, device=query.device)
        ids = _contrastive.NO_IDS
        if penalty is not None:
            ids = _contrastive.id_mask(docs.shape[0], (rows, rows.repeat(docs.shape[0] // batch)), penalty=penalty)
        return _contrastive._fused(query, docs, rows, scale, self_offset=None, symmetric=False, reduction=reduction,
                                   tile_size=tile_size, memory_budget=memory_budget, ids=ids)
    loss = mnrl_rows(query, positive, query, docs, 0, scale, directions, partition_mode, penalty, tile_size)
    return _common.reduce_rows(loss, None, reduction, loss.shape)


class MultipleNegativesRankingLoss(_common.LossModule):
    """Module form of :func:`mnrl_loss`; call as ``loss(query, positive, *negatives)``
    (sentence-transformers' column order: anchor, positive, hard negatives).
    ``scale`` may be a float or a 0-dim tensor / Parameter."""

    def __init__(self, scale=20.0, *, directions=("query_to_doc",), partition_mode="joint", hardness_mode=None,
                 hardness_strength=0.0, normalize=True, reduction="mean", tile_size=None, memory_budget=None):
        directions = _check_options(directions, partition_mode, hardness_mode, hardness_strength)
        super().__init__(reduction, scale=scale, directions=directions, partition_mode=partition_mode,
                         hardness_mode=hardness_mode, hardness_strength=hardness_strength, normalize=normalize,
                         tile_size=tile_size, memory_budget=memory_budget)

    def forward(self, query, positive, *negatives):
        return mnrl_loss(query, positive, list(negatives), scale=self.scale, directions=self.directions,
                         partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
                         hardness_strength=self.hardness_strength, normalize=self.normalize,
                         reduction=self.reduction, tile_size=self.tile_size, memory_budget=self.memory_budget)

    def extra_repr(self):
        return (f"scale={self.scale}, directions={self.directions}, partition_mode={self.partition_mode!r}, "
                f"hardness_mode={self.hardness_mode!r}, hardness_strength={self.hardness_strength}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}")
