"""sentence-transformers' MultipleNegativesRankingLoss with
``gather_across_devices=True``: this rank's queries scored against the queries
and documents of every rank (see :func:`fusedloss.mnrl_loss` and
docs/distributed.md)."""
import torch

from .. import _common
from .. import mnrl as _mnrl
from ._collectives import gather, validated


def mnrl_loss(query, positive, negatives=None, *, scale=20.0, directions=("query_to_doc",), partition_mode="joint",
              hardness_mode=None, hardness_strength=0.0, normalize=True, reduction="mean", group=None,
              tile_size=None):
    """:func:`fusedloss.mnrl_loss` over the batch of every rank in ``group``.

    Equals sentence-transformers' ``MultipleNegativesRankingLoss(...,
    gather_across_devices=True)`` on each rank, and the single-process loss on
    the rank-ordered concatenation of all ranks' tensors restricted to this
    rank's rows: the documents are every rank's positives, then every rank's
    first hard-negative block, and so on (ST's order); the masks and the
    hardness penalty follow each document's query across ranks. ``"mean"`` is
    over this rank's B queries (sum the ranks' losses, or let DDP average the
    gradients, for the global objective); gradients flow to the rank that
    produced each embedding. Every rank must pass the same B, D, number of
    hard-negative blocks and options.
    """
    fn = "mnrl_loss"
    prepared = None

    def local_check():
        nonlocal prepared
        prepared = _mnrl.prepare(query, positive, negatives, scale, directions, partition_mode, hardness_mode,
                                 hardness_strength, normalize, reduction, tile_size)
        chosen = prepared[4]
        # The strength's fp64 bits, so that ranks agree on it exactly.
        strength_bits = torch.tensor(float(hardness_strength), dtype=torch.float64).view(torch.int64).item()
        mode = -1 if hardness_mode is None else _mnrl.HARDNESS_MODES.index(hardness_mode)
        return [*query.shape, len(prepared[2]), *(int(d in chosen) for d in _mnrl.DIRECTIONS),
                int(partition_mode == "joint"), mode, strength_bits, int(normalize)]

    rank, _, _ = validated(fn, group, query, local_check, (
        "the local batch size B (query rows)", "the feature size D", "the number of hard-negative blocks",
        *(f"whether directions include {d!r}" for d in _mnrl.DIRECTIONS), "partition_mode", "hardness_mode",
        "hardness_strength", "normalize"))
    query, positive, negatives, scale, directions, penalty = prepared
    queries = gather(query, group)
    docs = torch.cat([gather(positive, group), *(gather(block, group) for block in negatives)])
    loss = _mnrl.mnrl_rows(query, positive, queries, docs, rank * query.shape[0], scale, directions, partition_mode,
                           penalty, tile_size)
    return _common.reduce_rows(loss, None, reduction, loss.shape)
