"""torch.compile(fullgraph=True) of every public loss against eager (loss and
gradients), and torch.library.opcheck of every fusedloss op: schema, fake
kernel, autograd registration and AOT dispatch (static and dynamic shapes).

Inductor compiles take 10-30 s on a small CI machine, so each op family gets
one inductor case and the other cases use aot_eager, which still runs the
fake kernels and the AOT-autograd partition."""
import pytest
import torch

import fusedloss
from conftest import assert_all_close, detached, features, linear_ce_problem, sampled_problem

ops = torch.ops.fusedloss


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles from scratch: closures over different tensors share a
    code object, and fullgraph=True fails once its recompile limit is hit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def leaves(*tensors):
    """Detached copies requiring grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def loss_and_grads(fn, inputs):
    """fn(*inputs) and the gradients of a non-uniformly weighted sum of it."""
    inputs = leaves(*inputs)
    loss = fn(*inputs)
    weight = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    used = [t for t in inputs if t is not None]
    return [loss.detach(), *torch.autograd.grad((loss * weight).sum(), used, allow_unused=True)]


def assert_compiles_like_eager(fn, inputs, backend):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    assert_all_close(loss_and_grads(compiled, inputs), loss_and_grads(fn, inputs), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend, options", [
    ("inductor", {}),  # a reduced loss on the CPU: the single-pass sum-and-gradient op
    ("aot_eager", {"chunk_size": 8}),  # the chunked recompute path, forward + backward ops
    ("aot_eager", {"chunk_size": 8, "reduction": "none"}),
    ("aot_eager", {"reduction": "none"}),
], ids=["inductor-default", "aot_eager-chunked", "aot_eager-chunked-none", "aot_eager-none"])
def test_compile_linear_cross_entropy(device, backend, options):
    """linear_cross_entropy compiles without graph breaks and matches eager."""
    x, w, t, b = linear_ce_problem(12, 8, 64, torch.float32, device, bias=True, ignore_every=5)

    def loss(x, w, b):
        return 2.0 * fusedloss.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, z_loss=1e-3, softcap=10.0,
                                                    **options)

    assert_compiles_like_eager(loss, [x, w, b], backend)


@pytest.mark.parametrize("kind, per_row, backend", [
    ("softmax", False, "inductor"),
    ("softmax", True, "aot_eager"),
    ("nce", False, "aot_eager"),
    ("nce", True, "aot_eager"),
])
def test_compile_sampled(device, kind, per_row, backend):
    """sampled_softmax_loss / nce_loss with given sampled_values (no sampling in
    the graph), shared or per-row candidates, compile and match eager."""
    x, w, b, target, sv = sampled_problem(num_true=2, per_row=per_row, device=device)
    fn = fusedloss.sampled_softmax_loss if kind == "softmax" else fusedloss.nce_loss

    def loss(x, w, b):
        return fn(x, w, target, None, b, sampled_values=sv, chunk_size=4, reduction="mean")

    assert_compiles_like_eager(loss, [x, w, b], backend)


@pytest.mark.filterwarnings("ignore:Error detected")
def test_compile_sparse_grad_is_a_clear_error():
    """sparse_grad=True cannot be traced (data-dependent rows) and says so."""
    x, w, _, target, sv = sampled_problem()
    w = w.clone().requires_grad_()

    def loss(x, w):
        return fusedloss.sampled_softmax_loss(x, w, target, None, sampled_values=sv, sparse_grad=True)

    with pytest.raises(Exception, match="sparse_grad=True is not supported under torch.compile"):
        torch.compile(loss, fullgraph=True, backend="aot_eager")(x, w).backward()


def info_nce(q, k, n, t):
    return fusedloss.info_nce_loss(q, k, negatives=n, temperature=t, normalize=True, symmetric=True, tile_size=5)


def nt_xent(q, k, n, t):
    return fusedloss.nt_xent_loss(torch.cat([q, k]), temperature=t, reduction="none", tile_size=5)


def clip(q, k, n, t):
    return fusedloss.clip_loss(q, k, 1 / t, tile_size=5)  # a tensor logit_scale that requires grad


@pytest.mark.parametrize("loss, backend", [(info_nce, "inductor"), (nt_xent, "aot_eager"), (clip, "aot_eager")],
                         ids=["info_nce-inductor", "nt_xent-aot_eager", "clip-aot_eager"])
def test_compile_contrastive(device, loss, backend):
    """info_nce_loss (extra negatives, symmetric), nt_xent_loss and clip_loss,
    with a learnable temperature / logit scale, compile and match eager."""
    q, k, n = (features(rows, 8, device, seed=60 + rows) for rows in (12, 12, 4))
    t = torch.tensor(0.2, device=device)
    assert_compiles_like_eager(loss, [q, k, n, t], backend)


# ------------------------------------------------------------------- opcheck

BACKWARD_MASKS = ([True, True, True], [True, False, False], [False, True, True])
LINEAR_CE_OPTIONS = (-100, 0.1, 1e-3, 5.0)  # ignore_index, label_smoothing, z_loss, softcap
SHARD = slice(10, 20)  # a middle shard of a 33-class vocabulary: vocab_start=10


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_linear_ce(device, with_bias):
    """linear_ce_forward, linear_ce_backward (whole vocabulary and one shard of
    it, from a real forward's lse) and linear_ce_sum_and_grad."""
    x, w, t, b = linear_ce_problem(6, 5, 33, torch.float32, device, bias=with_bias, ignore_every=4)
    # Without and with class weights and statistics.
    class_weight = torch.rand(w.shape[0], device=device) + 0.5
    for cw, stats in ((None, False), (class_weight, True)):
        forward = (x, w, t, b, cw, *LINEAR_CE_OPTIONS, 8, stats)
        torch.library.opcheck(ops.linear_ce_forward.default, forward)
        loss, lse, _, _ = ops.linear_ce_forward(*detached(forward))
        xd, wd, bd = detached((x, w, b))
        for mask in BACKWARD_MASKS:
            mask = [mask[0], mask[1], mask[2] and with_bias]
            torch.library.opcheck(ops.linear_ce_backward.default,
                                  (torch.rand_like(loss), xd, wd, t, bd, cw, lse, *LINEAR_CE_OPTIONS, 8, mask))
            torch.library.opcheck(ops.linear_ce_backward.default,
                                  (torch.rand_like(loss), xd, wd[SHARD], t, None if bd is None else bd[SHARD], cw, lse,
                                   *LINEAR_CE_OPTIONS, 4, mask, SHARD.start, w.shape[0]))
        normalizer = torch.tensor(5.0, device=device)
        for row_block, scale, mask in ((0, None, [True, True, with_bias]), (4, normalizer, [False, True, False])):
            torch.library.opcheck(ops.linear_ce_sum_and_grad.default,
                                  (*leaves(x, w), t, *leaves(b), cw, scale, *LINEAR_CE_OPTIONS, row_block, 0, stats,
                                   mask))


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_linear_ce_shard_forward(device, with_bias):
    """linear_ce_shard_forward on a middle shard of the vocabulary, with
    targets inside and outside the shard and an ignored row. It has no autograd
    kernel (the distributed loss calls it inside an autograd.Function), so the
    inputs do not require grad."""
    x, w, t, b = detached(linear_ce_problem(6, 5, 33, torch.float32, device, bias=with_bias, ignore_every=4))
    t[1], t[2] = 12, 30  # one target inside the shard, one beyond it
    class_weight = torch.rand(w.shape[0], device=device) + 0.5
    for softcap, cw, stats in ((0.0, None, False), (5.0, None, False), (5.0, class_weight, True)):
        torch.library.opcheck(ops.linear_ce_shard_forward.default,
                              (x, w[SHARD], t, None if b is None else b[SHARD], cw, -100, softcap, SHARD.start,
                               w.shape[0], 4, stats))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("hit_mask", [0, 1, 2])
def test_opcheck_sampled(device, per_row, hit_mask):
    """sampled_forward and sampled_backward (dense gradients, from a real
    forward's stats) for sampled softmax with bias and log Q, and for NCE
    without either."""
    if per_row and hit_mask == 2:
        pytest.skip("last-copy masking needs shared candidates")
    x, w, b, target, (sampled, true_count, sampled_count) = sampled_problem(num_true=2, per_row=per_row,
                                                                            device=device)
    softmax = (b, true_count.log(), sampled_count.log(), 0, 0.1, 1.0)  # bias, log Q, mode, smoothing, true label
    nce = (None, None, None, 1, 0.0, 0.5)
    for bias, true_log_q, sampled_log_q, mode, label_smoothing, true_label in (softmax, nce):
        inputs = (true_log_q, sampled_log_q)
        options = (mode, hit_mask, label_smoothing, true_label, 3, False)
        torch.library.opcheck(ops.sampled_forward.default, (*leaves(x, w, bias), target, sampled, *inputs, *options))
        loss, stats = ops.sampled_forward(x, w, bias, target, sampled, *inputs, *options)
        for mask in BACKWARD_MASKS:
            mask = [mask[0], mask[1], mask[2] and bias is not None]
            torch.library.opcheck(ops.sampled_backward.default,
                                  (torch.rand_like(loss), x, w, bias, target, sampled, *inputs, stats, *options, mask))


@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_contrastive(device, symmetric):
    """contrastive_forward and contrastive_backward (from a real forward's
    row/column lse), with and without a self mask."""
    rows, cols = features(6, 5, device, seed=50), features(9, 5, device, seed=51)
    positives = torch.arange(6, device=device) + 1
    scale = torch.tensor(1.5, device=device, requires_grad=True)
    # With an id mask of two channels, the second giving ids to the first 4 columns only.
    g = torch.Generator().manual_seed(52)
    row_ids = torch.randint(0, 3, (2, 6), generator=g).to(device)
    col_ids = torch.randint(0, 3, (2, 9), generator=g).to(device)
    # Then the same ids as penalties instead of a mask (id_penalty [match, differ]).
    for ids, id_columns, penalty in (((None, None), [], []), ((row_ids, col_ids), [9, 4], []),
                                     ((row_ids, col_ids), [9, 4], [0.5, 2.0])):
        options = (None if symmetric else 0, id_columns, penalty, symmetric, 4)
        torch.library.opcheck(ops.contrastive_forward.default, (rows, cols, positives, scale, *ids, *options))
        plain = detached((rows, cols, scale))
        loss, row_lse, col_lse = ops.contrastive_forward(*plain[:2], positives, plain[2], *ids, *options)
        for mask in BACKWARD_MASKS:
            torch.library.opcheck(ops.contrastive_backward.default,
                                  (torch.rand_like(loss), *plain[:2], positives, plain[2], *ids, row_lse, col_lse,
                                   *options, mask))
