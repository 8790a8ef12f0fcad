"""fusedloss.distributed on CPU with gloo: 2 and 3 ranks spawned with
torch.multiprocessing; every loss and gradient must equal the single-process
op on the concatenated (or full, unsharded) tensors.

Spawning is slow, so each spawned group runs a whole batch of checks (any
failure inside a rank re-raises in the test with that rank's traceback)."""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedloss
from conftest import DEVICES, requires_cuda
from fusedloss import distributed as fdist
from fusedloss.bench.comm import count_collectives

ops = torch.ops.fusedloss
# fp32 rounding of O(10) gradients (sum reductions at scale 5) summed in a
# different order by the gathered and the single-process layouts.
TOL = dict(rtol=2e-5, atol=1e-5)


def _entry(rank, world, init_method, device, checks):
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=init_method, rank=rank,
                            world_size=world)
    try:
        for check in checks:
            check(rank, world, device)
        # No rank tears its process group down while another still uses it:
        # the non-member of _check_subgroup's group (rank 1 of 3) returns
        # early, and its destroy_process_group while the members were still
        # talking aborted it (SIGABRT, "terminate called without an active
        # exception") in full-suite runs on 2 cores. After a failed check a
        # rank skips this (and mp.spawn stops the others).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world, *checks, device="cpu"):
    """Runs the checks on `world` ranks. A group whose rank was killed by a
    signal (not by a failed check, which re-raises its traceback) runs once
    more, with a warning: a safety net for gloo teardown crashes like the one
    the barrier in _entry removes. A crash that repeats still fails."""
    for attempt in range(2):
        init = f"file://{tmp_path}/pg_init_{attempt}"
        try:
            mp.spawn(_entry, args=(world, init, device, checks), nprocs=world, join=True)
            return
        except mp.ProcessExitedException as died:
            if attempt == 1 or died.signal_name is None:
                raise
            warnings.warn(f"rank {died.error_index} died with {died.signal_name}; running the group again")


def _tol(device):
    return TOL if device == "cpu" else dict(rtol=1e-4, atol=1e-5)


def _context(where):
    return lambda message: f"{where}: {message}"


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _to(device, *tensors):
    return [None if t is None else (t.to(device) if isinstance(t, torch.Tensor) else _to(device, *t))
            for t in tensors]


def _assert_shard_matches(loss, ref, local, full, start, end, tol, where):
    """A vocabulary-sharded loss equals the single-process one: same loss, the
    full input gradient, and this shard's rows of the weight / bias gradients."""
    (local_x, local_w, local_b), (ref_x, ref_w, ref_b) = local, full
    torch.testing.assert_close(loss.detach(), ref.detach(), **tol, msg=where)
    torch.testing.assert_close(local_x.grad, ref_x.grad, **tol, msg=where)
    torch.testing.assert_close(local_w.grad, ref_w.grad[start:end], **tol, msg=where)
    if local_b is not None:
        torch.testing.assert_close(local_b.grad, ref_b.grad[start:end], **tol, msg=where)


def _sum_over_ranks(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------
# Contrastive: keys / negatives gathered from every rank


def _check_pair_rank(loss, ref, local, ref_in, rows, weights, reduction, tol, where, negatives=None):
    """Backpropagate one rank's loss (weighted per row for reduction="none")
    and compare it and its local inputs' gradients with the single-process
    reference's rows (and `negatives`' rows of the extra negatives)."""
    objective = loss * weights[rows] if reduction == "none" else loss
    objective.sum().backward()
    torch.testing.assert_close(objective.detach(), ref.detach(), **tol, msg=where)
    torch.testing.assert_close(local[0].grad, ref_in[0].grad[rows], **tol, msg=where)
    torch.testing.assert_close(local[1].grad, ref_in[1].grad[rows], **tol, msg=where)
    if negatives is not None:
        torch.testing.assert_close(local[2].grad, ref_in[2].grad[negatives], **tol, msg=where)


def _reduce_like_ranks(rows, world, reduction, weights):
    """The single-process counterpart of each rank's loss: [world] values."""
    per_rank = rows.view(world, -1)
    if reduction == "none":
        return per_rank * weights.view(world, -1)
    return per_rank.mean(1) if reduction == "mean" else per_rank.sum(1)


CONTRASTIVE_CASES = [
    # (name, kwargs, with negatives, temperature / logit_scale is a tensor)
    ("info_nce", dict(reduction="mean"), False, False),
    ("info_nce", dict(reduction="none", normalize=True), True, True),
    ("info_nce", dict(reduction="sum", symmetric=True), True, True),
    ("info_nce", dict(reduction="mean", symmetric=True, normalize=True), False, False),
    ("clip", dict(reduction="mean"), False, True),
    ("clip", dict(reduction="none"), False, False),
]


def _check_contrastive(rank, world, device):
    tol = _tol(device)
    batch, dim, extra = 5, 8, 3
    for index, (name, kwargs, with_negatives, tensor_scale) in enumerate(CONTRASTIVE_CASES):
        gen = torch.Generator().manual_seed(index)  # the same data on every rank
        full = [torch.randn(world * batch, dim, generator=gen) for _ in range(2)]
        full_neg = torch.randn(world * extra, dim, generator=gen) if with_negatives else None
        weights = torch.rand(world * batch, generator=gen)
        full, full_neg, weights = _to(device, full, full_neg, weights)
        scale_value = 0.2 if name == "info_nce" else 4.0
        reduction = kwargs["reduction"]

        # Single process on the concatenated tensors.
        ref_in = [_leaf(t) for t in full] + ([_leaf(full_neg)] if with_negatives else [])
        ref_scale = _leaf(torch.tensor(scale_value, device=device)) if tensor_scale else scale_value
        call_kwargs = {k: v for k, v in kwargs.items() if k != "reduction"}
        if name == "info_nce":
            ref_rows = fusedloss.info_nce_loss(ref_in[0], ref_in[1], negatives=ref_in[2] if with_negatives else None,
                                               temperature=ref_scale, reduction="none", tile_size=4, **call_kwargs)
        else:
            ref_rows = fusedloss.clip_loss(ref_in[0], ref_in[1], ref_scale, reduction="none", tile_size=4)
        ref = _reduce_like_ranks(ref_rows, world, reduction, weights)
        ref.sum().backward()

        # This rank's slice through the distributed op.
        rows = slice(rank * batch, (rank + 1) * batch)
        local = [_leaf(full[0][rows]), _leaf(full[1][rows])]
        if with_negatives:
            local.append(_leaf(full_neg[rank * extra:(rank + 1) * extra]))
        scale = _leaf(torch.tensor(scale_value, device=device)) if tensor_scale else scale_value
        if name == "info_nce":
            loss = fdist.info_nce_loss(local[0], local[1], negatives=local[2] if with_negatives else None,
                                       temperature=scale, tile_size=3, **kwargs)
        else:
            loss = fdist.clip_loss(local[0], local[1], scale, tile_size=3, **kwargs)
        where = _context(f"{name} {kwargs} negatives={with_negatives} rank {rank}/{world}")
        _check_pair_rank(loss, ref[rank], local, ref_in, rows, weights, reduction, tol, where,
                         slice(rank * extra, (rank + 1) * extra) if with_negatives else None)
        if tensor_scale:
            # Each rank holds d(its loss)/d(scale); DDP would combine them.
            torch.testing.assert_close(_sum_over_ranks(scale.grad), ref_scale.grad, **tol, msg=where)


# ---------------------------------------------------------------------------
# Vocabulary-parallel linear cross-entropy


def _shard_bounds(rank, world, num_classes):
    """Uneven shards, ranks in reverse vocabulary order (layouts need not follow rank order)."""
    sizes = [num_classes // world + (i < num_classes % world) for i in range(world)]
    index = world - 1 - rank
    start = sum(sizes[:index])
    return start, start + sizes[index]


LINEAR_CE_CASES = [
    dict(reduction="mean", bias=True),
    dict(reduction="none", bias=False, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, batch_shape=(2, 4)),
    dict(reduction="sum", bias=True, label_smoothing=0.2, same_shard_targets=True),
    dict(reduction="mean", bias=True, z_loss=1e-2, all_ignored=True),
    # bf16: the partial input gradients are all-reduced in bf16.
    dict(reduction="mean", bias=True, label_smoothing=0.1, dtype=torch.bfloat16),
    # Class weights (weighted mean), per-token statistics, a global normaliser.
    dict(reduction="mean", bias=True, label_smoothing=0.1, z_loss=1e-3, class_weight=True, return_stats=True),
    dict(reduction="sum", bias=False, softcap=5.0, class_weight=True, normalizer=3.5, return_stats=True,
         batch_shape=(2, 4)),
]


def _check_linear_ce(rank, world, device):
    tol = _tol(device)
    num_classes, dim = 11, 6
    for index, case in enumerate(LINEAR_CE_CASES):
        case = dict(case)
        batch_shape = case.pop("batch_shape", (7,))
        reduction, with_bias = case.pop("reduction"), case.pop("bias")
        same_shard, all_ignored = case.pop("same_shard_targets", False), case.pop("all_ignored", False)
        with_class_weight = case.pop("class_weight", False)
        dtype = case.pop("dtype", torch.float32)
        case_tol = tol if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
        gen = torch.Generator().manual_seed(20 + index)
        x = torch.randn(*batch_shape, dim, generator=gen)
        weight = torch.randn(num_classes, dim, generator=gen)
        bias = torch.randn(num_classes, generator=gen) if with_bias else None
        target = torch.randint(0, 3 if same_shard else num_classes, batch_shape, generator=gen)
        target.view(-1)[1] = -100
        if all_ignored:
            target.fill_(-100)
        upstream = torch.rand(batch_shape, generator=gen)
        class_weight = torch.rand(num_classes, generator=gen) + 0.5 if with_class_weight else None
        x, weight, bias, target, upstream, class_weight = _to(device, x, weight, bias, target, upstream, class_weight)
        if with_class_weight:
            # The whole vocabulary's weights on every rank; without num_classes their length stands for it.
            case["class_weight"] = class_weight
        x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))

        ref_x, ref_w = _leaf(x), _leaf(weight)
        ref_b = _leaf(bias) if with_bias else None
        ref = fusedloss.linear_cross_entropy(ref_x, ref_w, target, ref_b, reduction=reduction, chunk_size=4, **case)
        if case.get("return_stats"):
            ref, ref_stats = ref.loss, ref[1:]
        (ref * upstream if reduction == "none" else ref).sum().backward()

        start, end = _shard_bounds(rank, world, num_classes)
        local_x, local_w = _leaf(x), _leaf(weight[start:end])
        local_b = _leaf(bias[start:end]) if with_bias else None
        loss = fdist.linear_cross_entropy(local_x, local_w, target, local_b, vocab_start=start,
                                          num_classes=num_classes if with_bias else None, reduction=reduction,
                                          chunk_size=2, **case)
        where = _context(f"linear_ce {case} {reduction} {dtype} rank {rank}/{world}")
        if case.get("return_stats"):
            # The full vocabulary's statistics on every rank (NaN / -1 on ignored rows).
            loss, stats = loss.loss, loss[1:]
            for got, expected in zip(stats, ref_stats):
                torch.testing.assert_close(got, expected, **case_tol, equal_nan=True, msg=where)
        (loss * upstream if reduction == "none" else loss).sum().backward()

        _assert_shard_matches(loss, ref, (local_x, local_w, local_b), (ref_x, ref_w, ref_b), start, end, case_tol,
                              where)


# ---------------------------------------------------------------------------
# Sampled softmax / NCE with a vocabulary-sharded weight


SAMPLED_CASES = [
    # (loss, kwargs, num_true, bias, how the candidates come)
    ("softmax", dict(reduction="mean", label_smoothing=0.1), 1, True, "drawn"),
    ("nce", dict(reduction="none"), 2, False, "in_batch"),
    ("softmax", dict(reduction="sum", subtract_log_q=False), 2, True, "given_per_row"),
    ("nce", dict(reduction="mean", remove_accidental_hits=True, sampler="uniform", unique=False), 1, True, "drawn"),
    # More candidates than shard rows: row-wise candidates, hits masked through log Q.
    ("softmax", dict(reduction="mean", label_smoothing=0.2, dtype=torch.float64), 2, True, "in_batch"),
    ("nce", dict(reduction="mean", dtype=torch.bfloat16), 1, True, "drawn"),
]


def _check_sampled(rank, world, device):
    tol = _tol(device)
    num_classes, dim, rows, num_sampled = 23, 6, 8, 5
    for index, (loss_name, kwargs, num_true, with_bias, candidates) in enumerate(SAMPLED_CASES):
        gen = torch.Generator().manual_seed(10 + index)
        kwargs = dict(kwargs)
        dtype = kwargs.pop("dtype", torch.float32)
        if dtype == torch.float64 and device == "cuda":
            continue  # the CUDA kernels take fp32 / bf16 / fp16
        x = torch.randn(rows, dim, generator=gen, dtype=dtype)
        weight = torch.randn(num_classes, dim, generator=gen, dtype=dtype)
        bias = torch.randn(num_classes, generator=gen, dtype=dtype) if with_bias else None
        target = torch.randint(0, num_classes, (rows, num_true), generator=gen)
        upstream = torch.rand(rows, generator=gen)
        x, weight, bias, target, upstream = _to(device, x, weight, bias, target, upstream)
        sampler_name = kwargs.pop("sampler", "log_uniform")
        unique = kwargs.get("unique", True)
        extra = {}
        if candidates == "in_batch":
            extra = dict(sampler="in_batch")
            ref_extra = dict(sampler="in_batch")
        elif candidates == "given_per_row":
            sampled = torch.randint(0, num_classes, (rows, num_sampled), generator=gen)
            values = (sampled, torch.rand(rows, num_true, generator=gen) + 0.5,
                      torch.rand(rows, num_sampled, generator=gen) + 0.5)
            extra = ref_extra = dict(sampled_values=tuple(_to(device, *values)))
        else:
            # Each rank seeds differently: rank 0's draw must be the one used.
            sampler = fusedloss.samplers.LogUniformSampler(num_classes) if sampler_name == "log_uniform" \
                else fusedloss.samplers.UniformSampler(num_classes)
            values = sampler.sample(target, num_sampled, unique=unique,
                                    generator=torch.Generator(device).manual_seed(99))
            extra = dict(sampler=sampler_name, generator=torch.Generator(device).manual_seed(99 + rank))
            ref_extra = dict(sampled_values=values)
        single = fusedloss.sampled_softmax_loss if loss_name == "softmax" else fusedloss.nce_loss
        sharded = fdist.sampled_softmax_loss if loss_name == "softmax" else fdist.nce_loss

        ref_x, ref_w = _leaf(x), _leaf(weight)
        ref_b = _leaf(bias) if with_bias else None
        ref = single(ref_x, ref_w, target, num_sampled, ref_b, chunk_size=3, **kwargs, **ref_extra)
        (ref * upstream if kwargs["reduction"] == "none" else ref).sum().backward()

        start, end = _shard_bounds(rank, world, num_classes)
        local_x, local_w = _leaf(x), _leaf(weight[start:end])
        local_b = _leaf(bias[start:end]) if with_bias else None
        loss = sharded(local_x, local_w, target, num_sampled, local_b, vocab_start=start, chunk_size=2, **kwargs,
                       **extra)
        (loss * upstream if kwargs["reduction"] == "none" else loss).sum().backward()

        case_tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else tol
        _assert_shard_matches(loss, ref, (local_x, local_w, local_b), (ref_x, ref_w, ref_b), start, end, case_tol,
                              _context(f"sampled {loss_name} {kwargs} {dtype} {candidates} rank {rank}/{world}"))


def _collective_sizes(run):
    """[(op, numel)] of the collectives ``run()`` issues, the cross-rank checks'
    all-gathers of a few integers (the list form of all_gather) left out."""
    with count_collectives() as log:
        run()
    return [(c.op, c.numel) for c in log if c.function != "all_gather"]


def _check_sampled_collectives(rank, world, device):
    """Owner-only scoring: per step one MAX [N] and one SUM [4, N] (softmax) or
    one SUM [N] (NCE), the candidates' broadcast, and the input gradient's
    all-reduce [N, D]; no collective carries weight rows."""
    rows, dim, num_true, num_sampled, num_classes = 6, 5, 2, 4, 40
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen)
    target = torch.randint(0, num_classes, (rows, num_true), generator=gen)
    start, end = _shard_bounds(rank, world, num_classes)
    drawn = [("broadcast", num_sampled), ("broadcast", rows * num_true), ("broadcast", num_sampled)]
    for sharded, combine in ((fdist.sampled_softmax_loss, [("all_reduce", rows), ("all_reduce", 4 * rows)]),
                             (fdist.nce_loss, [("all_reduce", rows)])):
        local_x, local_w = _leaf(x), _leaf(weight[start:end])
        sizes = _collective_sizes(lambda: sharded(local_x, local_w, target, num_sampled, vocab_start=start,
                                                  sampler="uniform").backward())
        assert sizes == drawn + combine + [("all_reduce", rows * dim)], (sharded.__name__, sizes)


def _check_subgroup(rank, world, device):
    """A group that is not the default one: positives at group ranks, the
    sampled candidates broadcast from the group's first rank, non-members refused."""
    members = [world - 1, 0]
    sub = dist.new_group(members)  # every process must call new_group
    if rank not in members:
        with pytest.raises(RuntimeError, match="not a member"):
            fdist.clip_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0, group=sub)
        return
    group_rank = dist.get_rank(sub)
    gen = torch.Generator().manual_seed(5)
    image, text = torch.randn(2 * 3, 4, generator=gen), torch.randn(2 * 3, 4, generator=gen)
    ref_image, ref_text = _leaf(image), _leaf(text)
    ref = fusedloss.clip_loss(ref_image, ref_text, 3.0, reduction="none").view(2, 3).mean(1)
    ref.sum().backward()
    rows = slice(3 * group_rank, 3 * group_rank + 3)
    local_image, local_text = _leaf(image[rows]), _leaf(text[rows])
    loss = fdist.clip_loss(local_image, local_text, 3.0, group=sub)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref[group_rank].detach(), **TOL)
    torch.testing.assert_close(local_image.grad, ref_image.grad[rows], **TOL)
    torch.testing.assert_close(local_text.grad, ref_text.grad[rows], **TOL)

    # Sampled candidates come from group rank 0, whatever the others drew.
    x, weight = torch.randn(4, 4, generator=gen), torch.randn(9, 4, generator=gen)
    target = torch.randint(0, 9, (4,), generator=gen)
    first = dist.get_global_rank(sub, 0)
    values = fusedloss.samplers.UniformSampler(9).sample(target, 3, generator=torch.Generator().manual_seed(first))
    ref = fusedloss.sampled_softmax_loss(x, weight, target, 3, sampled_values=values)
    start, end = (0, 5) if group_rank == 0 else (5, 9)
    loss = fdist.sampled_softmax_loss(x, weight[start:end], target, 3, vocab_start=start, group=sub,
                                      sampler="uniform", generator=torch.Generator().manual_seed(rank))
    torch.testing.assert_close(loss, ref, **TOL)


# ---------------------------------------------------------------------------
# DTensor weights in the single-device entry points (FSDP2's Shard(0), Replicate)


def _dtensor_cases(world, num_classes, rows, num_sampled, gen):
    """(name, single-device loss of the whole batch -> per-row losses, kwargs
    for this rank's call given its rows): every case the checks run."""
    target1 = torch.randint(0, num_classes, (world * rows,), generator=gen)
    target1[3] = -100
    target2 = torch.randint(0, num_classes, (world * rows, 2), generator=gen)
    uniform = fusedloss.samplers.UniformSampler(num_classes)
    drawn = uniform.sample(target2, num_sampled, generator=torch.Generator().manual_seed(7))
    per_row = (torch.randint(0, num_classes, (world * rows, num_sampled), generator=gen),
               torch.rand(world * rows, 1, generator=gen) + 0.5,
               torch.rand(world * rows, num_sampled, generator=gen) + 0.5)

    def rows_of(t, r):
        return t[r * rows:(r + 1) * rows]

    return [
        ("linear_ce", fusedloss.linear_cross_entropy, target1, dict(label_smoothing=0.1, z_loss=1e-3, chunk_size=3),
         lambda r: {}),
        ("linear_ce", fusedloss.linear_cross_entropy, target1, dict(softcap=4.0), lambda r: {}),
        # Candidates drawn on rank 0 (the others' generators differ) and shared.
        ("sampled", fusedloss.sampled_softmax_loss, target2, dict(num_sampled=num_sampled, label_smoothing=0.1,
                                                                  chunk_size=2, sampled_values=drawn),
         lambda r: dict(sampled_values=None, sampler="uniform", generator=torch.Generator().manual_seed(7 + r))),
        ("sampled", fusedloss.nce_loss, target2, dict(num_sampled=num_sampled, sampled_values=per_row,
                                                      remove_accidental_hits=True),
         lambda r: dict(sampled_values=tuple(rows_of(t, r) for t in per_row))),
        # In-batch negatives: the targets of every rank's rows.
        ("sampled", fusedloss.sampled_softmax_loss, target2,
         dict(num_sampled=None, label_smoothing=0.1, sampled_values=fusedloss.sampled.in_batch_candidates(target2)),
         lambda r: dict(sampled_values=None, sampler="in_batch")),
    ]


def _check_dtensor_linear_ce_features(rank, world, device):
    """class_weight, normalizer and return_stats through a DTensor weight:
    Shard(0) gives this rank's rows of the single-device result (statistics of
    the whole vocabulary), Replicate the single-device call."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh(device, (world,))
    num_classes, dim, rows = 13, 5, 4
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(world * rows, dim, generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen)
    target = torch.randint(0, num_classes, (world * rows,), generator=gen)
    target[1] = -100
    class_weight = torch.rand(num_classes, generator=gen) + 0.5
    kwargs = dict(class_weight=class_weight, label_smoothing=0.1, reduction="sum", normalizer=3.0, return_stats=True)
    mine = slice(rank * rows, (rank + 1) * rows)
    ref_x = _leaf(x)
    ref = fusedloss.linear_cross_entropy(ref_x, weight, target, **dict(kwargs, reduction="none", normalizer=None))
    (ref.loss[mine].sum() / 3.0).backward()
    for placement in (Shard(0), Replicate()):
        where = _context(f"dtensor features {placement} rank {rank}/{world}")
        local_x = _leaf(x[mine])
        out = fusedloss.linear_cross_entropy(local_x, distribute_tensor(weight.clone(), mesh, [placement]),
                                             target[mine], **kwargs)
        out.loss.backward()
        torch.testing.assert_close(out.loss, ref.loss[mine].sum() / 3.0, **TOL, msg=where)
        torch.testing.assert_close(local_x.grad, ref_x.grad[mine], **TOL, msg=where)
        for got, expected in zip(out[1:], ref[1:]):
            torch.testing.assert_close(got, expected[mine], **TOL, equal_nan=True, msg=where)


def _check_dtensor(rank, world, device):
    """Shard(0): each rank's loss is over its rows, the weight gradient is the
    mean over ranks of each rank's gradient (FSDP's), as a Shard(0) DTensor;
    the weight is never gathered. Replicate: the single-device loss."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh(device, (world,))
    num_classes, dim, rows, num_sampled = 13, 5, 4, 3  # 13 rows: uneven torch.chunk shards
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(world * rows, dim, generator=gen)
    weight, bias = torch.randn(num_classes, dim, generator=gen), torch.randn(num_classes, generator=gen)
    mine = slice(rank * rows, (rank + 1) * rows)
    for index, (kind, loss_fn, target, ref_kwargs, local_kwargs) in enumerate(
            _dtensor_cases(world, num_classes, rows, num_sampled, gen)):
        where = _context(f"dtensor {kind} {loss_fn.__name__} case {index} rank {rank}/{world}")
        for reduction in ("mean", "none"):
            # Single process: every rank's loss over its rows; their gradients averaged.
            ref_x, ref_w, ref_b = _leaf(x), _leaf(weight), _leaf(bias)
            ref_rows = loss_fn(ref_x, ref_w, target, bias=ref_b, reduction="none", **ref_kwargs)
            valid = (target != -100).float().view(world, rows) if kind == "linear_ce" else torch.ones(world, rows)
            per_rank = (ref_rows.view(world, rows) * valid).sum(1) / valid.sum(1)
            upstream = torch.rand(rows, generator=torch.Generator().manual_seed(index))
            if reduction == "mean":
                per_rank.mean().backward()
                ref_x_grad = world * ref_x.grad  # rank r's rows feed only its loss
            else:
                (ref_rows.view(world, rows)[rank] * upstream).sum().backward(inputs=[ref_x])
                ref_x_grad = ref_x.grad
            local_ref = per_rank[rank] if reduction == "mean" else ref_rows.view(world, rows)[rank]

            for placement in (Shard(0), Replicate()):
                dw = distribute_tensor(weight.clone(), mesh, [placement]).requires_grad_()
                db = distribute_tensor(bias.clone(), mesh, [placement]).requires_grad_()
                local_x = _leaf(x[mine])
                kwargs = {**ref_kwargs, **local_kwargs(rank)}
                if kind == "sampled" and kwargs["sampled_values"] is None:
                    kwargs.pop("sampled_values")
                if placement == Replicate():  # the whole batch on every rank: the single-device loss
                    if kind == "sampled" and "generator" in kwargs:
                        continue  # per-rank generators draw per-rank candidates
                    kwargs = dict(ref_kwargs)
                    local_x = _leaf(x)
                loss = loss_fn(local_x, dw, target[mine] if placement == Shard(0) else target, bias=db,
                               reduction=reduction, **kwargs)
                if placement == Replicate():
                    ref_all = loss_fn(_leaf(x), weight, target, bias=bias, reduction=reduction, **ref_kwargs)
                    torch.testing.assert_close(loss, ref_all, **TOL, msg=where("replicate loss"))
                    loss.sum().backward()
                    assert dw.grad.placements == (Replicate(),), where("replicate grad placement")
                    continue
                torch.testing.assert_close(loss.detach(), local_ref.detach(), **TOL, msg=where(f"{reduction} loss"))
                (loss if reduction == "mean" else loss * upstream).sum().backward()
                torch.testing.assert_close(local_x.grad, ref_x_grad[mine], **TOL, msg=where("input grad"))
                if reduction == "none":
                    continue
                assert dw.grad.placements == (Shard(0),) and db.grad.placements == (Shard(0),), where("placement")
                torch.testing.assert_close(dw.grad.full_tensor(), ref_w.grad, **TOL, msg=where("weight grad"))
                torch.testing.assert_close(db.grad.full_tensor(), ref_b.grad, **TOL, msg=where("bias grad"))

    # Identical inputs on every rank: the single-process loss and gradients.
    target = torch.randint(0, num_classes, (rows,), generator=gen)
    ref_x, ref_w = _leaf(x[:rows]), _leaf(weight)
    fusedloss.linear_cross_entropy(ref_x, ref_w, target).backward()
    dw = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    local_x = _leaf(x[:rows])
    fusedloss.linear_cross_entropy(local_x, dw, target).backward()
    torch.testing.assert_close(local_x.grad, ref_x.grad, **TOL)
    torch.testing.assert_close(dw.grad.full_tensor(), ref_w.grad, **TOL)

    # Collectives of one step: the batch is all-gathered, never the weight.
    n = world * rows
    for loss_fn, kwargs, combine in (
            (fusedloss.linear_cross_entropy, {}, [("all_reduce", n), ("all_reduce", 3 * n)]),
            (fusedloss.sampled_softmax_loss, dict(num_sampled=num_sampled, sampler="uniform"),
             [("broadcast", num_sampled), ("broadcast", n), ("broadcast", num_sampled), ("all_reduce", n),
              ("all_reduce", 4 * n)]),
            (fusedloss.nce_loss, dict(num_sampled=num_sampled, sampler="uniform"),
             [("broadcast", num_sampled), ("broadcast", n), ("broadcast", num_sampled), ("all_reduce", n)])):
        dw = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        local_x = _leaf(x[mine])
        sizes = _collective_sizes(lambda: loss_fn(local_x, dw, target, **kwargs).backward())
        assert sizes == [("all_gather", rows * dim), ("all_gather", rows)] + combine + \
            [("all_gather", rows), ("reduce_scatter", n * dim)], (loss_fn.__name__, sizes)

    # Other placements and meshes, DTensor inputs, a plain bias beside a DTensor weight.
    with pytest.raises(ValueError, match="Replicate\\(\\) or Shard\\(0\\)"):
        fusedloss.linear_cross_entropy(x[mine], distribute_tensor(weight, mesh, [Shard(1)]), target)
    with pytest.raises(ValueError, match="1-D device mesh"):
        mesh2 = init_device_mesh(device, (1, world), mesh_dim_names=("a", "b"))
        fusedloss.nce_loss(x[mine], distribute_tensor(weight, mesh2, [Replicate(), Shard(0)]), target, 2)
    with pytest.raises(ValueError, match="input is a DTensor"):
        fusedloss.linear_cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(weight, mesh,
                                                                                               [Shard(0)]), target)
    with pytest.raises(TypeError, match="both be DTensors"):
        fusedloss.sampled_softmax_loss(x[mine], distribute_tensor(weight, mesh, [Shard(0)]), target, 2, bias=bias)
    with pytest.raises(ValueError, match="number of rows .*same on every rank"):
        fusedloss.linear_cross_entropy(x[:rows + rank], distribute_tensor(weight, mesh, [Shard(0)]),
                                       torch.zeros(rows + rank, dtype=torch.long))
    with pytest.raises(ValueError, match="sparse_grad"):
        fusedloss.sampled_softmax_loss(x[mine], distribute_tensor(weight, mesh, [Shard(0)]), target, 2,
                                       sparse_grad=True)


class _ToyLM(torch.nn.Module):
    """The fused-loss pattern: forward hands lm_head.weight to the loss
    without calling lm_head (under fully_shard it stays a Shard(0) DTensor)."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, labels, sampled_values):
        hidden = torch.tanh(self.body(self.embed(ids)))
        return (fusedloss.linear_cross_entropy(hidden, self.lm_head.weight, labels)
                + 0.5 * fusedloss.sampled_softmax_loss(hidden, self.lm_head.weight, labels, None,
                                                       sampled_values=sampled_values))


def _check_fsdp2(rank, world, device):
    """fully_shard on the CPU (gloo): per-rank batches, gradients equal to the
    single-process run on the whole batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, init_device_mesh

    vocab, dim, rows = 11, 6, 5
    torch.manual_seed(0)
    ref = _ToyLM(vocab, dim)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (world * rows,), generator=gen)
    labels = torch.randint(0, vocab, (world * rows,), generator=gen)
    candidates = torch.tensor([1, 4, 7, 9])
    counts = (torch.rand(world * rows, 1, generator=gen) + 0.5, torch.full((4,), 0.8))
    ref(ids, labels, (candidates, counts[0], counts[1])).backward()
    mine = slice(rank * rows, (rank + 1) * rows)
    mesh = init_device_mesh(device, (world,))
    # lm_head its own FSDP unit (its weight reaches the loss as a Shard(0)
    # DTensor), or part of the root's (unsharded by the root's pre-forward).
    for head_unit in (True, False):
        model = _ToyLM(vocab, dim)
        model.load_state_dict(ref.state_dict())
        if head_unit:
            fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for step in range(2):  # gradients accumulate alike on the second step
            model(ids[mine], labels[mine], (candidates, counts[0][mine], counts[1])).backward()
        for name, param in model.named_parameters():
            assert isinstance(param.grad, DTensor), name
            torch.testing.assert_close(param.grad.full_tensor(), 2 * dict(ref.named_parameters())[name].grad, **TOL,
                                       msg=f"fsdp2 head_unit={head_unit} {name} rank {rank}")


def _check_compile(rank, world, device):
    """torch.compile(fullgraph=True) of the distributed losses (their
    collectives are traced into the graph) equals eager: loss and gradients."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    num_classes, dim, rows = 12, 4, 6
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(num_classes, dim, generator=gen)
    target = torch.randint(0, num_classes, (rows,), generator=gen)
    values = (torch.tensor([1, 7, 3, 11, 7]), torch.rand(rows, 1, generator=gen) + 0.5,
              torch.rand(5, generator=gen) + 0.5)
    start, end = _shard_bounds(rank, world, num_classes)
    mesh = init_device_mesh(device, (world,))
    cases = {
        "linear_ce": lambda x, w: fdist.linear_cross_entropy(x, w, target, vocab_start=start, num_classes=num_classes,
                                                             label_smoothing=0.1),
        "sampled_softmax": lambda x, w: fdist.sampled_softmax_loss(x, w, target, 5, vocab_start=start,
                                                                   num_classes=num_classes, sampled_values=values),
        "nce": lambda x, w: fdist.nce_loss(x, w, target, 5, vocab_start=start, num_classes=num_classes,
                                           sampled_values=values, remove_accidental_hits=True),
        "info_nce": lambda x, w: fdist.info_nce_loss(x, x.flip(0) * 0.5, symmetric=True),
        # Class weights, a tensor normalizer and the statistics' collectives in the graph.
        "linear_ce_features": lambda x, w: fdist.linear_cross_entropy(
            x, w, target, vocab_start=start, num_classes=num_classes, label_smoothing=0.1, reduction="sum",
            class_weight=torch.linspace(0.5, 1.5, num_classes), normalizer=torch.tensor(4.0),
            return_stats=True).loss,
        "dtensor_linear_ce": lambda x, w: fusedloss.linear_cross_entropy(x, w, target),
        "dtensor_sampled": lambda x, w: fusedloss.sampled_softmax_loss(x, w, target, 5, sampled_values=values),
    }
    for name, fn in cases.items():
        if name.startswith("dtensor"):
            make_weight = lambda: distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()  # noqa: E731
        else:
            make_weight = lambda: _leaf(weight[start:end])  # noqa: E731
        results = []
        for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            local_x, local_w = _leaf(x), make_weight()
            loss = run(local_x, local_w)
            loss.backward()
            results.append((loss.detach(), local_x.grad, local_w.grad))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, **TOL, msg=f"compile {name} rank {rank}")
    # The cross-rank checks are not traced: the vocabulary-sharded losses need num_classes.
    with pytest.raises(Exception, match="num_classes is required under torch.compile"):
        torch.compile(lambda x, w: fdist.linear_cross_entropy(x, w, target, vocab_start=start), fullgraph=True,
                      backend="aot_eager")(x, weight[start:end])


# ---------------------------------------------------------------------------
# Bad inputs: every rank must raise (none may be left waiting in a collective)


def _lce(rank, start, size, num_classes=None, rows=4, dim=3, target=None):
    x = torch.randn(rows, dim)
    target = torch.zeros(rows, dtype=torch.long) if target is None else target
    return fdist.linear_cross_entropy(x, torch.randn(size, dim), target, vocab_start=start, num_classes=num_classes)


def _check_bad_inputs(rank, world, device):
    last = rank == world - 1
    with pytest.raises(ValueError, match="do not tile .*rows in all"):
        _lce(rank, 4 * rank, 3, num_classes=4 * world - 1)
    if world == 3:  # [0, 2), [3, 6), [5, 8): the right total, a gap and an overlap
        with pytest.raises(ValueError, match="do not tile .*leaves classes \\[2, 3\\) uncovered"):
            _lce(rank, [0, 3, 5][rank], [2, 3, 3][rank], num_classes=8)
    with pytest.raises(ValueError, match="overlaps"):
        _lce(rank, 0, 4, num_classes=4 * world)
    # A shard past num_classes is caught by that rank's own check (the op's
    # checker); its peers learn that it failed.
    with pytest.raises(ValueError, match="not inside \\[0, num_classes=" if last else "got invalid arguments"):
        _lce(rank, 4 * rank + (1 if last else 0), 4, num_classes=4 * world)
    with pytest.raises(ValueError, match="vocab_start out of range"):
        _lce(rank, 4 * rank + (1 if last else 0), 4)
    with pytest.raises(ValueError, match="another world size"):
        _lce(rank, 4 * rank, 4, num_classes=4 * (world + 1))
    with pytest.raises(ValueError, match="num_classes .*same on every rank"):
        _lce(rank, 4 * rank, 4, num_classes=4 * world if rank else None)
    # A local error on one rank: that rank raises its own error, the others
    # learn that a peer failed.
    if rank == 0:
        with pytest.raises(ValueError, match="vocab_start must be a non-negative int"):
            _lce(rank, -1, 4)
    else:
        with pytest.raises(ValueError, match="rank 0 of the group got invalid arguments"):
            _lce(rank, 4 * rank, 4)
    with pytest.raises(ValueError, match="number of input rows"):
        _lce(rank, 4 * rank, 4, rows=4 + rank)
    with pytest.raises(IndexError, match="outside \\[0, "):
        _lce(rank, 4 * rank, 4, target=torch.full((4,), 4 * world))

    with pytest.raises(ValueError, match="local batch size"):
        fdist.info_nce_loss(torch.randn(4 + rank, 3), torch.randn(4 + rank, 3))
    with pytest.raises(ValueError, match="feature size"):
        fdist.clip_loss(torch.randn(4, 3 + rank), torch.randn(4, 3 + rank), 1.0)
    with pytest.raises(ValueError, match="extra negatives"):
        fdist.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), negatives=torch.randn(2, 3) if rank else None)
    if rank == 0:
        with pytest.raises(ValueError, match="temperature must be positive"):
            fdist.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=-1.0)
    else:
        with pytest.raises(ValueError, match="invalid arguments"):
            fdist.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="num_sampled must be the same"):
        fdist.sampled_softmax_loss(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2 + rank,
                                   vocab_start=4 * rank)
    with pytest.raises(ValueError, match="do not tile"):
        fdist.nce_loss(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 2, vocab_start=0)
    if rank == 1:  # malformed on one rank only: no peer may be left waiting
        with pytest.raises(ValueError, match="query must be 2-D"):
            fdist.info_nce_loss(torch.randn(4), torch.randn(4))
    else:
        with pytest.raises(ValueError, match="rank 1 of the group got invalid arguments"):
            fdist.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3))
    # The group is still usable after all of the above.
    loss = fdist.clip_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0)
    assert torch.isfinite(loss)


def _check_contrastive_ids(rank, world, device):
    """False-negative ids across ranks: each rank's loss and gradients equal
    the single-process loss on the concatenated tensors and ids (duplicates
    on different ranks included)."""
    tol = dict(rtol=1e-9, atol=1e-10)
    batch, dim, extra = 5, 8, 3
    rows, negs = slice(rank * batch, (rank + 1) * batch), slice(rank * extra, (rank + 1) * extra)
    for index, (name, symmetric, reduction) in enumerate([("info_nce", False, "mean"), ("info_nce", True, "none"),
                                                          ("clip", True, "sum")]):
        gen = torch.Generator().manual_seed(100 + index)
        # fp64: the layouts sum in different orders, and ties of duplicates need no fp32 slack.
        full = [torch.randn(world * batch, dim, generator=gen, dtype=torch.float64) for _ in range(2)]
        full_neg = torch.randn(world * extra, dim, generator=gen, dtype=torch.float64)
        ids = [torch.randint(0, 4, (n,), generator=gen) for n in (world * batch, world * batch, world * extra)]
        weights = torch.rand(world * batch, generator=gen, dtype=torch.float64)
        full, full_neg, ids, weights = _to(device, full, full_neg, ids, weights)
        ref_in = [_leaf(t) for t in (*full, full_neg)]
        local = [_leaf(full[0][rows]), _leaf(full[1][rows]), _leaf(full_neg[negs])]
        if name == "info_nce":
            ref_rows = fusedloss.info_nce_loss(*ref_in[:2], negatives=ref_in[2], temperature=0.2, symmetric=symmetric,
                                               reduction="none", query_ids=ids[0], key_ids=ids[1],
                                               negative_ids=ids[2])
            loss = fdist.info_nce_loss(*local[:2], negatives=local[2], temperature=0.2, symmetric=symmetric,
                                       reduction=reduction, tile_size=3, query_ids=ids[0][rows],
                                       key_ids=ids[1][rows], negative_ids=ids[2][negs])
        else:
            ref_rows = fusedloss.clip_loss(*ref_in[:2], 4.0, reduction="none", image_ids=ids[0], text_ids=ids[1])
            loss = fdist.clip_loss(*local[:2], 4.0, reduction=reduction, tile_size=3, image_ids=ids[0][rows],
                                   text_ids=ids[1][rows])
        ref = _reduce_like_ranks(ref_rows, world, reduction, weights)
        ref.sum().backward()
        where = _context(f"ids {name} symmetric={symmetric} rank {rank}/{world}")
        _check_pair_rank(loss, ref[rank], local, ref_in, rows, weights, reduction, tol, where,
                         negs if name == "info_nce" else None)
    # Ids on one rank only: every rank raises instead of hanging.
    with pytest.raises(ValueError, match="whether key_ids are given"):
        fdist.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), key_ids=torch.arange(4) if rank else None)


def _check_mnrl(rank, world, device):
    """MultipleNegativesRankingLoss across ranks: each rank's loss and gradients
    equal the single-process loss on the concatenated batch, and (when it is
    installed) sentence-transformers' own loss with gather_across_devices=True."""
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        MultipleNegativesRankingLoss = None
    tol = dict(rtol=1e-9, atol=1e-10)  # fp64
    batch, dim, blocks = 4, 6, 2
    rows = slice(rank * batch, (rank + 1) * batch)
    every = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    cases = [(("query_to_doc",), "joint", None, "mean"), (("query_to_doc",), "joint", "all_negatives", "none"),
             (("query_to_doc", "doc_to_query"), "per_direction", "in_batch_negatives", "none"),
             (every, "joint", "hard_negatives", "sum"), (every, "joint", "all_negatives", "mean")]
    for index, (directions, mode, hardness, reduction) in enumerate(cases):
        gen = torch.Generator().manual_seed(200 + index)
        full = [torch.randn(world * batch, dim, generator=gen, dtype=torch.float64) for _ in range(2 + blocks)]
        weights = torch.rand(world * batch, generator=gen, dtype=torch.float64)
        full, weights = _to(device, full, weights)
        options = dict(scale=7.0, directions=directions, partition_mode=mode, hardness_mode=hardness,
                       hardness_strength=2.0 if hardness else 0.0)
        ref_in = [_leaf(t) for t in full]
        ref = _reduce_like_ranks(fusedloss.mnrl_loss(ref_in[0], ref_in[1], ref_in[2:], reduction="none", **options),
                                 world, reduction, weights)
        ref.sum().backward()
        local = [_leaf(t[rows]) for t in full]
        loss = fdist.mnrl_loss(local[0], local[1], local[2:], reduction=reduction, tile_size=3, **options)
        objective = loss * weights[rows] if reduction == "none" else loss
        objective.sum().backward()
        where = _context(f"mnrl {directions} {mode} {hardness} {reduction} rank {rank}/{world}")
        torch.testing.assert_close(objective.detach(), ref[rank].detach(), **tol, msg=where)
        for mine, theirs in zip(local, ref_in):
            torch.testing.assert_close(mine.grad, theirs.grad[rows], **tol, msg=where)
        if MultipleNegativesRankingLoss is not None and reduction == "mean":
            st_in = [_leaf(t[rows]) for t in full]
            st = MultipleNegativesRankingLoss(None, gather_across_devices=True, **options)
            st_loss = st.compute_loss_from_embeddings(st_in, None)
            st_loss.backward()
            torch.testing.assert_close(loss.detach(), st_loss.detach(), **tol, msg=where)
            for mine, theirs in zip(local, st_in):
                torch.testing.assert_close(mine.grad, theirs.grad, **tol, msg=where)
    # A different number of hard-negative blocks on one rank: every rank raises.
    with pytest.raises(ValueError, match="the number of hard-negative blocks"):
        fdist.mnrl_loss(torch.randn(4, 3), torch.randn(4, 3), [torch.randn(4, 3)] * rank)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_single_process(tmp_path, world):
    _spawn(tmp_path, world, _check_contrastive, _check_contrastive_ids, _check_mnrl, _check_linear_ce,
           _check_sampled, _check_sampled_collectives, _check_subgroup)


def test_dtensor_weights_and_fsdp2(tmp_path):
    _spawn(tmp_path, 2, _check_dtensor, _check_dtensor_linear_ce_features, _check_fsdp2, _check_compile)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_bad_inputs(tmp_path, world):
    _spawn(tmp_path, world, _check_bad_inputs)


@requires_cuda
def test_distributed_cuda_nccl_single_rank(tmp_path):
    """NCCL needs one GPU per rank; a one-rank group still runs every CUDA
    code path (the shard ops, the collectives, the cross-rank checks)."""
    _spawn(tmp_path, 1, _check_contrastive, _check_linear_ce, _check_sampled, device="cuda")


# ---------------------------------------------------------------------------
# In-process tests (no process group needed)


def test_uninitialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised"):
        fdist.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="not initialised"):
        fdist.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 1.0)
    with pytest.raises(RuntimeError, match="not initialised"):
        fdist.sampled_softmax_loss(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), 2,
                                   vocab_start=0)
    with pytest.raises(RuntimeError, match="not initialised"):
        fdist.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long),
                                   vocab_start=0)


def _shards(num_classes, count):
    bounds = torch.linspace(0, num_classes, count + 1).round().long().tolist()
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_shard_ops_combine_to_the_full_op(softcap, device):
    """The shard ops, combined by hand as the ranks would, give the
    single-device forward and backward (checks the C++ extension without a
    process group)."""
    gen = torch.Generator().manual_seed(0)
    rows, dim, classes = 9, 5, 13
    x = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    b = torch.randn(classes, generator=gen, dtype=torch.float64)
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[2] = -100
    grad_loss = torch.rand(rows, generator=gen, dtype=torch.float64)
    x, w, b, target, grad_loss = _to(device, x, w, b, target, grad_loss)
    eps, z = 0.1, 1e-3
    loss, lse, _, _ = ops.linear_ce_forward(x, w, target, b, None, -100, eps, z, softcap, 4)
    full_grads = ops.linear_ce_backward(grad_loss, x, w, target, b, None, lse, -100, eps, z, softcap, 4, [True] * 3)

    stats = [ops.linear_ce_shard_forward(x, w[s:e], target, b[s:e], None, -100, softcap, s, classes, 3)
             for s, e in _shards(classes, 3)]
    combined_lse = torch.logsumexp(torch.stack([s[0].sum(0) for s in stats]), 0)  # lse parts: max + log-sum
    target_logit = sum(s[1] for s in stats)
    sum_logits = sum(s[2] for s in stats)
    combined = combined_lse - (1 - eps) * target_logit - eps * sum_logits / classes + z * combined_lse ** 2
    torch.testing.assert_close(combined_lse, lse.sum(0))
    torch.testing.assert_close(torch.where(target == -100, 0.0, combined), loss)

    grad_input = torch.zeros_like(x)
    for s, e in _shards(classes, 3):
        gi, gw, gb = ops.linear_ce_backward(grad_loss, x, w[s:e], target, b[s:e], None, lse, -100, eps, z, softcap, 2,
                                            [True] * 3, s, classes)
        grad_input += gi
        torch.testing.assert_close(gw, full_grads[1][s:e])
        torch.testing.assert_close(gb, full_grads[2][s:e])
    torch.testing.assert_close(grad_input, full_grads[0])


def test_shard_ops_opcheck_and_errors():
    x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    target = torch.tensor([0, 7, 11, -100])
    class_weight = torch.rand(12) + 0.5
    for cw, stats in ((None, False), (class_weight, True)):
        torch.library.opcheck(ops.linear_ce_shard_forward, (x, w, target, b, cw, -100, 0.0, 6, 12, 2, stats))
    lse = torch.randn(2, 4)  # LseParts: max, log-sum
    for cw in (None, class_weight):
        torch.library.opcheck(ops.linear_ce_backward, (torch.rand(4), x, w, target, b, cw, lse, -100, 0.1, 0.0, 0.0,
                                                       2, [True, True, True], 6, 12))
    # The shard forward trusts its caller; linear_ce_check is the shard's check
    # (fusedloss.distributed runs it on every rank before any collective).
    ops.linear_ce_check(x, w, target, b, class_weight, -100, 0.0, 0.0, 0.0, 6, 12)
    with pytest.raises(ValueError, match="not inside \\[0, num_classes=10\\)"):
        ops.linear_ce_check(x, w, target.clamp(max=9), b, None, -100, 0.0, 0.0, 0.0, 6, 10)
    with pytest.raises(IndexError, match="outside \\[0, 11\\)"):
        ops.linear_ce_check(x, w, target, b, None, -100, 0.0, 0.0, 0.0, 6, 11)
    with pytest.raises(ValueError, match="D=3 features but weight has D=5"):
        ops.linear_ce_check(x, w.T, target, None, None, -100, 0.0, 0.0, 0.0, 0, 12)
    with pytest.raises(ValueError, match="class_weight must be \\[num_classes\\]=\\[12\\]"):
        ops.linear_ce_check(x, w, target, b, class_weight[:5], -100, 0.0, 0.0, 0.0, 6, 12)
