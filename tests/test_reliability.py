"""Regression tests of the adversarial-probe defects (issue 11): each failed
before its fix. Sampler defects live in test_reliability_samplers.py."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedloss
from fusedloss import distributed as fdist
from fusedloss import reference

CHUNKED = dict(chunk_size=5)  # the recompute path, several chunks
PATHS = {"single_pass": {}, "chunked": CHUNKED}


@pytest.fixture
def one_rank_group(tmp_path):
    """A world of one gloo rank in this process: the distributed ops' code
    paths without spawning."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(loss, tensors):
    loss.backward()
    return [t.grad for t in tensors]


# --- 1. a strided target -------------------------------------------------------


@pytest.mark.parametrize("rows", [7, 200_000])
@pytest.mark.parametrize("path", PATHS)
def test_strided_target_equals_contiguous(rows, path):
    torch.manual_seed(0)
    x, w = torch.randn(rows, 4), torch.randn(16, 4)
    pairs = torch.randint(0, 16, (rows, 2))
    strided = pairs[:, 1]
    assert not strided.is_contiguous()
    results = []
    for target in (strided, strided.contiguous()):
        xl, wl = _leaves(x, w)
        loss = fusedloss.linear_cross_entropy(xl, wl, target, **PATHS[path])
        results.append((loss, *_grads(loss, (xl, wl))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_strided_target_distributed(one_rank_group):
    x, w = torch.randn(9, 4), torch.randn(16, 4)
    strided = torch.randint(0, 16, (9, 2))[:, 0]
    loss = fdist.linear_cross_entropy(x, w, strided, vocab_start=0)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.T, strided))


# --- 2. tensors on different devices, meta tensors --------------------------------


def test_meta_weight_with_cpu_input_is_a_device_error():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"weight is on meta but input is on cpu"):
        fusedloss.linear_cross_entropy(x, torch.empty(5, 3, device="meta"), y)
    with pytest.raises(ValueError, match=r"bias is on meta but input is on cpu"):
        fusedloss.linear_cross_entropy(x, torch.randn(5, 3), y, torch.empty(5, device="meta"))
    with pytest.raises(ValueError, match=r"meta"):
        fusedloss.sampled_softmax_loss(x, torch.empty(5, 3, device="meta"), y, 2)
    with pytest.raises(ValueError, match=r"meta"):
        fusedloss.info_nce_loss(x, torch.empty(4, 3, device="meta"))


def test_all_meta_inputs_run_as_a_fake_pass():
    x = torch.empty(6, 3, device="meta", requires_grad=True)
    w = torch.empty(5, 3, device="meta", requires_grad=True)
    y = torch.empty(6, dtype=torch.long, device="meta")
    loss = fusedloss.linear_cross_entropy(x, w, y)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    rows = fusedloss.linear_cross_entropy(x, w, y, reduction="none")
    assert rows.shape == (6,)
    clip = fusedloss.clip_loss(torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta"), 10.0)
    assert clip.device.type == "meta"


# --- 3. -inf logits --------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_vocabulary_masked_through_the_bias(path):
    torch.manual_seed(1)
    x, w = torch.randn(8, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    b = torch.zeros(12, dtype=torch.float64)
    b[7:] = -math.inf
    y = torch.randint(0, 7, (8,))
    xl, wl = _leaves(x, w)
    loss = fusedloss.linear_cross_entropy(xl, wl, y, b, **PATHS[path])
    gx, gw = _grads(loss, (xl, wl))
    xr, wr = _leaves(x, w)
    ref = F.cross_entropy(xr @ wr.T + b, y)
    rx, rw = _grads(ref, (xr, wr))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_target_at_a_minus_inf_logit_makes_only_its_row_inf():
    x, w = torch.randn(5, 4), torch.randn(9, 4)
    b = torch.zeros(9)
    b[3] = -math.inf
    y = torch.tensor([3, 0, 1, 2, 4])
    rows = fusedloss.linear_cross_entropy(x, w, y, b, reduction="none")
    ref = F.cross_entropy(x @ w.T + b, y, reduction="none")
    assert rows[0] == math.inf
    torch.testing.assert_close(rows[1:], ref[1:])


def test_label_smoothing_with_minus_inf_columns_is_inf_like_torch():
    # Documented: a -inf column takes eps/V of the target mass, so the smoothed
    # loss is +inf, as F.cross_entropy says; the gradients stay finite.
    x, w = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4)
    b = torch.zeros(9)
    b[6:] = -math.inf
    y = torch.randint(0, 6, (5,))
    loss = fusedloss.linear_cross_entropy(x, w, y, b, label_smoothing=0.1)
    assert loss == F.cross_entropy(x @ w.T + b, y, label_smoothing=0.1) == math.inf
    loss.backward()
    assert torch.isfinite(x.grad).all()


# --- 4. double backward ----------------------------------------------------------


def _double_backward_cases():
    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    yield "linear_ce_single_pass", lambda: fusedloss.linear_cross_entropy(x, w, y), x
    yield "linear_ce_chunked", lambda: fusedloss.linear_cross_entropy(x, w, y, chunk_size=3), x
    yield "linear_ce_none", lambda: fusedloss.linear_cross_entropy(x, w, y, reduction="none").sum(), x
    yield "sampled_softmax", lambda: fusedloss.sampled_softmax_loss(x, w, y, 4), x
    yield "nce", lambda: fusedloss.nce_loss(x, w, y, 4), x
    q, k = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    yield "info_nce", lambda: fusedloss.info_nce_loss(q, k), q
    yield "clip", lambda: fusedloss.clip_loss(q, k, 10.0), k
    yield "nt_xent", lambda: fusedloss.nt_xent_loss(torch.cat([q, k])), q


@pytest.mark.parametrize("name,loss_fn,wrt", list(_double_backward_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_double_backward_raises_instead_of_dropping_the_second_order_term(name, loss_fn, wrt):
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss_fn(), wrt, create_graph=True)
    # Without create_graph the same call works.
    (grad,) = torch.autograd.grad(loss_fn(), wrt)
    assert torch.isfinite(grad).all()


def test_double_backward_raises_distributed(one_rank_group):
    x, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4)
    loss = fdist.linear_cross_entropy(x, w, torch.randint(0, 10, (6,)), vocab_start=0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


# --- 5. reentrant backward, gradcheck on the default path --------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_repeated_backwards_are_bit_identical(dtype):
    torch.manual_seed(2)
    x = torch.randn(300, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(50, dtype=dtype, requires_grad=True)
    loss = fusedloss.linear_cross_entropy(x, w, torch.randint(0, 50, (300,)), b, label_smoothing=0.1, z_loss=1e-3)
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    first = [g.clone() for g in first]
    for _ in range(2):
        again = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_)


def test_gradcheck_default_path_default_tolerances():
    torch.manual_seed(3)
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (12,))
    y[[3, 7]] = -100
    for kw in ({}, dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0), dict(reduction="sum")):
        assert torch.autograd.gradcheck(lambda x, w, b: fusedloss.linear_cross_entropy(x, w, y, b, **kw), (x, w, b))


# --- 8. gradient precision at large logits ------------------------------------------


def _rel_err(a, oracle):
    return ((a.double() - oracle).norm() / oracle.norm()).item()


def _exact_problem(rows, classes, dim, seed):
    """Operands whose logits x @ W.T + 1e4 are exact in fp32 (multiples of 1/4
    near 1e4, where the fp32 ulp is 2^-10), so the fp32 reference is accurate
    and any error of the fused op is its own."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (rows, dim), generator=gen).double() / 2
    w = torch.randint(-4, 5, (classes, dim), generator=gen).double() / 2
    return x, w, torch.full((classes,), 1e4, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
def test_linear_ce_gradient_precision_at_logits_of_1e4(path):
    x64, w64, b64 = _exact_problem(64, 40, 32, seed=4)
    y = torch.randint(0, 40, (64,))
    results = {}
    for name, fn, dtype in (("oracle", reference.linear_cross_entropy, torch.float64),
                            ("reference", reference.linear_cross_entropy, torch.float32),
                            ("fused", fusedloss.linear_cross_entropy, torch.float32)):
        x, w = _leaves(x64.to(dtype), w64.to(dtype))
        kw = PATHS[path] if name == "fused" else {}
        results[name] = _grads(fn(x, w, y, b64.to(dtype), **kw), (x, w))
    for i, what in enumerate(("dX", "dW")):
        oracle = results["oracle"][i]
        ref_err, err = _rel_err(results["reference"][i], oracle), _rel_err(results["fused"][i], oracle)
        assert err <= 4 * ref_err + 1e-6, f"{what}: {err:.3g} vs fp32 reference {ref_err:.3g}"


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_gradient_precision_at_temperature_1e_3(symmetric):
    torch.manual_seed(5)
    q64, k64 = torch.randn(48, 16, dtype=torch.float64), torch.randn(48, 16, dtype=torch.float64)
    results = {}
    for name, fn, dtype in (("oracle", reference.info_nce_loss, torch.float64),
                            ("reference", reference.info_nce_loss, torch.float32),
                            ("fused", fusedloss.info_nce_loss, torch.float32)):
        q, k = _leaves(q64.to(dtype), k64.to(dtype))
        results[name] = _grads(fn(q, k, temperature=1e-3, symmetric=symmetric), (q, k))
    for i, what in enumerate(("dQ", "dK")):
        oracle = results["oracle"][i]
        ref_err, err = _rel_err(results["reference"][i], oracle), _rel_err(results["fused"][i], oracle)
        assert err <= 4 * ref_err + 1e-6, f"{what}: {err:.3g} vs fp32 reference {ref_err:.3g}"


def test_sampled_softmax_gradient_precision_at_large_logits():
    # The fp32 plain-PyTorch twin itself loses ~2e-4 here (it gathers, adds
    # the bias and masks in fp32 before its log-softmax), so the bound is
    # absolute: the fused op is within fp32 rounding of the fp64 oracle.
    x64, w64, b64 = _exact_problem(64, 60, 32, seed=6)
    y = torch.randint(0, 60, (64,), generator=torch.Generator().manual_seed(6))
    values = (torch.randperm(60, generator=torch.Generator().manual_seed(7))[:20], torch.ones(64, 1), torch.ones(20))
    grads = {}
    for dtype in (torch.float64, torch.float32):
        x, w = _leaves(x64.to(dtype), w64.to(dtype))
        loss = fusedloss.sampled_softmax_loss(x, w, y, 20, b64.to(dtype), sampled_values=values, subtract_log_q=False)
        grads[dtype] = _grads(loss, (x, w))
    for what, fp32, oracle in zip(("dX", "dW"), grads[torch.float32], grads[torch.float64]):
        assert _rel_err(fp32, oracle) <= 1e-6, what


# --- 9. ignored rows holding inf / NaN ---------------------------------------------


@pytest.mark.parametrize("poison", [math.inf, math.nan])
@pytest.mark.parametrize("path", PATHS)
def test_ignored_padding_row_cannot_poison_a_step(path, poison):
    torch.manual_seed(7)
    x, w, b = torch.randn(6, 4), torch.randn(11, 4), torch.randn(11)
    y = torch.tensor([1, -100, 3, 4, -100, 10])
    poisoned = x.clone()
    poisoned[1] = poison
    poisoned[4, 2] = poison
    clean = x.clone()
    clean[[1, 4]] = 0
    results = []
    for inp in (poisoned, clean):
        xl, wl, bl = _leaves(inp, w, b)
        loss = fusedloss.linear_cross_entropy(xl, wl, y, bl, **PATHS[path])
        results.append((loss, *_grads(loss, (xl, wl, bl))))
    (loss, gx, gw, gb), (ref_loss, rx, rw, rb) = results
    assert torch.isfinite(loss) and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert torch.equal(gx[[1, 4]], torch.zeros(2, 4))
    for a, r in ((loss, ref_loss), (gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


def test_ignored_padding_row_cannot_poison_a_step_distributed(one_rank_group):
    x, w = torch.randn(4, 3), torch.randn(7, 3, requires_grad=True)
    x[2] = math.nan
    x.requires_grad_(True)
    loss = fdist.linear_cross_entropy(x, w, torch.tensor([1, 2, -100, 5]), vocab_start=0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(w.grad).all()
    assert torch.equal(x.grad[2], torch.zeros(3))


@pytest.mark.parametrize("per_row", [False, True])
def test_sampled_row_with_zero_upstream_gradient_cannot_poison_a_step(per_row):
    torch.manual_seed(8)
    x, w = torch.randn(5, 4), torch.randn(30, 4, requires_grad=True)
    x[3] = math.inf
    x.requires_grad_(True)
    y = torch.randint(0, 30, (5,))
    sampled = torch.randint(0, 30, (5, 6) if per_row else (6,))
    values = (sampled, torch.ones(5, 1), torch.ones(sampled.shape))
    rows = fusedloss.sampled_softmax_loss(x, w, y, 6, sampled_values=values, reduction="none")
    weights = torch.ones(5)
    weights[3] = 0
    (rows[torch.arange(5) != 3] * weights[torch.arange(5) != 3]).sum().backward()
    assert torch.isfinite(w.grad).all()
    assert torch.equal(x.grad[3], torch.zeros(4))


# --- argument checks --------------------------------------------------------------


def test_transposed_weight_is_a_shape_error():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"input has D=3 features but weight has D=50 \(weight must be \[num_classes, D\], not transposed\)"):
        fusedloss.linear_cross_entropy(x, torch.randn(3, 50), y)


@pytest.mark.parametrize("weight", [None, [[1.0]]])
def test_weight_must_be_a_tensor(weight):
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        fusedloss.linear_cross_entropy(torch.randn(2, 1), weight, torch.tensor([0, 0]))


def test_zero_features_is_a_value_error():
    with pytest.raises(ValueError, match=r"no features \(D=0\)"):
        fusedloss.linear_cross_entropy(torch.randn(4, 0), torch.randn(5, 0), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("name,value", [("softcap", math.inf), ("softcap", math.nan), ("z_loss", math.nan),
                                        ("z_loss", math.inf), ("label_smoothing", math.nan)])
def test_non_finite_linear_ce_options(name, value):
    with pytest.raises(ValueError, match=name):
        fusedloss.linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), **{name: value})


@pytest.mark.parametrize("value", [math.inf, math.nan, torch.tensor(math.inf), torch.tensor(math.nan)])
def test_non_finite_temperature_and_logit_scale(value):
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        fusedloss.info_nce_loss(q, k, temperature=value)
    with pytest.raises(ValueError, match="logit_scale"):
        fusedloss.clip_loss(q, k, value)


def test_float_chunk_and_tile_sizes_are_type_errors():
    x, w, y = torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="chunk_size"):
        fusedloss.linear_cross_entropy(x, w, y, chunk_size=2.0)
    with pytest.raises(TypeError, match="tile_size"):
        fusedloss.info_nce_loss(x, x, tile_size=2.5)
