"""Fused sampled softmax / NCE vs the gather + matmul reference: values and all
gradients, shared and per-row candidates, masking, sparse gradients and
gradcheck (bad inputs: test_bad_input.py; opcheck, torch.compile: test_compile.py)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference
from fusedloss.sampled import in_batch_candidates
from conftest import assert_all_close, assert_close_to_oracle, sampled_problem


def loss_and_grads(fn, x, w, b, target, sv, reduction="sum", upstream=None, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = fn(x, w, target, sv, b, reduction=reduction, **kw)
    (loss if upstream is None else (loss * upstream).sum()).sum().backward()
    return loss.detach(), x.grad, w.grad, None if b is None else b.grad


def fused(kind):
    base = fusedloss.sampled_softmax_loss if kind == "softmax" else fusedloss.nce_loss

    def fn(x, w, target, sv, b, **kw):
        return base(x, w, target, None, b, sampled_values=sv, **kw)

    return fn


def ref(kind):
    return reference.sampled_softmax_loss if kind == "softmax" else reference.nce_loss


@pytest.mark.parametrize(
    "kind,num_true,with_bias,hits,per_row,subtract_log_q",
    list(itertools.product(["softmax", "nce"], [1, 3], [True, False], [True, False], [False, True], [True, False])),
)
def test_matches_reference(device, kind, num_true, with_bias, hits, per_row, subtract_log_q):
    """Loss and gradients equal the reference for every kind, num_true, bias, hits, layout and log-Q option."""
    x, w, b, target, sv = sampled_problem(num_true=num_true, with_bias=with_bias, hits=hits, per_row=per_row,
                                          device=device, seed=num_true * 7 + hits)
    for remove in (True, False):
        kw = dict(remove_accidental_hits=remove, subtract_log_q=subtract_log_q)
        upstream = torch.rand(x.shape[0], device=device)
        got = loss_and_grads(fused(kind), x, w, b, target, sv, reduction="none", upstream=upstream, chunk_size=3,
                             **kw)
        want = loss_and_grads(ref(kind), x, w, b, target, sv, reduction="none", upstream=upstream, **kw)
        assert_all_close(got, want)


@pytest.mark.parametrize("per_row", [False, True])
def test_label_smoothing(device, per_row):
    """Label smoothing matches the reference, shared and per-row candidates."""
    x, w, b, target, sv = sampled_problem(num_true=2, per_row=per_row, device=device)
    kw = dict(label_smoothing=0.2)
    got = loss_and_grads(fused("softmax"), x, w, b, target, sv, chunk_size=4, **kw)
    want = loss_and_grads(ref("softmax"), x, w, b, target, sv, **kw)
    assert_all_close(got, want)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_row", [False, True])
def test_low_precision(device, kind, dtype, per_row):
    """bf16 / fp16 loss and gradients are within 4x PyTorch's own error of the fp64 oracle."""
    x, w, b, target, sv = sampled_problem(n=16, d=32, c=64, k=24, num_true=2, per_row=per_row, device=device)
    got = loss_and_grads(fused(kind), x.to(dtype), w.to(dtype), b.to(dtype), target, sv, chunk_size=5)
    same_precision = loss_and_grads(ref(kind), x.to(dtype), w.to(dtype), b.to(dtype), target, sv)
    oracle = loss_and_grads(ref(kind), x.double(), w.double(), b.double(), target,
                            (sv[0], sv[1].double(), sv[2].double()))
    assert_close_to_oracle(got, same_precision, oracle, slack=4.0, atol=0.0, rtol=1e-2)


def test_masked_columns_bf16_finite_and_zero_grad(device):
    """A row whose candidates are all masked stays finite in bf16 (no TensorFlow NaN)."""
    # Every candidate is a hit for row 0: TensorFlow returns NaN in bf16 here.
    x, w, b, _, _ = sampled_problem(n=3, c=10, device=device, dtype=torch.bfloat16)
    target = torch.tensor([[2], [5], [7]], device=device)
    sv = (torch.tensor([2, 2], device=device), torch.ones(3, 1, device=device), torch.ones(2, device=device))
    for fn in (fusedloss.sampled_softmax_loss, fusedloss.nce_loss):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xr, wr, target, None, b, sampled_values=sv, remove_accidental_hits=True, reduction="none")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(wr.grad).all() and torch.isfinite(xr.grad).all()
        if fn is fusedloss.sampled_softmax_loss:
            # Row 0 keeps only its true column: loss 0 and no gradient at all.
            assert loss[0].item() == 0.0 and (xr.grad[0] == 0).all()


@pytest.mark.parametrize("with_bias", [True, False])
def test_all_classes_sampled_equals_full_softmax(device, with_bias):
    """Sampling every class once without log Q is the full softmax cross-entropy."""
    x, w, b, target, _ = sampled_problem(n=9, c=23, with_bias=with_bias, device=device)
    c = w.shape[0]
    sv = (torch.arange(c, device=device), torch.ones(9, 1, device=device), torch.ones(c, device=device))
    got = loss_and_grads(fused("softmax"), x, w, b, target[:, 0], sv, subtract_log_q=False, chunk_size=5,
                         reduction="mean")

    def full(x, w, target, sv, b, reduction):
        return F.cross_entropy(F.linear(x, w, b), target, reduction=reduction)

    want = loss_and_grads(full, x, w, b, target[:, 0], sv, reduction="mean")
    assert_all_close(got, want)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_sparse_grad_equals_dense(device, per_row, kind):
    """sparse_grad=True gives coalesced gradients equal to the dense ones, on the touched rows only."""
    x, w, b, target, sv = sampled_problem(num_true=2, per_row=per_row, device=device)
    dense = loss_and_grads(fused(kind), x, w, b, target, sv, chunk_size=3)
    sparse = loss_and_grads(fused(kind), x, w, b, target, sv, chunk_size=3, sparse_grad=True)
    gw, gb = sparse[2], sparse[3]
    assert gw.is_sparse and gb.is_sparse
    # The op returns coalesced gradients (AccumulateGrad may drop the flag when it stores .grad).
    wr = w.clone().requires_grad_()
    (direct,) = torch.autograd.grad(fused(kind)(x, wr, target, sv, b, sparse_grad=True).sum(), wr)
    assert direct.is_coalesced()
    touched = torch.unique(torch.cat([target.flatten(), sv[0].flatten()]))
    assert torch.equal(direct.indices()[0], touched)
    assert_all_close(sparse[:2] + (gw.to_dense(), gb.to_dense()), dense, rtol=1e-6, atol=1e-6)
    # Untouched rows of the dense gradient are exactly zero.
    untouched = torch.ones(w.shape[0], dtype=torch.bool, device=device)
    untouched[touched] = False
    assert (dense[2][untouched] == 0).all()


def test_sparse_grad_deterministic(device):
    """Sparse gradients with many duplicate ids are deterministic."""
    x, w, b, target, sv = sampled_problem(n=32, num_true=2, k=40, c=12, device=device)  # many duplicates
    torch.use_deterministic_algorithms(True)
    try:
        first = loss_and_grads(fused("softmax"), x, w, b, target, sv, sparse_grad=True, chunk_size=7)
        second = loss_and_grads(fused("softmax"), x, w, b, target, sv, sparse_grad=True, chunk_size=7)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[2].to_dense(), second[2].to_dense())
    assert torch.equal(first[3].to_dense(), second[3].to_dense())


def test_sparse_grad_with_optimizer(device):
    """A sparse weight gradient works with torch.optim.SGD."""
    x, w, b, target, sv = sampled_problem(device=device)
    weight = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([weight], lr=0.1)
    fusedloss.sampled_softmax_loss(x, weight, target, None, sampled_values=sv, sparse_grad=True).backward()
    assert weight.grad.is_sparse
    opt.step()
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_in_batch_negatives(device, kind):
    """sampler='in_batch' uses the batch's targets as candidates and always masks a row's own."""
    x, w, b, target, _ = sampled_problem(n=8, c=6, device=device)  # few classes: repeated targets
    base = fusedloss.sampled_softmax_loss if kind == "softmax" else fusedloss.nce_loss
    got = loss_and_grads(lambda x, w, t, sv, b, **kw: base(x, w, t, None, b, sampler="in_batch", **kw),
                         x, w, b, target, None)
    sv = in_batch_candidates(target)
    counts = torch.bincount(target.flatten(), minlength=6).float()
    torch.testing.assert_close(sv[2], counts[target.flatten()])
    # The row's own target is always masked, also for NCE (whose default keeps hits).
    want = loss_and_grads(ref(kind), x, w, b, target, sv, remove_accidental_hits=True)
    assert_all_close(got, want)


def test_sampler_path_and_generator(device):
    """Drawing candidates with a seeded generator is reproducible; a sampler object works."""
    x, w, b, target, _ = sampled_problem(n=6, c=50, device=device)
    kw = dict(num_classes=50, generator=torch.Generator(device=device).manual_seed(3))
    first = fusedloss.sampled_softmax_loss(x, w, target, 12, b, **kw)
    kw["generator"] = torch.Generator(device=device).manual_seed(3)
    second = fusedloss.sampled_softmax_loss(x, w, target, 12, b, **kw)
    assert torch.equal(first, second) and torch.isfinite(first)
    sampler = fusedloss.samplers.UniformSampler(50)
    assert torch.isfinite(fusedloss.nce_loss(x, w, target, 12, b, sampler=sampler, unique=False))


def test_reductions_and_modules():
    """mean / sum are the mean / sum of 'none'; the modules equal the functions."""
    x, w, b, target, sv = sampled_problem(num_true=2)
    rows = fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv, reduction="none")
    assert rows.shape == (x.shape[0],)
    torch.testing.assert_close(fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv), rows.mean())
    torch.testing.assert_close(
        fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv, reduction="sum"), rows.sum())
    module = fusedloss.SampledSoftmaxLoss(w.shape[0], 10, label_smoothing=0.1)
    want = fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv, label_smoothing=0.1)
    torch.testing.assert_close(module(x, w, target, b, sampled_values=sv), want)
    nce = fusedloss.NCELoss(w.shape[0], 10, reduction="sum")
    torch.testing.assert_close(nce(x, w, target, b, sampled_values=sv),
                               fusedloss.nce_loss(x, w, target, None, b, sampled_values=sv, reduction="sum"))
    assert torch.isfinite(nce(x, w, target, b, generator=torch.Generator().manual_seed(0)))
    assert "num_classes=40" in repr(module)


def test_in_batch_module_and_autocast():
    """NCELoss(sampler='in_batch') equals the function; CPU autocast stays close to fp32."""
    x, w, b, target, _ = sampled_problem(n=8, c=6)
    module = fusedloss.NCELoss(6, sampler="in_batch")
    sv = in_batch_candidates(target)
    want = fusedloss.nce_loss(x, w, target, None, b, sampled_values=sv, remove_accidental_hits=True)
    torch.testing.assert_close(module(x, w, target, b), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv)
    torch.testing.assert_close(loss, fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv),
                               rtol=3e-2, atol=3e-2)


def test_extreme_logits():
    """Logits of ~1e3-1e4 give finite values close to the reference."""
    x, w, b, target, sv = sampled_problem(num_true=2)
    x = x * 300.0  # logits ~ +-1e3..1e4
    for kind in ("softmax", "nce"):
        got = loss_and_grads(fused(kind), x, w, b, target, sv, chunk_size=4)
        want = loss_and_grads(ref(kind), x, w, b, target, sv)
        for g in got:
            assert torch.isfinite(g).all()
        assert_all_close(got, want, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_gradcheck(device, per_row, kind):
    """fp64 gradients pass gradcheck, shared and per-row candidates."""
    x, w, b, target, sv = sampled_problem(n=4, d=5, c=9, k=6, num_true=2, per_row=per_row, dtype=torch.float64,
                                          device=device)
    sv = (sv[0], sv[1].double(), sv[2].double())
    kw = dict(label_smoothing=0.1) if kind == "softmax" else {}

    def f(x, w, b):
        return fused(kind)(x, w, target, sv, b, reduction="none", chunk_size=4, **kw)

    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_empty_candidates_and_rows(kind):
    """No candidates, or no rows, match the reference / give zero loss and gradients."""
    x, w, b, target, (s, tc, sc) = sampled_problem(num_true=2)
    empty = (s[:0], tc, sc[:0])
    got = loss_and_grads(fused(kind), x, w, b, target, empty, reduction="none")
    assert_all_close(got, loss_and_grads(ref(kind), x, w, b, target, empty, reduction="none"))
    loss, gx, gw, gb = loss_and_grads(fused(kind), x[:0], w, b, target[:0], (s, tc[:0], sc), reduction="mean")
    assert loss.item() == 0.0 and gx.shape == (0, x.shape[1]) and (gw == 0).all() and (gb == 0).all()


def test_large_chunking_default():
    """The default chunk size handles more candidates than one chunk."""
    # Default chunk sizing; more candidates than one CPU chunk would need for tiny N is fine.
    x, w, b, target, sv = sampled_problem(n=5, c=300, k=260, per_row=False)
    got = loss_and_grads(fused("softmax"), x, w, b, target, sv)
    want = loss_and_grads(ref("softmax"), x, w, b, target, sv)
    assert_all_close(got, want)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("per_row", [False, True])
def test_infinite_log_q_removes_a_column(device, kind, per_row):
    """A column whose log Q is +inf has logit -inf, which the op treats as a
    masked column: it adds no logit, is not counted (label smoothing's M) and
    gets exactly zero gradient — the same loss, statistics and gradients as
    without the column. fusedloss.distributed's owner-only scoring removes the
    columns of other ranks this way."""
    gen = torch.Generator().manual_seed(0)
    rows, dim, classes, k = 5, 4, 12, 6
    x, w, b = torch.randn(rows, dim, generator=gen), torch.randn(classes, dim, generator=gen), \
        torch.randn(classes, generator=gen)
    true = torch.randint(0, classes, (rows, 2), generator=gen)
    sampled = torch.randint(0, classes, (rows, k) if per_row else (k,), generator=gen)
    true_lq, sampled_lq = torch.rand(rows, 2, generator=gen), torch.rand(sampled.shape, generator=gen)
    removed_true, removed_sampled = true_lq.clone(), sampled_lq.clone()
    removed_true[:, 1] = float("inf")
    removed_sampled[..., 2] = float("inf")
    keep = [j for j in range(k) if j != 2]
    # Softmax at label_smoothing=1 (loss lse - mean of the live logits): the
    # true target term, which divides by num_true, does not enter.
    mode, smoothing = (0, 1.0) if kind == "softmax" else (1, 0.0)
    runs = []
    for args in ((true, sampled, removed_true, removed_sampled),
                 (true[:, :1], sampled[..., keep], true_lq[:, :1], sampled_lq[..., keep])):
        leaves = [t.to(device).requires_grad_() for t in (x, w, b)]
        loss, stats = torch.ops.fusedloss.sampled_forward(*leaves, *(t.to(device) for t in args), mode, 0, smoothing,
                                                          1.0, 2, False)
        loss.sum().backward()
        runs.append((loss.detach(), stats, *(t.grad for t in leaves)))
    for removed, absent in zip(*runs):
        torch.testing.assert_close(removed, absent, rtol=1e-6, atol=1e-6)
