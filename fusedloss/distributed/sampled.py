"""Sampled softmax / NCE with a vocabulary-sharded weight, each rank scoring
only the classes it owns: see the package docstring and docs/distributed.md."""
import torch
import torch.distributed as dist

from .. import _common, _ops, _validate
from .. import sampled as _sampled
from ..sampled import HIT_NONE, NCE, SOFTMAX, SampledOptions
from ._collectives import (broadcast_from_first, check_shard_layout, copy_to_group, own_rows, sum_over_group,
                           validated)
from .linear_ce import _BIAS, _FEATURES, _ROWS, _check_shard_args

_INF = float("inf")


def _owned_columns(shard_rows, vocab_start, true_classes, sampled, true_log_q, sampled_log_q, hit_mask):
    """This rank's share of every row's columns, as arguments of the
    single-device sampled op on the local shard: ``(true_ids, candidate_ids,
    true_log_q, candidate_log_q, hit_mask)`` with local row ids.

    A column this rank does not own keeps a valid (clamped) id and gets
    log Q = +inf: its logit is -inf, which the op treats exactly as a masked
    column (no logit, not counted, zero gradient). Shared candidates are
    compacted to the owned ones (a host sync in eager mode), so a rank scores
    only those.

    Accidental hits: a candidate equal to one of the row's true classes has
    the owner of that class, so the op's own hit test (which compares ids)
    stays exact if the id standing in for another rank's true class is no
    owned candidate's: a shard row no candidate uses, which exists when there
    are fewer candidates than shard rows. Otherwise (tiny shards) the
    candidates go row by row and the hits are masked through log Q instead."""
    local_true = true_classes - vocab_start
    owned_true = (local_true >= 0) & (local_true < shard_rows)
    true_log_q = torch.where(owned_true, true_log_q, _INF)
    local = sampled - vocab_start
    owned = (local >= 0) & (local < shard_rows)
    if sampled.dim() == 1:
        # Fewer candidates than shard rows (a static test, also under torch.compile): some row is no candidate.
        stand_in_exists = hit_mask == HIT_NONE or sampled.numel() < shard_rows
        keep = owned.nonzero().squeeze(1)
        local, sampled, sampled_log_q = local[keep], sampled[keep], sampled_log_q[keep]
        if stand_in_exists:
            if hit_mask == HIT_NONE:
                stand_in = torch.zeros((), dtype=local.dtype, device=local.device)
            else:  # the first shard row no owned candidate uses
                used = torch.zeros(shard_rows, dtype=torch.uint8, device=local.device).index_fill_(0, local, 1)
                stand_in = used.argmin()
            return torch.where(owned_true, local_true, stand_in), local, true_log_q, sampled_log_q, hit_mask
        rows = true_classes.shape[0]
        local, sampled = local.expand(rows, -1), sampled.expand(rows, -1)
        sampled_log_q, owned = sampled_log_q.expand(rows, -1), owned[keep].expand(rows, -1)
    dead = ~owned
    if hit_mask != HIT_NONE:
        dead = dead | (sampled.unsqueeze(2) == true_classes.unsqueeze(1)).any(2)
    return (torch.where(owned_true, local_true, 0), local.clamp(0, shard_rows - 1), true_log_q,
            torch.where(dead, _INF, sampled_log_q), HIT_NONE)


def _owned_true_logit_sum(input, weight, bias, vocab_start, true_classes, true_log_q):
    """Per row, the sum of the true logits this rank owns (0 elsewhere), in the
    accumulation dtype, from [N, num_true, D] rows of the local shard."""
    local = true_classes - vocab_start
    owned = (local >= 0) & (local < weight.shape[0])
    local = local.clamp(0, weight.shape[0] - 1)
    acc = _common.acc_dtype(input.dtype)
    rows = weight.index_select(0, local.reshape(-1)).view(*local.shape, -1).to(acc)
    logits = torch.bmm(rows, input.to(acc).unsqueeze(2)).squeeze(2)
    if bias is not None:
        logits = logits + bias.to(acc)[local]
    return torch.where(owned, logits - true_log_q, 0).sum(1)


class _OwnerSampledSoftmax(torch.autograd.Function):
    """Per-row sampled softmax losses, each rank scoring its own columns.

    The local op runs with label_smoothing=1, where its loss is
    lse_r - (sum of live logits) / count_r: with its statistics (lse_r as
    (max, log-sum), count_r) that yields the sum of this rank's live logits.
    One MAX and one SUM all-reduce of [N] and [4, N] combine the ranks (lse,
    column count M, sum of logits S, sum of true logits T, the last from the
    owners' rows): loss = lse - (1 - eps) / num_true * T - eps * S / M. The
    backward is the local op's against the global statistics (lse, M): every
    live column of this rank gets its exact share of the full gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias, columns, vocab_start, true_classes, label_smoothing, chunk_size, group):
        true_ids, candidates, true_log_q, candidate_log_q, hit_mask = columns
        loss, (local_max, local_log_sum, count) = _ops.ops.sampled_forward(
            input, weight, bias, true_ids, candidates, true_log_q, candidate_log_q, SOFTMAX, hit_mask, 1.0, 1.0,
            chunk_size, False)
        sum_logits = torch.where(count > 0, (local_max + local_log_sum - loss) * count, 0)
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # A rank with no live column in a row has max = -inf: exp(-inf) = 0.
        stats = torch.stack([torch.exp(local_max - global_max + local_log_sum), count, sum_logits,
                             _owned_true_logit_sum(input, weight, bias, vocab_start, true_classes, true_log_q)])
        dist.all_reduce(stats, group=group)
        lse_parts = torch.stack([global_max, torch.log(stats[0])])
        out = lse_parts.sum(0) - (1.0 - label_smoothing) / true_classes.shape[1] * stats[3]
        if label_smoothing > 0:
            out = out - label_smoothing * stats[2] / stats[1]
        ctx.save_for_backward(input, weight, bias, true_ids, candidates, true_log_q, candidate_log_q,
                              torch.cat([lse_parts, stats[1:2]]))
        ctx.options = (hit_mask, label_smoothing, chunk_size)
        return out

    @staticmethod
    def backward(ctx, grad_loss):
        _ops.forbid_double_backward("distributed.sampled_softmax_loss", grad_loss)
        *tensors, global_stats = ctx.saved_tensors
        hit_mask, label_smoothing, chunk_size = ctx.options
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], tensors[2] is not None and ctx.needs_input_grad[2]]
        grads = _ops.ops.sampled_backward(grad_loss.contiguous(), *tensors, global_stats, SOFTMAX, hit_mask,
                                          label_smoothing, 1.0, chunk_size, False, mask)
        return (*(g if wanted else None for g, wanted in zip(grads, mask)), *([None] * 6))


def _owner_scored_rows(options, hit_mask, input, weight_shard, bias_shard, vocab_start, true_classes, sampled,
                       true_count, sampled_count, group):
    """Per-row losses of the whole (replicated) batch, the same on every rank;
    ``input`` must already route its gradient (all-reduce or reduce-scatter)."""
    acc = _common.acc_dtype(input.dtype)
    if options.subtract_log_q:
        _sampled._check_log_q_counts(true_count, sampled_count)
        true_log_q = torch.log(true_count.detach().to(acc))
        sampled_log_q = torch.log(sampled_count.detach().to(acc))
    else:
        true_log_q = torch.zeros(true_classes.shape, dtype=acc, device=input.device)
        sampled_log_q = torch.zeros(sampled.shape, dtype=acc, device=input.device)
    columns = _owned_columns(weight_shard.shape[0], vocab_start, true_classes, sampled, true_log_q, sampled_log_q,
                             hit_mask)
    chunk_size = int(options.chunk_size or 0)
    if options.mode == NCE:
        # NCE's row loss is a sum over columns: the ranks' partial sums add up.
        true_ids, candidates, true_lq, candidate_lq, op_hit_mask = columns
        partial, _ = _ops.ops.sampled_forward(input, weight_shard, bias_shard, true_ids, candidates, true_lq,
                                              candidate_lq, NCE, op_hit_mask, 0.0, float(options.true_label),
                                              chunk_size, False)
        return sum_over_group(partial, group)
    return _OwnerSampledSoftmax.apply(input, weight_shard, bias_shard, columns, vocab_start, true_classes,
                                      float(options.label_smoothing), chunk_size, group)


def _sharded_sampled(options, *, input, weight_shard, target, bias_shard, vocab_start, group, sampled_values,
                     generator, own_rank=None):
    """The driver of the sharded sampled losses: cross-rank checks, one draw
    for the group, then each rank scores the columns it owns. ``own_rank``
    (data parallel over an all-gathered batch, see ``dtensor``): the loss is
    over that rank's rows of the batch, and the input gradient is left to the
    gather's reduce-scatter."""
    fn = options.fn
    true_classes = None

    def local_check():
        nonlocal true_classes
        _validate.check_reduction(options.reduction)
        if not isinstance(input, torch.Tensor) or input.dim() != 2:
            raise ValueError(f"{fn}: input must be [N, D]")
        true_classes = _sampled._true_classes(target, input.shape[0])
        # The shard checks of the linear CE apply unchanged (per-row targets only).
        _check_shard_args(fn, input, weight_shard, true_classes[:, 0], bias_shard, vocab_start, options.num_classes,
                          -1, options.label_smoothing, 0.0, None, options.chunk_size)
        if sampled_values is not None:
            _sampled._check_sampled_values(sampled_values, true_classes, input.shape[0], input.device)
        return [*input.shape, vocab_start, weight_shard.shape[0],
                -1 if options.num_classes is None else options.num_classes, int(bias_shard is not None),
                true_classes.shape[1],
                -1 if sampled_values is not None or options.num_sampled is None else int(options.num_sampled)]

    # [rows, D, vocab_start, V_local, num_classes, bias, num_true, num_sampled]; the shard layout is checked next.
    _, world, gathered = validated(fn, group, input, local_check,
                                   (_ROWS, _FEATURES, None, None, None, _BIAS, "num_true", "num_sampled"))
    num_classes = check_shard_layout(fn, gathered and [g[2:5] for g in gathered], options.num_classes, world)
    _validate.check_index_range(true_classes, num_classes, "target")

    hit_mask = options.hit_mask
    if sampled_values is None:
        # One draw for the whole group, whatever each rank's generator state.
        sampled_values, hit_mask = _sampled._candidates(options, true_classes, num_classes, generator, f"{fn}: ",
                                                        share=lambda drawn: broadcast_from_first(drawn, group))
    sampled, true_count, sampled_count = _sampled._check_sampled_values(sampled_values, true_classes,
                                                                        input.shape[0], input.device)
    _validate.check_index_range(sampled, num_classes, "sampled candidates")
    input, weight_shard, bias_shard = _common.autocast_inputs(input.device.type, input, weight_shard, bias_shard)
    if own_rank is None:
        input = copy_to_group(input, group)
    loss = _owner_scored_rows(options, hit_mask, input, weight_shard, bias_shard, vocab_start, true_classes, sampled,
                              true_count, sampled_count, group)
    if own_rank is not None:
        loss = own_rows(loss, own_rank, group)
    return _common.reduce_rows(loss, None, options.reduction, loss.shape)


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
    options = SampledOptions.native(
        SOFTMAX, num_sampled=num_sampled, num_classes=num_classes, sampler=sampler, unique=unique,
        remove_accidental_hits=remove_accidental_hits, subtract_log_q=subtract_log_q, label_smoothing=label_smoothing,
        reduction=reduction, chunk_size=chunk_size)
    return _sharded_sampled(options, input=input, weight_shard=weight_shard, target=target, bias_shard=bias_shard,
                            vocab_start=vocab_start, group=group, sampled_values=sampled_values, generator=generator)


def nce_loss(input, weight_shard, target, num_sampled, bias_shard=None, *, vocab_start, num_classes=None, group=None,
             sampler="log_uniform", unique=True, sampled_values=None, remove_accidental_hits=False,
             subtract_log_q=True, reduction="mean", generator=None, chunk_size=None):
    """:func:`fusedloss.nce_loss` with a vocabulary-sharded weight; see
    :func:`sampled_softmax_loss` of this module."""
    options = SampledOptions.native(
        NCE, num_sampled=num_sampled, num_classes=num_classes, sampler=sampler, unique=unique,
        remove_accidental_hits=remove_accidental_hits, subtract_log_q=subtract_log_q, reduction=reduction,
        chunk_size=chunk_size)
    return _sharded_sampled(options, input=input, weight_shard=weight_shard, target=target, bias_shard=bias_shard,
                            vocab_start=vocab_start, group=group, sampled_values=sampled_values, generator=generator)
