"""Sampled softmax / NCE with a vocabulary-sharded weight: see the package
docstring and docs/distributed.md."""
import dataclasses

import torch

from .. import _validate
from .. import sampled as _sampled
from ..sampled import NCE, SOFTMAX, SampledOptions
from ._collectives import broadcast_from_first, check_shard_layout, owned_rows, validated
from .linear_ce import _BIAS, _FEATURES, _ROWS, _check_shard_args


def _sharded_sampled(options, *, input, weight_shard, target, bias_shard, vocab_start, group, sampled_values,
                     generator):
    """The driver of the sharded sampled losses: cross-rank checks, one draw
    for the group, the touched weight rows assembled from their owners, then
    the single-device driver on them."""
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
    num_classes = check_shard_layout(fn, [g[2:5] for g in gathered], options.num_classes, world)
    _validate.check_index_range(true_classes, num_classes, "target")

    hit_mask = options.hit_mask
    if sampled_values is None:
        # One draw for the whole group, whatever each rank's generator state.
        sampled_values, hit_mask = _sampled._candidates(options, true_classes, num_classes, generator, f"{fn}: ",
                                                        share=lambda drawn: broadcast_from_first(drawn, group))
    sampled, true_count, sampled_count = _sampled._check_sampled_values(sampled_values, true_classes,
                                                                        input.shape[0], input.device)
    _validate.check_index_range(sampled, num_classes, "sampled candidates")

    # Compact the U distinct classes the loss touches (true and candidates) to
    # 0..U-1; equal ids stay equal, so accidental-hit masking is unchanged.
    classes, inverse = torch.unique(torch.cat([true_classes.reshape(-1), sampled.reshape(-1)]),
                                    return_inverse=True)
    split = true_classes.numel()
    compact_true = inverse[:split].view(true_classes.shape)
    compact_sampled = inverse[split:].view(sampled.shape)
    rows = owned_rows(weight_shard, classes, vocab_start, group)
    bias = None if bias_shard is None else owned_rows(bias_shard, classes, vocab_start, group)
    return _sampled._sampled_loss(dataclasses.replace(options, num_classes=classes.shape[0], hit_mask=hit_mask),
                                  input=input, weight=rows, target=compact_true, bias=bias,
                                  sampled_values=(compact_sampled, true_count, sampled_count))


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
