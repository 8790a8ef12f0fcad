"""The linear CE single pass (chunk_driver.h's single_pass), the orchestration
the CPU and CUDA backends share: one row block or several (fp32 weight-gradient
accumulator), the fallback to the recompute pair when no block fits the
memory budget, the normalizer that makes `mean` need no rescaling, the CPU tile
kept between calls, and — with FUSEDLOSS_CPU_HALF_OPERANDS=1 in a subprocess —
half-precision dlogits written over the fp32 tile exactly as on CUDA."""
import os
import subprocess
import sys

import pytest
import torch

import fusedloss
from conftest import assert_all_close, assert_close_to_oracle, fp64_leaves, linear_ce_problem
from fusedloss import reference

OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0}
ROWS, DIM, CLASSES = 200, 16, 300


def _loss_and_grads(fn, x, w, t, b, **kw):
    leaves = [x, w, b]
    loss = fn(x, w, t, b, **OPTIONS, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), *grads]


def _problem(dtype=torch.float32, device="cpu"):
    return linear_ce_problem(ROWS, DIM, CLASSES, dtype, device, bias=True, ignore_every=7)


# A tile row is 300 columns padded to 304 (chunk_driver.h's aligned_columns):
# all 200 rows take 243,200 bytes, 64 rows (the CPU's smallest block) 77,824.
# At 110,000 bytes: blocks of 90 rows, or of 74 when a half-precision weight's
# 19,200-byte fp32 dW accumulator is counted.
BUDGETS = {"one_block": None, "three_blocks": 110_000, "below_min_rows": 50_000}


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_pass_blocks_and_fallback_match_the_oracle(device, budget, reduction):
    """Every block layout (and the recompute fallback) gives the oracle's loss and gradients.
    On CUDA the single pass runs under FUSEDLOSS_CUDA_SINGLE_PASS=1 (scripts/gpu_check.sh)."""
    x, w, t, b = _problem(device=device)
    got = _loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, reduction=reduction,
                          memory_budget=BUDGETS[budget])
    want = _loss_and_grads(reference.linear_cross_entropy, *fp64_leaves(x, w)[:2], t, fp64_leaves(b)[0],
                           reduction=reduction)
    assert_all_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("budget", [None, 100 * 4 * 20000], ids=["one_block", "two_blocks"])
def test_large_gradients_match_the_oracle(budget):
    """Weight gradients over 4 MiB come from huge-page-advised buffers
    (csrc/include/fusedloss/buffers.h): written whole by the GEMM in one block,
    zero-filled (calloc) and accumulated over several."""
    x, w, t, b = linear_ce_problem(200, 64, 20000, torch.float32, "cpu", bias=True, ignore_every=5)
    got = _loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, memory_budget=budget)
    want = _loss_and_grads(reference.linear_cross_entropy, *fp64_leaves(x, w)[:2], t, fp64_leaves(b)[0])
    assert_all_close(got, want, rtol=2e-5, atol=2e-7)


def test_single_pass_layouts_agree_bitwise_where_they_must():
    """The same budget twice gives bit-identical results (tile reuse is safe)."""
    x, w, t, b = _problem()
    first = _loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, memory_budget=110_000)
    again = _loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, memory_budget=110_000)
    fusedloss.empty_cache()
    after_release = _loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, memory_budget=110_000)
    for a, b_, c in zip(first, again, after_release):
        assert torch.equal(a, b_) and torch.equal(a, c)


def test_mean_is_sum_over_valid_rows():
    """`mean` divides by the number of non-ignored rows inside the op (its stored gradients are final)."""
    x, w, t, b = _problem()
    mean = fusedloss.linear_cross_entropy(x, w, t, b, **OPTIONS)
    total = fusedloss.linear_cross_entropy(x, w, t, b, reduction="sum", **OPTIONS)
    torch.testing.assert_close(mean, total / (t != -100).sum())


def test_memory_budget_is_validated():
    x, w, t, b = _problem()
    with pytest.raises(TypeError, match="memory_budget"):
        fusedloss.linear_cross_entropy(x, w, t, b, memory_budget=1e6)
    with pytest.raises(ValueError, match="memory_budget"):
        fusedloss.linear_cross_entropy(x, w, t, b, memory_budget=0)


_HALF_OPERANDS_SCRIPT = r"""
import torch, fusedloss
from fusedloss import reference
from conftest import assert_close_to_oracle, fp64_leaves, linear_ce_problem
import itertools
softcapped = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 6.0}
uncapped = {"label_smoothing": 0.1, "z_loss": 1e-3}  # the row kernel that keeps exp() in the tile
for dtype, options in itertools.product((torch.bfloat16, torch.float16), (softcapped, uncapped)):
    x, w, t, b = linear_ce_problem(200, 16, 300, dtype, "cpu", bias=True, ignore_every=7)
    def run(fn, x, w, b, **kw):
        loss = fn(x, w, t, b, **options, **kw)
        return [loss.detach(), *torch.autograd.grad(loss, [x, w, b])]
    oracle = run(reference.linear_cross_entropy, *fp64_leaves(x, w, b))
    plain = run(reference.linear_cross_entropy, x, w, b)
    for budget in (None, 110_000, 50_000):  # one block, three blocks (fp32 dW accumulator), recompute
        fused = run(fusedloss.linear_cross_entropy, x, w, b, memory_budget=budget)
        assert fused[1].dtype == dtype and fused[2].dtype == dtype
        assert_close_to_oracle(fused, plain, oracle, slack=2.0, atol=1e-6, what=f"{dtype} {options} budget={budget}")
print("ok")
"""


def test_half_precision_dlogits_over_the_fp32_tile():
    """The CUDA layout on the CPU: bf16/fp16 GEMM operands, half-precision dlogits
    written in place over the fp32 tile (row stride doubled), every block layout."""
    env = dict(os.environ, FUSEDLOSS_CPU_HALF_OPERANDS="1")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", _HALF_OPERANDS_SCRIPT], cwd=tests, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def _single_pass_losses():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)
    t = torch.randint(0, 50, (40,), generator=g)
    q, k = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g)
    return {
        "linear_ce": ([x, w], lambda x, w: fusedloss.linear_cross_entropy(x, w, t)),
        "sampled": ([x, w], lambda x, w: fusedloss.sampled_softmax_loss(x, w, t, 10, num_classes=50,
                                                                        sampled_values=(torch.arange(10),
                                                                                        torch.full((40, 1), 0.2),
                                                                                        torch.full((10,), 0.2)))),
        "info_nce": ([q, k], lambda q, k: fusedloss.info_nce_loss(q, k)),
        "siglip": ([q, k], lambda q, k: fusedloss.siglip_loss(q, k, 10.0, -10.0)),
    }


@pytest.mark.parametrize("name", ["linear_ce", "sampled", "info_nce", "siglip"])
def test_the_backward_scales_by_the_upstream_gradient(name):
    """The single pass's stored gradients times the upstream gradient; an
    upstream gradient of exactly 1 skips the multiply (on the CPU)."""
    tensors, fn = _single_pass_losses()[name]
    grads = {}
    for factor in (1.0, 2.5, 0.0):
        leaves = [t.clone().requires_grad_() for t in tensors]
        (fn(*leaves) * factor).backward()
        grads[factor] = [leaf.grad for leaf in leaves]
    for unit, scaled, zero in zip(grads[1.0], grads[2.5], grads[0.0]):
        assert unit.abs().sum() > 0
        torch.testing.assert_close(scaled, unit * 2.5, rtol=1e-6, atol=0)
        assert torch.count_nonzero(zero) == 0
