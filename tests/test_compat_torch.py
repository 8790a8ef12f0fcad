"""fusedloss.compat.torch against torch's own F.linear_cross_entropy /
nn.LinearCrossEntropyLoss (torch >= 2.14) and F.cross_entropy(F.linear(...)):
same signatures, values, gradients, dtypes and errors."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from fusedloss.compat import torch as compat
from conftest import assert_all_close

pytestmark = pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="needs torch >= 2.14")


def problem(n, d, c, dtype, device, *, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    w = (torch.randn(c, d, generator=g, dtype=torch.float64) / d ** 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g).to(device)
    if ignore:
        t[::4] = -100
    cw = (torch.rand(c, generator=g, dtype=torch.float64) + 0.2).to(device, dtype)
    return x, w, b, t, cw


def value_and_grads(fn, leaves, *args, **kwargs):
    loss = fn(*args, **kwargs)
    grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
    return [loss.detach(), *grads]


def test_signatures_are_torchs():
    assert inspect.signature(compat.linear_cross_entropy) == inspect.signature(F.linear_cross_entropy)
    assert inspect.signature(compat.LinearCrossEntropyLoss) == inspect.signature(torch.nn.LinearCrossEntropyLoss)
    assert inspect.signature(compat.LinearCrossEntropyLoss.forward) == \
        inspect.signature(torch.nn.LinearCrossEntropyLoss.forward)


CASES = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"linear_bias": True},
    {"weight": True},
    {"weight": True, "label_smoothing": 0.2},
    {"weight": True, "label_smoothing": 0.1, "reduction": "sum", "linear_bias": True},
    {"weight": True, "reduction": "none"},
    {"label_smoothing": 0.3},
    {"ignore_index": -100},
    {"ignore_index": 3},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_equals_torch_fp64(device, case):
    """Loss and gradients equal torch's op and F.cross_entropy(F.linear(...)) in fp64."""
    x, w, b, t, cw = problem(23, 7, 50, torch.float64, device)
    if case.get("ignore_index") == 3:
        t[t == -100] = 3
    kwargs = dict(case)
    if kwargs.pop("linear_bias", False):
        kwargs["linear_bias"] = b
    if kwargs.pop("weight", False):
        kwargs["weight"] = cw
    leaves = (x, w, b)
    got = value_and_grads(compat.linear_cross_entropy, leaves, x, w, t, **kwargs)
    expected = value_and_grads(F.linear_cross_entropy, leaves, x, w, t, **kwargs)
    ce_kwargs = {k: v for k, v in kwargs.items() if k != "linear_bias"}
    composite = value_and_grads(lambda: F.cross_entropy(F.linear(x, w, kwargs.get("linear_bias")), t, **ce_kwargs),
                                leaves)
    for reference in (expected, composite):
        assert_all_close(got, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_low_precision(device, dtype):
    """The loss comes back in the input's dtype, within that dtype's rounding of torch's."""
    x, w, b, t, cw = problem(64, 32, 1000, dtype, device)
    got = compat.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1)
    expected = F.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1)
    assert got.dtype == expected.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_all_close(got, expected, **tol)


def test_unbatched_input_and_all_ignored(device):
    """1-D input with a 0-dim target; every target ignored gives torch's NaN
    mean with zero gradients."""
    x, w, b, t, cw = problem(1, 5, 9, torch.float64, device, ignore=False)
    for reduction in ("mean", "none"):
        got = compat.linear_cross_entropy(x[0], w, t[0], linear_bias=b, reduction=reduction)
        expected = F.linear_cross_entropy(x[0], w, t[0], linear_bias=b, reduction=reduction)
        assert got.shape == expected.shape == ()
        assert_all_close(got, expected, rtol=1e-12, atol=1e-12)
    x, w, b, t, cw = problem(6, 5, 9, torch.float64, device)
    t.fill_(-100)
    for weight in (None, cw):
        got = value_and_grads(compat.linear_cross_entropy, (x, w), x, w, t, weight=weight)
        expected = value_and_grads(F.linear_cross_entropy, (x, w), x, w, t, weight=weight)
        assert got[0].isnan() and expected[0].isnan()
        assert_all_close(got[1:], expected[1:], rtol=0, atol=0)


def test_torch_only_inputs_are_torchs(device):
    """Class-probability targets, a K-dimensional linear_weight and int32
    targets are torch's own (results and errors)."""
    x, w, b, t, cw = problem(8, 5, 6, torch.float64, device)
    probs = torch.rand(8, 6, dtype=torch.float64, device=device).softmax(-1)
    assert_all_close(compat.linear_cross_entropy(x, w, probs, label_smoothing=0.1),
                     F.linear_cross_entropy(x, w, probs, label_smoothing=0.1), rtol=0, atol=0)
    wk = torch.randn(6, 3, 5, dtype=torch.float64, device=device)
    tk = torch.randint(0, 6, (8, 3), device=device)
    assert_all_close(compat.linear_cross_entropy(x, wk, tk), F.linear_cross_entropy(x, wk, tk), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="expected target dtype to be Long"):
        compat.linear_cross_entropy(x, w, t.int().clamp(min=0))


@pytest.mark.parametrize("kwargs, error", [
    (dict(reduction="batchmean"), ValueError),
    (dict(label_smoothing=1.5), RuntimeError),
    (dict(weight="cw64"), RuntimeError),
    (dict(input="3d"), RuntimeError),
    (dict(target="out-of-range"), IndexError),
])
def test_errors_are_torchs(kwargs, error):
    x, w, b, t, cw = problem(4, 3, 5, torch.float32, "cpu")
    args = dict(input=x, linear_weight=w, target=t)
    if kwargs.pop("weight", None):
        kwargs["weight"] = cw.double()
    if kwargs.pop("input", None):
        args["input"] = x[None]
    if kwargs.pop("target", None):
        args["target"] = t.clamp(min=0) + 5
    for fn in (compat.linear_cross_entropy, F.linear_cross_entropy):
        with pytest.raises(error):
            fn(args["input"], args["linear_weight"], args["target"], **kwargs)


def test_module_is_torchs_with_a_fused_forward(device):
    """Same constructor, parameters and state dict as nn.LinearCrossEntropyLoss;
    loss(input, target) equals torch's module loaded with the same weights."""
    kwargs = dict(bias=True, dtype=torch.float64, device=device, weight=torch.rand(30, dtype=torch.float64,
                  device=device) + 0.5, label_smoothing=0.1)
    ours, theirs = compat.LinearCrossEntropyLoss(7, 30, **kwargs), torch.nn.LinearCrossEntropyLoss(7, 30, **kwargs)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(11, 7, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 30, (11,), device=device)
    t[3] = -100
    got = value_and_grads(ours, [x, *ours.parameters()], x, t)
    expected = value_and_grads(theirs, [x, *theirs.parameters()], x, t)
    assert_all_close(got, expected, rtol=1e-10, atol=1e-12)


def test_compile_fullgraph(device):
    x, w, b, t, cw = problem(12, 8, 40, torch.float32, device)

    def fn(x, w, b):
        return compat.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, label_smoothing=0.1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_all_close(value_and_grads(compiled, (x, w, b), x, w, b), value_and_grads(fn, (x, w, b), x, w, b),
                     rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
