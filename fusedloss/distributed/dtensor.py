"""DTensor weights in the single-device entry points (``fusedloss.linear_cross_entropy``,
``sampled_softmax_loss``, ``nce_loss``), which call here when the weight or
bias is a DTensor: see docs/distributed.md.

- ``Replicate()`` on a 1-D mesh: the local tensor is the whole weight; the
  single-device loss runs on it (its gradient lands as a Replicate DTensor).
- ``Shard(0)`` on a 1-D mesh (FSDP2's sharded parameters, e.g. an LM head whose
  own forward is skipped by a fused loss) with plain-tensor inputs: data
  parallel. Each rank's loss is over its own rows; the weight gradient is
  FSDP's, the mean over ranks of each rank's gradient, as a Shard(0) DTensor.
  The weight is never gathered: the hidden states and targets are
  all-gathered, the vocabulary-parallel pass runs over the whole batch with
  this rank's rows of the weight, and the backward reduce-scatters the input
  gradient to each rank's rows.
"""
import dataclasses

import torch

from .. import _common
from .. import linear_ce as _linear_ce
from .. import sampled as _sampled
from ._collectives import all_gather_rows, gather, scale_grad, validated
from .linear_ce import _FEATURES, _linear_cross_entropy
from .sampled import _sharded_sampled

_LOCAL_ROWS = "the number of rows (data parallel with a Shard(0) weight: every rank passes as many)"


def _layout(fn, weight, bias, plain):
    """'replicate' or 'shard' and the mesh, or a clear error. ``plain``: the
    other (name, value) arguments, which must not be DTensors."""
    from torch.distributed.tensor import DTensor

    for name, value in plain:
        if isinstance(value, DTensor):
            raise ValueError(f"{fn}: {name} is a DTensor; with a DTensor weight, pass this rank's own rows as a plain "
                             "tensor (data parallel)")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and not isinstance(value, DTensor):
            raise TypeError(f"{fn}: weight and bias must both be DTensors (same mesh and placement) or neither; "
                            f"{name} is a {type(value).__name__}")
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if mesh.ndim != 1:
        raise ValueError(f"{fn}: a DTensor weight must live on a 1-D device mesh, got a {mesh.ndim}-D mesh of shape "
                         f"{tuple(mesh.shape)}")
    if bias is not None and (bias.device_mesh != mesh or tuple(bias.placements) != placements):
        raise ValueError(f"{fn}: bias must be on the weight's mesh with its placement {placements}, got "
                         f"{tuple(bias.placements)}")
    if placements[0].is_replicate():
        return "replicate", mesh
    if placements[0].is_shard(0):
        return "shard", mesh
    raise ValueError(f"{fn}: a DTensor weight must be Replicate() or Shard(0) (rows, as FSDP2 shards), got "
                     f"{placements[0]}")


def _local(t):
    return None if t is None else t.to_local()


class _DataParallel:
    """A Shard(0) weight's group, this rank's shard and its first class.
    The shard's gradient is scaled by 1 / world size: the pass yields the sum
    over ranks of each rank's loss gradient, FSDP averages."""

    def __init__(self, weight, bias, mesh):
        self.group = mesh.get_group()
        self.rank, self.world = mesh.get_local_rank(), mesh.size()
        self.num_classes = weight.shape[0]
        # DTensor's Shard(0) splits like torch.chunk: ceil(V / world) rows per rank.
        self.vocab_start = min(self.rank * -(-self.num_classes // self.world), self.num_classes)
        self.weight = scale_grad(weight.to_local(), 1.0 / self.world)
        self.bias = None if bias is None else scale_grad(bias.to_local(), 1.0 / self.world)


def linear_cross_entropy(input, weight, target, bias, *, ignore_index, label_smoothing, z_loss, softcap, reduction,
                         class_weight, normalizer, return_stats, chunk_size, memory_budget):
    fn = "linear_cross_entropy"
    kind, mesh = _layout(fn, weight, bias, (("input", input), ("target", target)))
    if kind == "replicate":
        return _linear_ce.linear_cross_entropy(input, weight.to_local(), target, _local(bias),
                                               ignore_index=ignore_index, label_smoothing=label_smoothing,
                                               z_loss=z_loss, softcap=softcap, reduction=reduction,
                                               class_weight=class_weight, normalizer=normalizer,
                                               return_stats=return_stats, chunk_size=chunk_size,
                                               memory_budget=memory_budget)
    dp = _DataParallel(weight, bias, mesh)

    def local_check():
        nonlocal target
        target = _linear_ce._coerce_operands(fn, input, dp.weight, target, dp.bias, class_weight)
        return [target.numel(), input.shape[-1]]

    validated(fn, dp.group, input, local_check, (_LOCAL_ROWS, _FEATURES))
    loss = _linear_cross_entropy(
        gather(_common.as_rows(input), dp.group), dp.weight, all_gather_rows(target.reshape(-1), dp.group), dp.bias,
        vocab_start=dp.vocab_start, num_classes=dp.num_classes, group=dp.group, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
        class_weight=class_weight, normalizer=normalizer, return_stats=return_stats, chunk_size=chunk_size,
        own_rank=dp.rank)
    # This rank's rows come back flat: shaped like its target again.
    loss, *stats = loss if return_stats else (loss,)
    loss = loss.reshape(target.shape) if reduction == "none" else loss
    return _linear_ce.LinearCEOutput(loss, *(s.reshape(target.shape) for s in stats)) if return_stats else loss


def sampled_loss(options, *, input, weight, target, bias, sampled_values, generator):
    """The sampled losses' driver for a DTensor weight (see the module docstring).
    With Shard(0), shared candidates are drawn once, on rank 0, and broadcast
    (given shared ``sampled_values`` must be the same on every rank); per-row
    ones and the expected counts of the true classes are all-gathered with the rows."""
    fn = options.fn
    given = () if sampled_values is None else tuple(sampled_values)
    kind, mesh = _layout(fn, weight, bias, [("input", input), ("target", target)] +
                         [(f"sampled_values[{i}]", t) for i, t in enumerate(given)])
    if kind == "replicate":
        return _sampled._sampled_loss(options, input=input, weight=weight.to_local(), target=target,
                                      bias=_local(bias), sampled_values=sampled_values, generator=generator)
    if options.sparse_grad or options.hit_mask == _sampled.HIT_LAST_COPY:
        raise ValueError(f"{fn}: a Shard(0) DTensor weight takes dense gradients and native accidental-hit masking "
                         "(no sparse_grad, no TensorFlow last-copy masking)")
    dp = _DataParallel(weight, bias, mesh)
    true_classes = None

    def local_check():
        nonlocal true_classes, sampled_values
        if not isinstance(input, torch.Tensor) or input.dim() != 2:
            raise ValueError(f"{fn}: input must be [N, D]")
        true_classes = _sampled._true_classes(target, input.shape[0])
        if sampled_values is not None:
            sampled_values = _sampled._check_sampled_values(sampled_values, true_classes, input.shape[0],
                                                            input.device)
        return [*input.shape, true_classes.shape[1], -1 if sampled_values is None else sampled_values[0].dim()]

    validated(fn, dp.group, input, local_check, (_LOCAL_ROWS, _FEATURES, "num_true",
                                                 "the sampled_values layout (shared [K] or per-row [N, K])"))
    if sampled_values is not None:
        sampled, true_count, sampled_count = sampled_values
        if sampled.dim() == 2:  # per-row candidates follow their rows
            sampled, sampled_count = all_gather_rows(sampled, dp.group), all_gather_rows(sampled_count, dp.group)
        sampled_values = (sampled, all_gather_rows(true_count, dp.group), sampled_count)
    if options.num_classes is None:  # known here, so not gathered (nor needed under torch.compile)
        options = dataclasses.replace(options, num_classes=dp.num_classes)
    return _sharded_sampled(options, input=gather(input, dp.group), weight_shard=dp.weight,
                            target=all_gather_rows(true_classes, dp.group), bias_shard=dp.bias,
                            vocab_start=dp.vocab_start, group=dp.group, sampled_values=sampled_values,
                            generator=generator, own_rank=dp.rank)
