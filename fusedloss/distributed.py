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

- :func:`sampled_softmax_loss` / :func:`nce_loss` with a vocabulary-sharded
  weight: candidates are drawn on group rank 0 and broadcast; the (few) weight
  rows of the true and candidate classes are assembled on every rank from
  their owners (one all-reduce of [U, D]) and scored with the single-device
  fused op; their gradients go back to the owning shard only.

Cross-rank consistency (batch sizes, feature sizes, shard layout) is checked
with one small all-gather of sizes; an invalid argument on any rank makes every
rank raise, instead of leaving the others waiting in a collective.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _common
from . import contrastive as _contrastive
from . import linear_ce as _linear_ce
from . import sampled as _sampled
from ._extension import C as _C  # noqa: F401  (registers torch.ops.fusedloss)

_ops = torch.ops.fusedloss

__all__ = ["clip_loss", "info_nce_loss", "linear_cross_entropy", "nce_loss", "sampled_softmax_loss"]



@torch.library.register_fake("fusedloss::linear_ce_shard_forward")
def _linear_ce_shard_forward_fake(input, weight, target, bias, ignore_index, softcap, vocab_start, num_classes,
                                  chunk_size):
    rows = input.shape[0]
    acc = _common.acc_dtype(input.dtype)
    # lse parts [2, N] (max, log-sum), target logit [N], sum of logits [N].
    return input.new_empty(2, rows, dtype=acc), input.new_empty(rows, dtype=acc), input.new_empty(rows, dtype=acc)


# ---------------------------------------------------------------------------
# Group handling and cross-rank checks


def _group_geometry(fn, group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"fusedloss.distributed.{fn}: the default process group is not initialised; call "
                           "torch.distributed.init_process_group() first (torchrun sets up the environment)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"fusedloss.distributed.{fn}: this process is not a member of the given group")
    return rank, dist.get_world_size(group)


def _validated(fn, group, device, local_check, num_sizes):
    """Run ``local_check()`` (argument validation of this rank, returning
    ``num_sizes`` integers to compare across ranks), then all-gather
    ``[failed, world_size, *sizes]`` so that every rank learns whether any rank
    failed and raises too (otherwise the healthy ranks would hang in the next
    collective). Returns ``(rank, world_size, gathered)`` with ``gathered`` a
    list of per-rank size lists."""
    rank, world = _group_geometry(fn, group)
    error, sizes = None, [-1] * num_sizes
    try:
        sizes = local_check()
    except Exception as exc:  # re-raised below, after the peers have heard of it
        error = exc
    mine = torch.tensor([int(error is not None), world, *sizes], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    gathered = [g.tolist() for g in gathered]
    if error is not None:
        raise error
    failed = [r for r, g in enumerate(gathered) if g[0]]
    if failed:
        raise ValueError(f"fusedloss.distributed.{fn}: rank {failed[0]} of the group got invalid arguments "
                         "(see that rank's error)")
    worlds = {g[1] for g in gathered}
    if worlds != {world}:
        raise ValueError(f"fusedloss.distributed.{fn}: ranks disagree on the world size: "
                         f"{[g[1] for g in gathered]}")
    return rank, world, [g[2:] for g in gathered]


def _require_equal(fn, gathered, index, what):
    values = [g[index] for g in gathered]
    if len(set(values)) != 1:
        raise ValueError(f"fusedloss.distributed.{fn}: {what} must be the same on every rank, got {values} "
                         "(rank 0, 1, ...)")


# ---------------------------------------------------------------------------
# Contrastive losses with gathered negatives


def _flat_collective(new_name, old_name):
    """torch 2.14 renamed the flat collectives; older releases only have the
    old names (resolved at call time: builds without distributed lack both)."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (rank order). The backward reduce-scatters the
    gathered gradient, so each rank receives the sum over all ranks' losses of
    the gradient of its own rows (open_clip's ``gather_with_grad``)."""

    @staticmethod
    def forward(ctx, tensor, group):
        tensor = tensor.contiguous()
        ctx.group = group
        out = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
        _flat_collective("all_gather_single", "all_gather_into_tensor")(out, tensor, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        _flat_collective("reduce_scatter_single", "reduce_scatter_tensor")(out, grad, group=ctx.group)
        return out, None


def _gather(tensor, group):
    return _GatherWithGrad.apply(tensor, group)


def _row_ce(rows, cols, positives, scale, tile_size):
    """Per-row cross-entropy of ``scale * rows @ cols.T`` against ``positives``
    with the fused (non-symmetric) contrastive op."""
    loss, _, _ = _ops.contrastive_forward(rows, cols, positives, scale.to(_common.acc_dtype(rows.dtype)), None, False,
                                          int(tile_size or 0))
    return loss


def _gathered_contrastive(fn, query, key, negatives, scale, symmetric, reduction, tile_size, group, rank):
    """query, key: this rank's [B, D] pairs (already validated and consistent
    across ranks); negatives [M, D] or None."""
    batch = query.shape[0]
    keys = _gather(key, group)
    cols = keys if negatives is None else torch.cat([keys, _gather(negatives, group)])
    positives = torch.arange(batch, device=query.device) + rank * batch
    loss = _row_ce(query, cols, positives, scale, tile_size)
    if symmetric:
        # Key -> query term of the local keys: CE over every rank's queries
        # (extra negatives take no part in it).
        loss = 0.5 * (loss + _row_ce(key, _gather(query, group), positives, scale, tile_size))
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
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")

    scale = None

    def local_check():
        nonlocal scale
        _common.check_reduction(reduction)
        _contrastive._check_tile_size(tile_size)
        _contrastive.check_pairs(query, key, "query", "key", negatives)
        scale = 1.0 / _contrastive._positive_scalar(temperature, "temperature", query)
        return [*query.shape, -1 if negatives is None else negatives.shape[0], int(symmetric), int(normalize)]

    rank, _, gathered = _validated(fn, group, device, local_check, 5)
    _require_equal(fn, gathered, 0, "the local batch size B (query rows)")
    _require_equal(fn, gathered, 1, "the feature size D")
    _require_equal(fn, gathered, 2, "the number of extra negatives (None counts as -1)")
    _require_equal(fn, gathered, 3, "symmetric")
    _require_equal(fn, gathered, 4, "normalize")
    query, key, negatives = _common.autocast_inputs(query.device.type, query, key, negatives)
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    return _gathered_contrastive(fn, query, key, negatives, scale, symmetric, reduction, tile_size, group, rank)


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
    device = image_features.device if isinstance(image_features, torch.Tensor) else torch.device("cpu")

    scale = None

    def local_check():
        nonlocal scale
        _common.check_reduction(reduction)
        _contrastive._check_tile_size(tile_size)
        _contrastive.check_pairs(image_features, text_features, "image_features", "text_features")
        scale = _contrastive._positive_scalar(logit_scale, "logit_scale", image_features)
        return list(image_features.shape)

    rank, _, gathered = _validated(fn, group, device, local_check, 2)
    _require_equal(fn, gathered, 0, "the local batch size B")
    _require_equal(fn, gathered, 1, "the feature size D")
    image_features, text_features = _common.autocast_inputs(image_features.device.type, image_features,
                                                            text_features)
    return _gathered_contrastive(fn, image_features, text_features, None, scale, True, reduction, tile_size, group,
                                 rank)


# ---------------------------------------------------------------------------
# Vocabulary-parallel linear cross-entropy


class _VocabParallelLinearCE(torch.autograd.Function):
    """Per-row losses of the vocabulary-parallel linear cross-entropy."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, vocab_start, num_classes, group, ignore_index, label_smoothing,
                z_loss, softcap, chunk_size):
        (local_max, local_log_sum), target_logit, sum_logits = _ops.linear_ce_shard_forward(
            input, weight, target, bias, ignore_index, softcap, vocab_start, num_classes, chunk_size)
        # Global lse = M + log(sum_r exp(max_r - M + log_sum_r)) with M the
        # global max, kept as its two parts (M, log-sum) like the kernels' (see
        # LseParts in numerics.h); the target logit is 0 on every shard but its
        # owner, so a sum picks it.
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        stats = torch.stack([torch.exp(local_max - global_max + local_log_sum), target_logit, sum_logits])
        dist.all_reduce(stats, group=group)
        lse_parts = torch.stack([global_max, torch.log(stats[0])])
        lse = lse_parts.sum(0)
        loss = lse - (1.0 - label_smoothing) * stats[1] + z_loss * lse * lse
        if label_smoothing > 0:  # skipped at 0: a -inf column would make 0 * -inf = NaN
            loss = loss - label_smoothing * stats[2] / num_classes
        loss = torch.where(target == ignore_index, torch.zeros_like(loss), loss)
        ctx.save_for_backward(input, weight, bias, target, lse_parts)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
        ctx.shard = (vocab_start, num_classes, group)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _common.forbid_double_backward("distributed.linear_cross_entropy", grad_loss)
        input, weight, bias, target, lse = ctx.saved_tensors
        vocab_start, num_classes, group = ctx.shard
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = _ops.linear_ce_backward(
            grad_loss.contiguous(), input, weight, target, bias, lse, *ctx.options, mask, vocab_start, num_classes)
        if mask[0]:
            # Each shard's columns contribute dlogits_shard @ W_shard.
            dist.all_reduce(grad_input, group=group)
        return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
                grad_bias if mask[2] else None, *([None] * 9))


def _check_shard_args(fn, input, weight_shard, target, bias_shard, vocab_start, num_classes, ignore_index,
                      label_smoothing, z_loss, softcap, chunk_size):
    """This rank's argument checks, before any collective: the single-device
    coercion, then the op's own checker (fusedloss::linear_ce_check) on the
    shard. Returns the int64 target."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"{fn}: vocab_start must be a non-negative int, got {vocab_start!r}")
    if num_classes is not None:
        _common.check_optional_positive_int(num_classes, "num_classes")
    _common.check_optional_positive_int(chunk_size, "chunk_size")
    softcap = _common.check_finite(softcap, "softcap", positive=True, allow_none=True)
    target = _linear_ce._coerce_operands(fn, input, weight_shard, target, bias_shard)
    # Without num_classes the shard layout (checked across ranks next) fixes
    # it; until then targets are only checked to be non-negative.
    _ops.linear_ce_check(_common.as_rows(input), weight_shard, target.reshape(-1), bias_shard,
                         int(ignore_index), _common.check_finite(label_smoothing, "label_smoothing"),
                         _common.check_finite(z_loss, "z_loss"), softcap or 0.0, vocab_start,
                         num_classes if num_classes is not None else _UNKNOWN_NUM_CLASSES)
    return target


# Stands for "not given yet" in linear_ce_check: bounds no shard and no target.
_UNKNOWN_NUM_CLASSES = 2 ** 62


def _check_shard_layout(fn, gathered, num_classes, world):
    """gathered[r] = [vocab_start, V_local, num_classes or -1] of rank r. The
    shards must tile [0, num_classes) exactly. Returns num_classes."""
    _require_equal(fn, gathered, 2, "num_classes (None counts as -1)")
    total = sum(g[1] for g in gathered)
    if num_classes is None:
        num_classes = total
    for r, (start, size, _) in enumerate(gathered):
        if start + size > num_classes:
            raise ValueError(f"fusedloss.distributed.{fn}: rank {r}'s weight shard covers classes "
                             f"[{start}, {start + size}), outside [0, num_classes={num_classes}) "
                             "(vocab_start out of range)")
    if total != num_classes:
        raise ValueError(f"fusedloss.distributed.{fn}: the weight shards do not tile [0, num_classes={num_classes}): "
                         f"the {world} shards have {total} rows in all (sizes {[g[1] for g in gathered]}; was "
                         "num_classes computed for another world size?)")
    end = 0
    for start, size, r in sorted((g[0], g[1], r) for r, g in enumerate(gathered)):
        if start != end:
            what = "overlaps the previous shard" if start < end else f"leaves classes [{end}, {start}) uncovered"
            raise ValueError(f"fusedloss.distributed.{fn}: the weight shards do not tile [0, {num_classes}): rank "
                             f"{r}'s shard [{start}, {start + size}) {what} (vocab_start / shard sizes per rank: "
                             f"{[(g[0], g[1]) for g in gathered]})")
        end = start + size
    return num_classes


def linear_cross_entropy(input, weight_shard, target, bias_shard=None, *, vocab_start, num_classes=None, group=None,
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                         chunk_size=None):
    """Vocabulary-parallel :func:`fusedloss.linear_cross_entropy`.

    Args:
        input: [..., D] hidden states, identical on every rank of ``group``.
        weight_shard: [V_local, D], rows ``[vocab_start, vocab_start + V_local)``
            of the [num_classes, D] classifier. The ranks' shards must tile
            [0, num_classes) (any order of ranks, any sizes).
        target: [...] class indices in [0, num_classes) or ``ignore_index``,
            identical on every rank.
        bias_shard: optional [V_local], the matching slice of the bias.
        vocab_start: index of this shard's first class.
        num_classes: the full vocabulary size; defaults to the sum of the shard
            sizes (checked either way).
        ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size:
            as in :func:`fusedloss.linear_cross_entropy` (label smoothing is
            over all num_classes classes).

    Returns the global loss, the same on every rank. The input gradient is the
    full one on every rank (all-reduced); ``weight_shard`` / ``bias_shard`` get
    their rows of the full gradient. Always uses the chunk-recompute
    algorithm (forward, then backward recomputing each chunk).
    """
    fn = "linear_cross_entropy"
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")

    def local_check():
        nonlocal target
        _common.check_reduction(reduction)
        target = _check_shard_args(fn, input, weight_shard, target, bias_shard, vocab_start, num_classes,
                                   ignore_index, label_smoothing, z_loss, softcap, chunk_size)
        return [target.numel(), input.shape[-1], vocab_start, weight_shard.shape[0],
                -1 if num_classes is None else num_classes, int(bias_shard is not None)]

    _, world, gathered = _validated(fn, group, device, local_check, 6)
    _require_equal(fn, gathered, 0, "the number of input rows (input and target are replicated)")
    _require_equal(fn, gathered, 1, "the feature size D")
    _require_equal(fn, gathered, 5, "whether a bias is given")
    checked_range = num_classes is not None and not target.is_cuda
    num_classes = _check_shard_layout(fn, [g[2:5] for g in gathered], num_classes, world)

    input, weight_shard, bias_shard = _common.autocast_inputs(input.device.type, input, weight_shard, bias_shard)
    flat_input = _common.as_rows(input)
    flat_target = target.reshape(-1)
    if not checked_range:  # replicated targets: every rank raises alike
        _common.check_index_range(flat_target, num_classes, "target", ignore_index)
    loss = _VocabParallelLinearCE.apply(flat_input, weight_shard, bias_shard, flat_target, vocab_start, num_classes,
                                        group, int(ignore_index), float(label_smoothing), float(z_loss),
                                        float(softcap or 0.0), int(chunk_size or 0))
    return _common.reduce_rows(loss, flat_target != ignore_index, reduction, target.shape)


# ---------------------------------------------------------------------------
# Sampled softmax / NCE with a vocabulary-sharded weight


class _OwnedRows(torch.autograd.Function):
    """Rows ``classes`` of the sharded table, assembled on every rank: the owner
    of each row contributes it, an all-reduce sums. The loss built from them is
    replicated, so each rank's gradient of the assembled rows is already the
    full one: the backward keeps the owned rows' share, with no collective."""

    @staticmethod
    def forward(ctx, shard, classes, vocab_start, group):
        local = classes - vocab_start
        # Masks and clamped indices rather than boolean indexing: no host sync.
        owned = ((local >= 0) & (local < shard.shape[0])).view(-1, *([1] * (shard.dim() - 1)))
        local = local.clamp(0, shard.shape[0] - 1)
        out = torch.where(owned, shard.index_select(0, local), torch.zeros((), dtype=shard.dtype,
                                                                           device=shard.device))
        dist.all_reduce(out, group=group)
        ctx.save_for_backward(local, owned)
        ctx.shard_shape = shard.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        local, owned = ctx.saved_tensors
        grad_shard = grad.new_zeros(ctx.shard_shape).index_add_(0, local, grad * owned)
        return grad_shard, None, None, None


def _broadcast_from_first(tensors, group):
    src = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
    out = []
    for t in tensors:
        t = t.contiguous()
        dist.broadcast(t, src=src, group=group)
        out.append(t)
    return out


def _sharded_sampled(fn, mode, input, weight_shard, target, num_sampled, bias_shard, vocab_start, num_classes, group,
                     sampler, unique, sampled_values, remove_accidental_hits, subtract_log_q, label_smoothing,
                     reduction, generator, chunk_size):
    device = input.device if isinstance(input, torch.Tensor) else torch.device("cpu")
    true_classes = None

    def local_check():
        nonlocal true_classes
        _common.check_reduction(reduction)
        if not isinstance(input, torch.Tensor) or input.dim() != 2:
            raise ValueError(f"{fn}: input must be [N, D]")
        true_classes = _sampled._true_classes(target, input.shape[0])
        # The shard checks of the linear CE apply unchanged (per-row targets only).
        _check_shard_args(fn, input, weight_shard, true_classes[:, 0], bias_shard, vocab_start, num_classes,
                          -1, label_smoothing, 0.0, None, chunk_size)
        if sampled_values is not None:
            _sampled._check_sampled_values(sampled_values, true_classes, input.shape[0], input.device)
        return [*input.shape, vocab_start, weight_shard.shape[0], -1 if num_classes is None else num_classes,
                int(bias_shard is not None), true_classes.shape[1],
                -1 if sampled_values is not None or num_sampled is None else int(num_sampled)]

    _, world, gathered = _validated(fn, group, device, local_check, 8)
    _require_equal(fn, gathered, 0, "the number of input rows (input and target are replicated)")
    _require_equal(fn, gathered, 1, "the feature size D")
    _require_equal(fn, gathered, 5, "whether a bias is given")
    _require_equal(fn, gathered, 6, "num_true")
    _require_equal(fn, gathered, 7, "num_sampled")
    num_classes = _check_shard_layout(fn, [g[2:5] for g in gathered], num_classes, world)
    _common.check_index_range(true_classes, num_classes, "target")

    hit_mask = None
    if sampled_values is None:
        if sampler == "in_batch":
            sampled_values = _sampled.in_batch_candidates(true_classes)
            hit_mask = _sampled.HIT_ALL_COPIES
        else:
            if num_sampled is None:
                raise ValueError(f"{fn}: num_sampled is required unless sampled_values or sampler='in_batch' "
                                 "is given")
            drawn = _sampled._make_sampler(sampler, num_classes).sample(true_classes, num_sampled, unique=unique,
                                                                        generator=generator)
            # One draw for the whole group, whatever each rank's generator state.
            sampled_values = _broadcast_from_first(drawn, group)
    sampled, true_count, sampled_count = _sampled._check_sampled_values(sampled_values, true_classes,
                                                                        input.shape[0], input.device)
    _common.check_index_range(sampled, num_classes, "sampled candidates")

    # Compact the U distinct classes the loss touches (true and candidates) to
    # 0..U-1; equal ids stay equal, so accidental-hit masking is unchanged.
    classes, inverse = torch.unique(torch.cat([true_classes.reshape(-1), sampled.reshape(-1)]),
                                    return_inverse=True)
    split = true_classes.numel()
    compact_true = inverse[:split].view(true_classes.shape)
    compact_sampled = inverse[split:].view(sampled.shape)
    rows = _OwnedRows.apply(weight_shard, classes, vocab_start, group)
    bias = None if bias_shard is None else _OwnedRows.apply(bias_shard, classes, vocab_start, group)
    return _sampled._sampled_loss(
        mode, input, rows, compact_true, None, bias, classes.shape[0], sampler, unique,
        (compact_sampled, true_count, sampled_count), remove_accidental_hits, subtract_log_q, label_smoothing,
        reduction, None, False, chunk_size, hit_mask=hit_mask)


def sampled_softmax_loss(input, weight_shard, target, num_sampled, bias_shard=None, *, vocab_start, num_classes=None,
                         group=None, sampler="log_uniform", unique=True, sampled_values=None,
                         remove_accidental_hits=True, subtract_log_q=True, label_smoothing=0.0, reduction="mean",
                         generator=None, chunk_size=None):
    """:func:`fusedloss.sampled_softmax_loss` with the ``[num_classes, D]``
    weight (and bias) sharded by rows as in :func:`linear_cross_entropy`
    (``input`` and ``target`` replicated on every rank, shards tiling
    [0, num_classes)). Candidates are drawn once, on group rank 0, and
    broadcast (``sampled_values``, if given, must be the same on every rank).
    Every rank returns the same loss and the full input gradient;
    ``weight_shard`` / ``bias_shard`` get the gradient of their own rows.
    Dense gradients only (no ``sparse_grad``)."""
    return _sharded_sampled("sampled_softmax_loss", _sampled.SOFTMAX, input, weight_shard, target, num_sampled,
                            bias_shard, vocab_start, num_classes, group, sampler, unique, sampled_values,
                            remove_accidental_hits, subtract_log_q, label_smoothing, reduction, generator, chunk_size)


def nce_loss(input, weight_shard, target, num_sampled, bias_shard=None, *, vocab_start, num_classes=None, group=None,
             sampler="log_uniform", unique=True, sampled_values=None, remove_accidental_hits=False,
             subtract_log_q=True, reduction="mean", generator=None, chunk_size=None):
    """:func:`fusedloss.nce_loss` with a vocabulary-sharded weight; see
    :func:`sampled_softmax_loss` of this module."""
    return _sharded_sampled("nce_loss", _sampled.NCE, input, weight_shard, target, num_sampled, bias_shard,
                            vocab_start, num_classes, group, sampler, unique, sampled_values, remove_accidental_hits,
                            subtract_log_q, 0.0, reduction, generator, chunk_size)
