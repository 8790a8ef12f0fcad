"""Shared test helpers: the device list, the problem builders several files
use, and the comparison helpers (plain tolerance and low precision vs an fp64
oracle)."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


# ------------------------------------------------------------- problem builders


def linear_ce_problem(n, d, v, dtype, device, *, bias=False, ignore_every=0, scale=1.0, seed=0):
    """Leaves x [n, d], w [v, d], b [v] (or None) requiring grad, and targets
    [n] with every ``ignore_every``-th one set to -100."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype).to(device).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64)).to(dtype).to(device).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g).to(device)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, t, b


def sampled_problem(n=7, d=12, c=40, num_true=1, k=10, *, dtype=torch.float32, device="cpu", per_row=False,
                    with_bias=True, hits=True, dups=True, seed=0):
    """Random sampled-softmax problem (x, w, b, target, sampled_values). With
    ``hits`` some candidates equal true classes; with ``dups`` some candidate
    ids repeat."""
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
    sv = (sampled.to(device), true_count.to(device), sampled_count.to(device))
    return (x.to(device, dtype), w.to(device, dtype), None if b is None else b.to(device, dtype), target.to(device), sv)


def features(rows, dim, device, dtype=torch.float32, seed=0, scale=1.0):
    """A [rows, dim] leaf requiring grad (contrastive-loss features)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, dim, generator=g, dtype=torch.float64) * scale
    return t.to(device=device, dtype=dtype).requires_grad_()


def detached(args):
    """The arguments with every tensor detached (others unchanged)."""
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def fp64_leaves(*tensors):
    """Detached fp64 copies requiring grad (None stays None): an fp64 oracle's inputs."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


# ------------------------------------------------------------------ comparisons


def _as_list(tensors):
    return [tensors] if tensors is None or isinstance(tensors, torch.Tensor) else list(tensors)


def assert_all_close(actual, expected, *, rtol=1e-5, atol=1e-5):
    """``torch.testing.assert_close`` in fp64, pair by pair, of one tensor or two
    equally long sequences (loss and gradients); None pairs only with None."""
    actual, expected = _as_list(actual), _as_list(expected)
    assert len(actual) == len(expected), (len(actual), len(expected))
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a is None or e is None:
            assert a is None and e is None, f"item {i}: {a!r} vs {e!r}"
            continue
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol, msg=lambda m: f"item {i}: {m}")


def assert_close_to_oracle(actual, low_precision_ref, oracle, *, slack=2.0, atol=1e-6, rtol=0.0, what=""):
    """Low-precision check in the style of flash-attention / Cut Cross-Entropy:
    each fused tensor may be at most ``slack`` times as far (max abs error) from
    the fp64 oracle as the same-precision PyTorch reference is, plus a floor of
    ``atol + rtol * max|oracle|``. Takes one tensor or equally long sequences
    (loss and gradients); ``low_precision_ref=None`` checks against the floor
    alone."""
    actual, oracle = _as_list(actual), _as_list(oracle)
    refs = [None] * len(oracle) if low_precision_ref is None else _as_list(low_precision_ref)
    assert len(actual) == len(refs) == len(oracle), (len(actual), len(refs), len(oracle))
    for i, (a, r, o) in enumerate(zip(actual, refs, oracle)):
        o = o.double()
        err = (a.double() - o).abs().max().item()
        ref_err = 0.0 if r is None else (r.double() - o).abs().max().item()
        bound = slack * ref_err + atol + rtol * o.abs().max().item()
        assert err <= bound, f"{what} item {i}: error {err:.3g} vs reference error {ref_err:.3g} (bound {bound:.3g})"
