"""Group handling, cross-rank argument checks and the autograd-aware
collectives shared by the distributed losses."""
import torch
import torch.distributed as dist


def _group_geometry(fn, group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"fusedloss.distributed.{fn}: the default process group is not initialised; call "
                           "torch.distributed.init_process_group() first (torchrun sets up the environment)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"fusedloss.distributed.{fn}: this process is not a member of the given group")
    return rank, dist.get_world_size(group)


def validated(fn, group, first, local_check, sizes):
    """Run ``local_check()`` (argument validation of this rank, returning one
    integer per entry of ``sizes``), then all-gather ``[failed, world_size,
    *integers]`` (on the device of ``first``, the call's first tensor
    argument, or the CPU) so that every rank learns whether any rank failed
    and raises too (otherwise the healthy ranks would hang in the next
    collective). Each integer whose ``sizes`` entry is a description (not
    None) must be the same on every rank. Returns ``(rank, world_size,
    gathered)`` with ``gathered`` a list of per-rank integer lists."""
    rank, world = _group_geometry(fn, group)
    if torch.compiler.is_compiling():
        # Reading the gathered integers on the host would break the graph:
        # while tracing, only this rank's own checks run (docs/distributed.md).
        local_check()
        return rank, world, None
    device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    error, values = None, [-1] * len(sizes)
    try:
        values = local_check()
    except Exception as exc:  # re-raised below, after the peers have heard of it
        error = exc
    mine = torch.tensor([int(error is not None), world, *values], dtype=torch.int64, device=device)
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
    gathered = [g[2:] for g in gathered]
    for index, what in enumerate(sizes):
        if what is not None:
            require_equal(fn, gathered, index, what)
    return rank, world, gathered


def require_equal(fn, gathered, index, what):
    values = [g[index] for g in gathered]
    if len(set(values)) != 1:
        raise ValueError(f"fusedloss.distributed.{fn}: {what} must be the same on every rank, got {values} "
                         "(rank 0, 1, ...)")


def check_shard_layout(fn, gathered, num_classes, world):
    """gathered[r] = [vocab_start, V_local, num_classes or -1] of rank r. The
    shards must tile [0, num_classes) exactly. Returns num_classes. Under
    torch.compile (gathered is None) the layout is taken on trust and
    num_classes must be given."""
    if gathered is None:
        if num_classes is None:
            raise ValueError(f"fusedloss.distributed.{fn}: num_classes is required under torch.compile (the other "
                             "ranks' shard sizes are not gathered while tracing)")
        return num_classes
    require_equal(fn, gathered, 2, "num_classes (None counts as -1)")
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


def _flat_collective(new_name, old_name):
    """torch 2.14 renamed the flat collectives; older releases only have the
    old names (resolved at call time: builds without distributed lack both)."""
    return getattr(dist, new_name, None) or getattr(dist, old_name)


def all_gather_rows(tensor, group):
    """The ranks' tensors concatenated along dim 0 in rank order (no autograd)."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
    _flat_collective("all_gather_single", "all_gather_into_tensor")(out, tensor, group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (rank order). The backward reduce-scatters the
    gathered gradient, so each rank receives the sum over all ranks' losses of
    the gradient of its own rows (open_clip's ``gather_with_grad``)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return all_gather_rows(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        _flat_collective("reduce_scatter_single", "reduce_scatter_tensor")(out, grad, group=ctx.group)
        return out, None


def gather(tensor, group):
    return _GatherWithGrad.apply(tensor, group)


def broadcast_from_first(tensors, group):
    """The tensors of the group's rank 0, on every rank."""
    src = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
    out = []
    for t in tensors:
        t = t.contiguous()
        dist.broadcast(t, src=src, group=group)
        out.append(t)
    return out


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the backward all-reduces (SUM) the gradient. Wraps a
    replicated input whose consumers each produce a partial gradient
    (Megatron's copy-to-model-parallel-region)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_group(tensor, group):
    return _CopyToGroup.apply(tensor, group)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (SUM) forward of per-rank partial results; the gradient of
    the (replicated) sum is already this rank's, so the backward is the identity."""

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(tensor, group):
    return _SumOverGroup.apply(tensor, group)


class _OwnRows(torch.autograd.Function):
    """Rows ``[rank * n, (rank + 1) * n)`` of a [world * n, ...] tensor that
    every rank computed alike (losses of the all-gathered batch). Each rank
    differentiates only its own rows' loss, so the backward all-gathers the
    ranks' gradients: every rank then holds the gradient of the sum of all
    ranks' losses, as the replicated pass before this one expects."""

    @staticmethod
    def forward(ctx, tensor, rank, group):
        ctx.group = group
        rows = tensor.shape[0] // dist.get_world_size(group)
        return tensor.narrow(0, rank * rows, rows).clone()

    @staticmethod
    def backward(ctx, grad):
        return all_gather_rows(grad, ctx.group), None, None


def own_rows(tensor, rank, group):
    return _OwnRows.apply(tensor, rank, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``scale``."""

    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(tensor, scale):
    return _ScaleGrad.apply(tensor, scale)
