"""Fused sampled softmax / NCE vs the gather + matmul reference: values and all
gradients, shared and per-row candidates, masking, sparse gradients, bad inputs,
opcheck, gradcheck and torch.compile."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference
from fusedloss.sampled import in_batch_candidates

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
ops = torch.ops.fusedloss


def make_problem(n=7, d=12, c=40, num_true=1, k=10, *, dtype=torch.float32, device="cpu", per_row=False,
                 with_bias=True, hits=True, dups=True, seed=0):
    """Random problem with explicit sampled values. With ``hits`` some candidates
    equal true classes; with ``dups`` some candidate ids repeat."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(c, d, generator=g) * 0.5
    b = torch.randn(c, generator=g) * 0.3 if with_bias else None
    target = torch.randint(0, c, (n, num_true), generator=g)
    shape = (n, k) if per_row else (k,)
    sampled = torch.randint(0, c, shape, generator=g)
    if not hits:
        # Candidates from a class range the targets never use.
        target = torch.randint(0, c // 2, (n, num_true), generator=g)
        sampled = torch.randint(c // 2, c, shape, generator=g)
    elif per_row:
        sampled[:, 0] = target[:, 0]
        sampled[: n // 2, 3] = target[: n // 2, -1]
    else:
        sampled[1] = target[0, 0]
        sampled[4] = target[2, -1]
    if dups:
        if per_row:
            sampled[:, 5] = sampled[:, 0]
        else:
            sampled[k - 3] = sampled[1]
            sampled[k - 2] = sampled[2]
    true_count = torch.rand(n, num_true, generator=g) + 0.1
    sampled_count = torch.rand(shape, generator=g) * 2 + 0.05
    to = dict(device=device)
    sv = (sampled.to(**to), true_count.to(**to), sampled_count.to(**to))
    return (x.to(device, dtype), w.to(device, dtype), None if b is None else b.to(device, dtype), target.to(device), sv)


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


def assert_close_all(got, want, rtol=1e-5, atol=1e-5):
    for g, e in zip(got, want):
        if e is None:
            assert g is None
            continue
        torch.testing.assert_close(g.to(e.dtype), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind,num_true,with_bias,hits,per_row,subtract_log_q",
    list(itertools.product(["softmax", "nce"], [1, 3], [True, False], [True, False], [False, True], [True, False])),
)
def test_matches_reference(device, kind, num_true, with_bias, hits, per_row, subtract_log_q):
    x, w, b, target, sv = make_problem(num_true=num_true, with_bias=with_bias, hits=hits, per_row=per_row,
                                       device=device, seed=num_true * 7 + hits)
    for remove in (True, False):
        kw = dict(remove_accidental_hits=remove, subtract_log_q=subtract_log_q)
        upstream = torch.rand(x.shape[0], device=device)
        got = loss_and_grads(fused(kind), x, w, b, target, sv, reduction="none", upstream=upstream, chunk_size=3,
                             **kw)
        want = loss_and_grads(ref(kind), x, w, b, target, sv, reduction="none", upstream=upstream, **kw)
        assert_close_all(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [False, True])
def test_label_smoothing(device, per_row):
    x, w, b, target, sv = make_problem(num_true=2, per_row=per_row, device=device)
    kw = dict(label_smoothing=0.2)
    got = loss_and_grads(fused("softmax"), x, w, b, target, sv, chunk_size=4, **kw)
    want = loss_and_grads(ref("softmax"), x, w, b, target, sv, **kw)
    assert_close_all(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_row", [False, True])
def test_low_precision(device, kind, dtype, per_row):
    x, w, b, target, sv = make_problem(n=16, d=32, c=64, k=24, num_true=2, per_row=per_row, device=device)
    got = loss_and_grads(fused(kind), x.to(dtype), w.to(dtype), b.to(dtype), target, sv, chunk_size=5)
    same_precision = loss_and_grads(ref(kind), x.to(dtype), w.to(dtype), b.to(dtype), target, sv)
    oracle = loss_and_grads(ref(kind), x.double(), w.double(), b.double(), target,
                            (sv[0], sv[1].double(), sv[2].double()))
    for g, s, o in zip(got, same_precision, oracle):
        assert torch.isfinite(g).all()
        err, ref_err = (g.double() - o).abs().max(), (s.double() - o).abs().max()
        assert err <= 4 * ref_err + 1e-2 * o.abs().max(), (err, ref_err)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_columns_bf16_finite_and_zero_grad(device):
    # Every candidate is a hit for row 0: TensorFlow returns NaN in bf16 here.
    x, w, b, _, _ = make_problem(n=3, c=10, device=device, dtype=torch.bfloat16)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_all_classes_sampled_equals_full_softmax(device, with_bias):
    x, w, b, target, _ = make_problem(n=9, c=23, with_bias=with_bias, device=device)
    c = w.shape[0]
    sv = (torch.arange(c, device=device), torch.ones(9, 1, device=device), torch.ones(c, device=device))
    got = loss_and_grads(fused("softmax"), x, w, b, target[:, 0], sv, subtract_log_q=False, chunk_size=5,
                         reduction="mean")

    def full(x, w, target, sv, b, reduction):
        return F.cross_entropy(F.linear(x, w, b), target, reduction=reduction)

    want = loss_and_grads(full, x, w, b, target[:, 0], sv, reduction="mean")
    assert_close_all(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_sparse_grad_equals_dense(device, per_row, kind):
    x, w, b, target, sv = make_problem(num_true=2, per_row=per_row, device=device)
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
    assert_close_all(sparse[:2] + (gw.to_dense(), gb.to_dense()), dense, rtol=1e-6, atol=1e-6)
    # Untouched rows of the dense gradient are exactly zero.
    untouched = torch.ones(w.shape[0], dtype=torch.bool, device=device)
    untouched[touched] = False
    assert (dense[2][untouched] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_grad_deterministic(device):
    x, w, b, target, sv = make_problem(n=32, num_true=2, k=40, c=12, device=device)  # many duplicates
    torch.use_deterministic_algorithms(True)
    try:
        first = loss_and_grads(fused("softmax"), x, w, b, target, sv, sparse_grad=True, chunk_size=7)
        second = loss_and_grads(fused("softmax"), x, w, b, target, sv, sparse_grad=True, chunk_size=7)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first[2].to_dense(), second[2].to_dense())
    assert torch.equal(first[3].to_dense(), second[3].to_dense())


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_grad_with_optimizer(device):
    x, w, b, target, sv = make_problem(device=device)
    weight = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([weight], lr=0.1)
    fusedloss.sampled_softmax_loss(x, weight, target, None, sampled_values=sv, sparse_grad=True).backward()
    assert weight.grad.is_sparse
    opt.step()
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_in_batch_negatives(device, kind):
    x, w, b, target, _ = make_problem(n=8, c=6, device=device)  # few classes: repeated targets
    base = fusedloss.sampled_softmax_loss if kind == "softmax" else fusedloss.nce_loss
    got = loss_and_grads(lambda x, w, t, sv, b, **kw: base(x, w, t, None, b, sampler="in_batch", **kw),
                         x, w, b, target, None)
    sv = in_batch_candidates(target)
    counts = torch.bincount(target.flatten(), minlength=6).float()
    torch.testing.assert_close(sv[2], counts[target.flatten()])
    # The row's own target is always masked, also for NCE (whose default keeps hits).
    want = loss_and_grads(ref(kind), x, w, b, target, sv, remove_accidental_hits=True)
    assert_close_all(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_path_and_generator(device):
    x, w, b, target, _ = make_problem(n=6, c=50, device=device)
    kw = dict(num_classes=50, generator=torch.Generator(device=device).manual_seed(3))
    first = fusedloss.sampled_softmax_loss(x, w, target, 12, b, **kw)
    kw["generator"] = torch.Generator(device=device).manual_seed(3)
    second = fusedloss.sampled_softmax_loss(x, w, target, 12, b, **kw)
    assert torch.equal(first, second) and torch.isfinite(first)
    sampler = fusedloss.samplers.UniformSampler(50)
    assert torch.isfinite(fusedloss.nce_loss(x, w, target, 12, b, sampler=sampler, unique=False))


def test_reductions_and_modules():
    x, w, b, target, sv = make_problem(num_true=2)
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
    x, w, b, target, _ = make_problem(n=8, c=6)
    module = fusedloss.NCELoss(6, sampler="in_batch")
    sv = in_batch_candidates(target)
    want = fusedloss.nce_loss(x, w, target, None, b, sampled_values=sv, remove_accidental_hits=True)
    torch.testing.assert_close(module(x, w, target, b), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv)
    torch.testing.assert_close(loss, fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv),
                               rtol=3e-2, atol=3e-2)


def test_extreme_logits():
    x, w, b, target, sv = make_problem(num_true=2)
    x = x * 300.0  # logits ~ +-1e3..1e4
    for kind in ("softmax", "nce"):
        got = loss_and_grads(fused(kind), x, w, b, target, sv, chunk_size=4)
        want = loss_and_grads(ref(kind), x, w, b, target, sv)
        for g in got:
            assert torch.isfinite(g).all()
        assert_close_all(got, want, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_gradcheck(device, per_row, kind):
    x, w, b, target, sv = make_problem(n=4, d=5, c=9, k=6, num_true=2, per_row=per_row, dtype=torch.float64,
                                       device=device)
    sv = (sv[0], sv[1].double(), sv[2].double())
    kw = dict(label_smoothing=0.1) if kind == "softmax" else {}

    def f(x, w, b):
        return fused(kind)(x, w, target, sv, b, reduction="none", chunk_size=4, **kw)

    inputs = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("hit_mask", [0, 1, 2])
def test_opcheck(device, per_row, hit_mask):
    if per_row and hit_mask == 2:
        pytest.skip("last-copy masking needs shared candidates")
    x, w, b, target, sv = make_problem(num_true=2, per_row=per_row, device=device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), target, sv[0], sv[1].log(), sv[2].log(), 0,
            hit_mask, 0.1, 1.0, 3, False)
    torch.library.opcheck(ops.sampled_forward.default, args)
    nce_args = args[:7] + (1, hit_mask, 0.0, 0.5, 3, False)
    torch.library.opcheck(ops.sampled_forward.default, nce_args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,per_row", [("softmax", False), ("nce", True)])
def test_torch_compile_fullgraph(device, kind, per_row):
    x, w, b, target, sv = make_problem(num_true=2, per_row=per_row, device=device)

    def f(x, w, b):
        return fused(kind)(x, w, target, sv, b, chunk_size=4, reduction="mean")

    compiled = torch.compile(f, fullgraph=True)
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    ys = [t.clone().requires_grad_() for t in (x, w, b)]
    loss_c, loss_e = compiled(*xs), f(*ys)
    torch.testing.assert_close(loss_c, loss_e)
    loss_c.backward()
    loss_e.backward()
    for a, e in zip(xs, ys):
        torch.testing.assert_close(a.grad, e.grad)


@pytest.mark.filterwarnings("ignore:Error detected")
def test_torch_compile_sparse_grad_is_a_clear_error():
    x, w, b, target, sv = make_problem()
    w = w.clone().requires_grad_()

    def f(x, w):
        return fusedloss.sampled_softmax_loss(x, w, target, None, sampled_values=sv, sparse_grad=True)

    with pytest.raises(Exception, match="sparse_grad=True is not supported under torch.compile"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(x, w).backward()


@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_empty_candidates_and_rows(kind):
    x, w, b, target, (s, tc, sc) = make_problem(num_true=2)
    empty = (s[:0], tc, sc[:0])
    got = loss_and_grads(fused(kind), x, w, b, target, empty, reduction="none")
    assert_close_all(got, loss_and_grads(ref(kind), x, w, b, target, empty, reduction="none"))
    loss, gx, gw, gb = loss_and_grads(fused(kind), x[:0], w, b, target[:0], (s, tc[:0], sc), reduction="mean")
    assert loss.item() == 0.0 and gx.shape == (0, x.shape[1]) and (gw == 0).all() and (gb == 0).all()


def test_large_chunking_default():
    # Default chunk sizing; more candidates than one CPU chunk would need for tiny N is fine.
    x, w, b, target, sv = make_problem(n=5, c=300, k=260, per_row=False)
    got = loss_and_grads(fused("softmax"), x, w, b, target, sv)
    want = loss_and_grads(ref("softmax"), x, w, b, target, sv)
    assert_close_all(got, want)


# ---------------------------------------------------------------- bad inputs


def call(**overrides):
    x, w, b, target, sv = make_problem(num_true=2)
    kw = dict(input=x, weight=w, target=target, num_sampled=None, bias=b, sampled_values=sv)
    kw.update(overrides)
    return fusedloss.sampled_softmax_loss(**kw)


def test_bad_targets():
    with pytest.raises(IndexError, match="target"):
        call(target=torch.full((7, 2), 40))
    with pytest.raises(IndexError, match="target"):
        call(target=torch.full((7, 2), -1))
    with pytest.raises(ValueError, match="target must be"):
        call(target=torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="target"):
        call(target=torch.zeros(7, 2))


def test_bad_sampled_values():
    x, w, b, target, (s, tc, sc) = make_problem(num_true=2)
    with pytest.raises(IndexError, match="sampled"):
        call(sampled_values=(s + 40, tc, sc))
    with pytest.raises(ValueError, match=r"sampled_values\[2\]"):
        call(sampled_values=(s, tc, sc[:-1]))
    with pytest.raises(ValueError, match=r"sampled_values\[1\]"):
        call(sampled_values=(s, tc[:, :1].expand(7, 3), sc))
    with pytest.raises(ValueError, match=r"sampled_values\[1\]"):
        call(sampled_values=(s, tc[:5], sc))
    with pytest.raises(ValueError, match=r"sampled_values\[0\]"):
        call(sampled_values=(s.view(2, 5), tc, sc.view(2, 5)))
    with pytest.raises(TypeError, match="expected counts"):
        call(sampled_values=(s, tc.long(), sc))
    with pytest.raises(ValueError, match="tuple"):
        call(sampled_values=(s, tc))


def test_bad_shapes_and_dtypes():
    x, w, b, target, sv = make_problem(num_true=2)
    with pytest.raises(ValueError, match="input must be"):
        call(input=x[0])
    with pytest.raises(ValueError, match="D="):
        call(weight=w[:, :5])
    with pytest.raises(TypeError, match="weight dtype"):
        call(weight=w.double())
    with pytest.raises(ValueError, match="bias must be"):
        call(bias=b[:-1])
    with pytest.raises(TypeError, match="bias dtype"):
        call(bias=b.double())
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        call(label_smoothing=1.5)
    with pytest.raises(ValueError, match="num_sampled"):
        call(sampled_values=None)
    with pytest.raises(ValueError, match="range is too small"):
        call(sampled_values=None, num_sampled=41)
    with pytest.raises(ValueError, match="sampler"):
        call(sampled_values=None, num_sampled=4, sampler="zipf")
    with pytest.raises(TypeError, match="input"):
        call(input=x.numpy())


def test_bad_op_arguments():
    x, w, b, target, sv = make_problem(num_true=2, per_row=True)
    base = [x, w, b, target, sv[0], None, None, 0, 2, 0.0, 1.0, 0, False]
    with pytest.raises(ValueError, match="last-copy"):
        ops.sampled_forward(*base)
    base[8] = 5
    with pytest.raises(ValueError, match="hit_mask"):
        ops.sampled_forward(*base)
    base[8], base[5] = 1, torch.zeros(7, 3)
    with pytest.raises(ValueError, match="true_log_q"):
        ops.sampled_forward(*base)
    base[5], base[9], base[7] = None, 0.1, 1
    with pytest.raises(ValueError, match="label_smoothing applies"):
        ops.sampled_forward(*base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bad_devices():
    x, w, b, target, sv = make_problem(num_true=2)
    with pytest.raises(ValueError, match="device|on cuda|on cpu"):
        call(input=x.cuda(), weight=w.cuda(), bias=b.cuda())
    with pytest.raises(ValueError, match="sampled_values"):
        call(input=x.cuda(), weight=w.cuda(), bias=b.cuda(), target=target.cuda())
