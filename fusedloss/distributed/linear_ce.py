"""Vocabulary-parallel (Megatron-style) linear cross-entropy: see the package
docstring and docs/distributed.md."""
import torch
import torch.distributed as dist

from .. import _common, _ops, _validate
from .. import linear_ce as _linear_ce
from ._collectives import check_shard_layout, copy_to_group, own_rows, validated

# Stands for "not given yet" in linear_ce_check: bounds no shard and no target.
_UNKNOWN_NUM_CLASSES = 2 ** 62

# What must be equal across ranks for a vocabulary-sharded loss (see validated).
_ROWS = "the number of input rows (input and target are replicated)"
_FEATURES = "the feature size D"
_BIAS = "whether a bias is given"
_CLASS_WEIGHT = "the length of class_weight (-1: none)"


class _VocabParallelLinearCE(torch.autograd.Function):
    """Per-row losses of the vocabulary-parallel linear cross-entropy and, with
    stats, the rows' lse, argmax and entropy (not differentiable)."""

    @staticmethod
    def forward(ctx, input, weight, bias, class_weight, target, vocab_start, num_classes, group, ignore_index,
                label_smoothing, z_loss, softcap, chunk_size, stats):
        (local_max, local_log_sum), target_logit, sum_logits, local_argmax, local_shifted = (
            _ops.ops.linear_ce_shard_forward(input, weight, target, bias, class_weight, ignore_index, softcap,
                                             vocab_start, num_classes, chunk_size, stats))
        # Global lse = M + log(sum_r exp(max_r - M + log_sum_r)) with M the
        # global max, kept as its two parts (M, log-sum) like the kernels' (see
        # LseParts in numerics.h); the target logit is 0 on every shard but its
        # owner, so a sum picks it. With stats, the entropy term of each shard
        # is rescaled to M like the sums (SoftmaxStats in numerics.h).
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        shift = local_max - global_max
        terms = [torch.exp(shift + local_log_sum), target_logit, sum_logits]
        if stats:
            terms.append(torch.exp(shift) * (local_shifted + shift * torch.exp(local_log_sum)))
        totals = torch.stack(terms)
        dist.all_reduce(totals, group=group)
        lse_parts = torch.stack([global_max, torch.log(totals[0])])
        lse = lse_parts.sum(0)
        valid = target != ignore_index
        target_weight, total_weight = 1.0, float(num_classes)
        if class_weight is not None:
            class_weight = class_weight.to(lse.dtype)
            target_weight = _linear_ce._target_weights(class_weight, target, valid)
            total_weight = class_weight.sum()
        # The row formula of CrossEntropyTerms::row_loss (numerics.h).
        loss = target_weight * ((1.0 - label_smoothing) * (lse - totals[1]) + z_loss * lse * lse)
        if label_smoothing > 0:  # skipped at 0: a -inf column would make 0 * -inf = NaN
            loss = loss + label_smoothing / num_classes * (total_weight * lse - totals[2])
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        ctx.save_for_backward(input, weight, bias, class_weight, target, lse_parts)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
        ctx.shard = (vocab_start, num_classes, group)
        if not stats:
            return loss
        # The first column holding the global max: the lowest index among the
        # shards whose max is the global one.
        candidate = torch.where(local_max == global_max, local_argmax, torch.iinfo(torch.int64).max)
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
        entropy = lse_parts[1] - totals[3] / totals[0]
        ctx.mark_non_differentiable(lse, candidate, entropy)
        return loss, lse, candidate, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_grad_statistics):
        _ops.forbid_double_backward("distributed.linear_cross_entropy", grad_loss)
        input, weight, bias, class_weight, target, lse = ctx.saved_tensors
        vocab_start, num_classes, group = ctx.shard
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = _ops.ops.linear_ce_backward(
            grad_loss.contiguous(), input, weight, target, bias, class_weight, lse, *ctx.options, mask, vocab_start,
            num_classes)
        # grad_input is this shard's part, dlogits_shard @ W_shard: the caller's
        # wrapper of the input sums the parts (copy_to_group or gather).
        return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
                grad_bias if mask[2] else None, *([None] * 11))


def _check_shard_args(fn, input, weight_shard, target, bias_shard, vocab_start, num_classes, ignore_index,
                      label_smoothing, z_loss, softcap, chunk_size, class_weight=None):
    """This rank's argument checks, before any collective: the single-device
    coercion, then the op's own checker (fusedloss::linear_ce_check) on the
    shard. Returns the int64 target. Shared with the sharded sampled losses.
    Without num_classes, class_weight's length stands for it here (the shard
    layout checks it next)."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"{fn}: vocab_start must be a non-negative int, got {vocab_start!r}")
    _validate.check_optional_positive_int(num_classes, "num_classes")
    _validate.check_optional_positive_int(chunk_size, "chunk_size")
    softcap = _validate.check_finite(softcap, "softcap", positive=True, allow_none=True)
    target = _linear_ce._coerce_operands(fn, input, weight_shard, target, bias_shard, class_weight)
    if torch.compiler.is_compiling():  # the checker has no fake kernel; the op checks shapes itself
        return target
    if num_classes is None and class_weight is not None and class_weight.dim() == 1:
        num_classes = class_weight.shape[0]
    # Without num_classes the shard layout (checked across ranks next) fixes
    # it; until then targets are only checked to be non-negative.
    _ops.ops.linear_ce_check(_common.as_rows(input), weight_shard, target.reshape(-1), bias_shard, class_weight,
                             int(ignore_index), _validate.check_finite(label_smoothing, "label_smoothing"),
                             _validate.check_finite(z_loss, "z_loss"), softcap or 0.0, vocab_start,
                             num_classes if num_classes is not None else _UNKNOWN_NUM_CLASSES)
    return target


def linear_cross_entropy(input, weight_shard, target, bias_shard=None, *, vocab_start, num_classes=None, group=None,
                         ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                         class_weight=None, normalizer=None, return_stats=False, chunk_size=None):
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
        class_weight: optional [num_classes] class weights, the whole
            vocabulary's (not a shard), identical on every rank.
        ignore_index, label_smoothing, z_loss, softcap, reduction, normalizer,
        return_stats, chunk_size: as in :func:`fusedloss.linear_cross_entropy`
            (label smoothing is over all num_classes classes; the statistics
            are the full vocabulary's, the same on every rank).

    Returns the global loss, the same on every rank (a
    :class:`fusedloss.LinearCEOutput` with ``return_stats=True``). The input
    gradient is the full one on every rank (all-reduced); ``weight_shard`` /
    ``bias_shard`` get their rows of the full gradient. Always uses the
    chunk-recompute algorithm (forward, then backward recomputing each chunk).
    """
    return _linear_cross_entropy(input, weight_shard, target, bias_shard, vocab_start=vocab_start,
                                 num_classes=num_classes, group=group, ignore_index=ignore_index,
                                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
                                 class_weight=class_weight, normalizer=normalizer, return_stats=return_stats,
                                 chunk_size=chunk_size)


def _linear_cross_entropy(input, weight_shard, target, bias_shard, *, vocab_start, num_classes, group, ignore_index,
                          label_smoothing, z_loss, softcap, reduction, class_weight, normalizer, return_stats,
                          chunk_size, own_rank=None):
    """:func:`linear_cross_entropy`; with ``own_rank`` (data parallel over an
    all-gathered batch, see ``dtensor``) the loss is over that rank's rows and
    the input gradient is left to the gather's reduce-scatter."""
    fn = "linear_cross_entropy"

    def local_check():
        nonlocal target, normalizer
        _validate.check_reduction(reduction)
        normalizer = _validate.check_normalizer(normalizer, reduction, fn)
        target = _check_shard_args(fn, input, weight_shard, target, bias_shard, vocab_start, num_classes,
                                   ignore_index, label_smoothing, z_loss, softcap, chunk_size, class_weight)
        return [target.numel(), input.shape[-1], vocab_start, weight_shard.shape[0],
                -1 if num_classes is None else num_classes, int(bias_shard is not None),
                -1 if class_weight is None else class_weight.shape[0]]

    # [rows, D, vocab_start, V_local, num_classes, bias, class weights]; the shard layout is checked next.
    _, world, gathered = validated(fn, group, input, local_check,
                                   (_ROWS, _FEATURES, None, None, None, _BIAS, _CLASS_WEIGHT))
    checked_range = num_classes is not None and not target.is_cuda
    num_classes = check_shard_layout(fn, gathered and [g[2:5] for g in gathered], num_classes, world)
    if class_weight is not None and class_weight.shape[0] != num_classes:
        raise ValueError(f"{fn}: class_weight must be [num_classes]=[{num_classes}], got {tuple(class_weight.shape)}")

    input, weight_shard, bias_shard = _common.autocast_inputs(input.device.type, input, weight_shard, bias_shard)
    flat_input = _common.as_rows(input)
    flat_target = target.reshape(-1)
    if not checked_range:  # replicated targets: every rank raises alike
        _validate.check_index_range(flat_target, num_classes, "target", ignore_index)
    if own_rank is None:
        flat_input = copy_to_group(flat_input, group)
    out = _VocabParallelLinearCE.apply(flat_input, weight_shard, bias_shard, class_weight, flat_target, vocab_start,
                                       num_classes, group, int(ignore_index), float(label_smoothing), float(z_loss),
                                       float(softcap or 0.0), int(chunk_size or 0), bool(return_stats))
    row_losses, *stats = out if return_stats else (out,)
    shape = target.shape
    if own_rank is not None:
        row_losses = own_rows(row_losses, own_rank, group)
        flat_target = flat_target.view(world, -1)[own_rank]
        stats = [s.view(world, -1)[own_rank] for s in stats]
        shape = (flat_target.numel(),)
    valid = flat_target != ignore_index
    denominator = _linear_ce._denominator(reduction, valid, flat_target, class_weight, normalizer)
    loss = _linear_ce._reduce(row_losses, reduction, denominator, shape)
    return _linear_ce._with_stats(loss, valid, shape, *stats) if return_stats else loss
