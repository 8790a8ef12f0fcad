"""The CPU buffer pool (csrc/include/fusedloss/buffers.h, fusedloss.memory):
large gradients and tiles come from pooled mappings, a freed one is recycled
by the next call of the same size, and a recycled buffer that must start at
zero is cleared whatever its previous owner left in it."""
import concurrent.futures
import subprocess
import sys

import pytest
import torch

import fusedloss
from conftest import linear_ce_problem

# Dense [C, D] fp32 weight gradients of 8 MiB: above the pool's 4 MiB threshold.
CLASSES, DIM, ROWS, SAMPLED = 8192, 256, 64, 128


@pytest.fixture
def pool_limit():
    """Restores the pool's limit (and empties it) after a test that changes it."""
    old = fusedloss.set_cpu_cache_limit(1 << 30)
    fusedloss.set_cpu_cache_limit(old)
    yield old
    fusedloss.set_cpu_cache_limit(old)
    fusedloss.empty_cache()


def _sampled_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, DIM, generator=g, requires_grad=True)
    w = (torch.randn(CLASSES, DIM, generator=g) * DIM ** -0.5).requires_grad_()
    target = torch.randint(0, CLASSES, (ROWS,), generator=g)
    sampled = torch.randint(0, CLASSES, (SAMPLED,), generator=g)
    values = (sampled, torch.full((ROWS, 1), 0.5), torch.full((SAMPLED,), 0.5))
    return x, w, target, values


def _sampled_weight_grad(fn, x, w, target, values):
    loss = fn(x, w, target, SAMPLED, num_classes=CLASSES, sampled_values=values)
    return torch.autograd.grad(loss, w)[0]


@pytest.mark.parametrize("fn", [fusedloss.sampled_softmax_loss, fusedloss.nce_loss], ids=["softmax", "nce"])
def test_a_recycled_dense_gradient_is_cleared(fn):
    """The dense weight gradient is zero outside the touched rows: a recycled
    buffer poisoned by its previous owner must come back cleared."""
    problem = _sampled_problem()
    first = _sampled_weight_grad(fn, *problem)
    want = first.clone()
    address = first.data_ptr()
    first.fill_(float("nan"))
    del first
    again = _sampled_weight_grad(fn, *problem)
    assert again.data_ptr() == address  # the same mapping, recycled
    assert torch.equal(again, want)


def test_a_recycled_linear_ce_buffer_gives_the_same_gradients():
    """The weight gradient written whole by the GEMM and the single pass's tile
    come back recycled: a poisoned previous result changes nothing."""
    x, w, t, _ = linear_ce_problem(128, DIM, CLASSES, torch.float32, "cpu", ignore_every=5)

    def grads():
        return torch.autograd.grad(fusedloss.linear_cross_entropy(x, w, t), (x, w))

    first = grads()
    want = [g.clone() for g in first]
    for g in first:
        g.fill_(float("nan"))
    del first
    for got, expected in zip(grads(), want):
        assert torch.equal(got, expected)


def test_empty_cache_returns_the_kept_buffers(pool_limit):
    problem = _sampled_problem()
    want = _sampled_weight_grad(fusedloss.sampled_softmax_loss, *problem)  # freed below: kept by the pool
    grad_bytes = want.nbytes
    want = want.clone()
    assert fusedloss.cpu_cache_bytes() >= grad_bytes
    fusedloss.empty_cache()
    assert fusedloss.cpu_cache_bytes() == 0
    assert torch.equal(_sampled_weight_grad(fusedloss.sampled_softmax_loss, *problem), want)


def test_the_limit_bounds_what_the_pool_keeps(pool_limit):
    assert fusedloss.set_cpu_cache_limit(0) == pool_limit
    problem = _sampled_problem()
    want = _sampled_weight_grad(fusedloss.sampled_softmax_loss, *problem).clone()
    assert fusedloss.cpu_cache_bytes() == 0  # every freed buffer was unmapped
    assert torch.equal(_sampled_weight_grad(fusedloss.sampled_softmax_loss, *problem), want)
    assert fusedloss.set_cpu_cache_limit(pool_limit) == 0
    _sampled_weight_grad(fusedloss.sampled_softmax_loss, *problem)
    assert 0 < fusedloss.cpu_cache_bytes() <= pool_limit
    fusedloss.set_cpu_cache_limit(1 << 20)  # below one buffer: lowering the limit evicts
    assert fusedloss.cpu_cache_bytes() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_the_limit_is_validated(bad):
    with pytest.raises(ValueError, match="nbytes must be an int >= 0"):
        fusedloss.set_cpu_cache_limit(bad)


def test_concurrent_calls_get_their_own_buffers():
    """Calls from several threads at once each get their own buffers."""
    problems = [_sampled_problem(seed) for seed in range(4)]
    want = [_sampled_weight_grad(fusedloss.nce_loss, *p).clone() for p in problems]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda p: _sampled_weight_grad(fusedloss.nce_loss, *p), problems))
            for g, w in zip(got, want):
                assert torch.equal(g, w)


def test_a_gradient_alive_at_exit_is_freed_cleanly():
    """The pool is never destroyed, so a tensor freed during interpreter exit
    (after static destructors may have run) still returns its mapping safely.
    A fresh process also shows the documented default limit, 1 GiB."""
    code = ("import torch, fusedloss\n"
            "assert fusedloss.set_cpu_cache_limit(1 << 30) == 1 << 30\n"
            "w = torch.randn(8192, 256, requires_grad=True)\n"
            "x = torch.randn(4, 256, requires_grad=True)\n"
            "t = torch.randint(0, 8192, (4,))\n"
            "fusedloss.linear_cross_entropy(x, w, t).backward()\n"
            "KEPT = w.grad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
