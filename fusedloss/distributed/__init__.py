"""Losses over ``torch.distributed``: vocabulary-parallel cross-entropy and
contrastive losses with negatives gathered from every rank.

All collectives are ``torch.distributed`` ones (NCCL on GPUs, gloo on CPU);
the scoring is the single-device fused ops, so nothing N x V (or B x B) is
formed on any rank. See docs/distributed.md.

- :func:`linear_cross_entropy`: Megatron-style vocabulary parallelism. Each
  rank holds rows ``[vocab_start, vocab_start + V_local)`` of the classifier;
  ``input`` and ``target`` are replicated across the group. Each rank runs the
  fused forward on its shard (local log-sum-exp, the target logit when the
  target is in the shard, the sum of logits), two all-reduces combine them,
  and the backward recomputes the shard's chunks against the global lse. The
  input gradient is all-reduced (every rank gets the full, identical one);
  weight / bias gradients stay on their shard. Every rank returns the same
  (global) loss.
- :func:`info_nce_loss` / :func:`clip_loss`: keys (and extra negatives) are
  all-gathered with ``torch.distributed.nn.functional.all_gather`` (its
  backward reduce-scatters, so gradients reach the rank that produced each
  embedding). Local query rows are scored against all gathered columns with
  the positive of local row i at column ``rank * B + i``. Reduction follows
  open_clip's ``local_loss``: each rank's ``"mean"`` is over its own B rows, so
  the rank losses sum (and DDP's gradient averaging divides) to the global
  mean. The key -> query direction of the symmetric losses needs column
  statistics over all ranks' queries: queries are gathered too and the local
  keys are scored against them (a second call of the op, roles swapped).
  ``query_ids`` / ``key_ids`` / ``negative_ids`` (``image_ids`` /
  ``text_ids``) are all-gathered with the features they name.
- :func:`mnrl_loss`: sentence-transformers' MultipleNegativesRankingLoss with
  ``gather_across_devices=True``: queries, positives and hard-negative blocks
  are gathered (with gradients); this rank's queries (and their positives, for
  the doc directions) are scored against them, one op call per direction.

- :func:`sampled_softmax_loss` / :func:`nce_loss` with a vocabulary-sharded
  weight: candidates are drawn on group rank 0 and broadcast; each rank scores
  only the true and candidate classes of its shard with the single-device
  fused op (the others' columns removed through an infinite log Q), and small
  all-reduces of per-row statistics ([N] and [4, N] for softmax, [N] for NCE)
  combine the ranks; no weight row is communicated.
- DTensor weights (``dtensor``): ``fusedloss.linear_cross_entropy`` /
  ``sampled_softmax_loss`` / ``nce_loss`` given a DTensor weight on a 1-D mesh
  call here. ``Replicate()`` is unwrapped; ``Shard(0)`` (FSDP2) is data
  parallel: the batch is all-gathered, the vocabulary-parallel pass runs on
  this rank's rows of the weight, the input gradient is reduce-scattered and
  the weight gradient is the mean over ranks (FSDP's convention).
- :func:`siglip_loss`: texts all-gathered as for CLIP; local images are scored
  against every rank's texts, local image i's positive at column
  ``rank * B + i``; ``"mean"`` divides this rank's pair sum by its B.

Cross-rank consistency (batch sizes, feature sizes, shard layout) is checked
with one small all-gather of sizes; an invalid argument on any rank makes every
rank raise, instead of leaving the others waiting in a collective.

One module per family (``linear_ce``, ``contrastive``, ``mnrl``, ``sampled``, ``siglip``), one for
DTensor weights (``dtensor``) and one for the group handling, cross-rank
checks and autograd-aware collectives (``_collectives``).
"""
# Module attributes of the single-file version, kept for code that reached them here.
import torch  # noqa: F401
import torch.distributed as dist  # noqa: F401
import torch.nn.functional as F  # noqa: F401

from .contrastive import clip_loss, info_nce_loss
from .mnrl import mnrl_loss
from .linear_ce import linear_cross_entropy
from .sampled import nce_loss, sampled_softmax_loss
from .siglip import siglip_loss

__all__ = ["clip_loss", "info_nce_loss", "linear_cross_entropy", "mnrl_loss", "nce_loss", "sampled_softmax_loss",
           "siglip_loss"]
