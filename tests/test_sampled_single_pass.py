"""Sampled softmax / NCE single pass with shared candidates
(sampled_sum_and_grad on chunk_driver.h's single_pass): one row block or
several (the candidates' fp32 dW accumulated across blocks and scattered
once), the recompute fallback below the budget and for per-row candidates,
dense and sparse gradients, TensorFlow's last-copy hit masking, and — with
FUSEDLOSS_CPU_HALF_OPERANDS=1 in a subprocess — the CUDA layout (bf16/fp16
GEMM operands, a half-precision copy of the candidates' dlogits)."""
import os
import subprocess
import sys

import pytest
import torch

import fusedloss
from conftest import assert_all_close, fp64_leaves, sampled_problem
from fusedloss import reference
from fusedloss._extension import C
from fusedloss._ops import HIT_LAST_COPY
from fusedloss.sampled import SampledOptions, _sampled_loss

N, NUM_TRUE, K, DIM = 150, 2, 23, 12
# The tile's row: the true columns and the candidates, each padded to 16.
TILE_COLUMNS = 16 + 32
ROW_BYTES = 4 * TILE_COLUMNS
# The whole tile, blocks of 70 rows (the last one partial), below the CPU's
# 64-row minimum. The candidates' [K, D] fp32 gradient counts once per pass.
BUDGETS = {"one_block": None, "blocks": 70 * ROW_BYTES + 4 * K * DIM, "recompute": 63 * ROW_BYTES + 4 * K * DIM}
def _fused(fn):
    return lambda x, w, target, sv, b, **kw: fn(x, w, target, None, b, sampled_values=sv, **kw)


def _reference(fn):
    return lambda x, w, target, sv, b, **kw: fn(x, w, target, sv, b, **kw)


KINDS = {"softmax": (_fused(fusedloss.sampled_softmax_loss), _reference(reference.sampled_softmax_loss)),
         "nce": (_fused(fusedloss.nce_loss), _reference(reference.nce_loss))}
SOFTMAX, REFERENCE_SOFTMAX = KINDS["softmax"]


def _problem(device="cpu", dtype=torch.float32, per_row=False):
    return sampled_problem(n=N, d=DIM, c=60, num_true=NUM_TRUE, k=K, dtype=dtype, device=device, per_row=per_row)


def _run(fn, x, w, b, target, sv, **kw):
    loss = fn(x, w, target, sv, b, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, [x, w, b])]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("layout", BUDGETS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_layout_matches_the_oracle(device, kind, layout, reduction):
    x, w, b, target, sv = _problem(device)
    fused, ref = KINDS[kind]
    kw = dict(label_smoothing=0.1) if kind == "softmax" else {}
    got = _run(fused, *_leaves(x, w, b), target, sv, reduction=reduction, memory_budget=BUDGETS[layout], **kw)
    sv64 = (sv[0], sv[1].double(), sv[2].double())
    want = _run(ref, *fp64_leaves(x, w, b), target, sv64, reduction=reduction, **kw)
    assert_all_close(got, want, rtol=3e-5, atol=3e-6 if reduction == "mean" else 3e-5)


def test_the_budget_picks_the_layout():
    plan = {layout: C.sampled_single_pass_block_rows(N, NUM_TRUE, K, DIM, False, False, memory_budget=budget or 0)
            for layout, budget in BUDGETS.items()}
    assert plan == {"one_block": N, "blocks": 70, "recompute": 0}


@pytest.mark.parametrize("layout", ["one_block", "blocks"])
def test_sparse_gradients_equal_the_dense_ones(layout):
    x, w, b, target, sv = _problem()
    dense = _run(SOFTMAX, *_leaves(x, w, b), target, sv, memory_budget=BUDGETS[layout])
    sparse = _run(SOFTMAX, *_leaves(x, w, b), target, sv, memory_budget=BUDGETS[layout],
                  sparse_grad=True)
    assert sparse[2].is_sparse and sparse[2].is_coalesced() and sparse[3].is_sparse
    assert_all_close([sparse[0], sparse[1], sparse[2].to_dense(), sparse[3].to_dense()], dense, rtol=1e-6,
                     atol=1e-7)


def test_blocks_are_deterministic():
    """Duplicated candidates and true classes are scattered in a fixed order: bitwise repeatable."""
    x, w, b, target, sv = _problem()
    first = _run(SOFTMAX, *_leaves(x, w, b), target, sv, memory_budget=BUDGETS["blocks"])
    again = _run(SOFTMAX, *_leaves(x, w, b), target, sv, memory_budget=BUDGETS["blocks"])
    assert all(torch.equal(a, c) for a, c in zip(first, again))


def test_tensorflow_last_copy_masking_in_the_single_pass():
    """The single pass equals the recompute pair with TF's last-copy hit mask
    (the TF-parity tests pin the pair to TensorFlow's own values)."""
    x, w, b, target, sv = _problem()

    def run(**settings):
        options = SampledOptions(0, hit_mask=HIT_LAST_COPY, reduction="sum", **settings)
        xl, wl, bl = _leaves(x, w, b)
        loss = _sampled_loss(options, input=xl, weight=wl, target=target, bias=bl, sampled_values=sv)
        return [loss.detach(), *torch.autograd.grad(loss, [xl, wl, bl])]

    assert_all_close(run(memory_budget=BUDGETS["blocks"]), run(chunk_size=7), rtol=2e-5, atol=2e-6)


def test_gradcheck_single_pass():
    x, w, b, target, sv = sampled_problem(n=5, d=4, c=9, k=6, num_true=2, dtype=torch.float64)
    sv = (sv[0], sv[1].double(), sv[2].double())
    for fn in (fusedloss.sampled_softmax_loss, fusedloss.nce_loss):
        f = lambda x, w, b: fn(x, w, target, None, b, sampled_values=sv, reduction="sum")  # noqa: B023
        assert torch.autograd.gradcheck(f, _leaves(x, w, b))


def test_per_row_candidates_take_the_recompute_pair():
    x, w, b, target, sv = _problem(per_row=True)
    sv64 = (sv[0], sv[1].double(), sv[2].double())
    got = _run(SOFTMAX, *_leaves(x, w, b), target, sv)
    want = _run(REFERENCE_SOFTMAX, *fp64_leaves(x, w, b), target, sv64)
    assert_all_close(got, want, rtol=3e-5, atol=3e-6)


def test_opcheck():
    x, w, b, target, sv = _problem()
    args = (x, w, b, target, sv[0], sv[1].log(), sv[2].log(), torch.tensor(float(N)), 0, 1, 0.1, 1.0, False, 0, 0,
            [True, True, True])
    torch.library.opcheck(torch.ops.fusedloss.sampled_sum_and_grad, args)


_HALF_OPERANDS_SCRIPT = r"""
import torch, fusedloss
from conftest import assert_close_to_oracle, fp64_leaves
from test_sampled_single_pass import BUDGETS, KINDS, _leaves, _problem, _run
for dtype in (torch.bfloat16, torch.float16):
    for kind, (fused, ref) in KINDS.items():
        x, w, b, target, sv = _problem(dtype=dtype)
        sv64 = (sv[0], sv[1].double(), sv[2].double())
        oracle = _run(ref, *fp64_leaves(x, w, b), target, sv64)
        plain = _run(ref, *_leaves(x, w, b), target, sv)
        for layout, budget in BUDGETS.items():
            got = _run(fused, *_leaves(x, w, b), target, sv, memory_budget=budget)
            assert got[1].dtype == dtype
            assert_close_to_oracle(got, plain, oracle, slack=2.0, atol=1e-5, what=f"{dtype} {kind} {layout}")
print("ok")
"""


def test_half_precision_operands():
    env = dict(os.environ, FUSEDLOSS_CPU_HALF_OPERANDS="1")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", _HALF_OPERANDS_SCRIPT], cwd=tests, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.parametrize("scale", [1e-3, 20.0, 1e4])
def test_nce_softplus_and_sigmoid_across_logit_scales(scale):
    """NCE's single pass forms softplus and sigmoid from one vectorised exp(-|z|)
    (and a polynomial log1p): tiny, large and ±1e4 logits match the fp64 oracle."""
    x, w, b, target, sv = _problem()
    x = x * scale
    fused, ref = KINDS["nce"]
    got = _run(fused, *_leaves(x, w, b), target, sv)
    want = _run(ref, *fp64_leaves(x, w, b), target, (sv[0], sv[1].double(), sv[2].double()))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=2e-6 * max(1.0, r.abs().max().item()))


_FP16_MEAN_SCRIPT = r"""
import torch, fusedloss
from fusedloss import reference
from conftest import sampled_problem
from test_sampled_single_pass import KINDS, _leaves, _run
# A mean over 2048 rows of 512 shared candidates at logits ≈ 0: each
# candidate's dlogit is ≈ p/N ≈ 1e-6, subnormal in fp16 had it been scaled by
# 1/N before the half-precision copy the GEMMs read.
x, w, b, target, sv = sampled_problem(n=2048, d=16, c=4000, k=512, dtype=torch.float16)
x = (x * 0.01).detach()
sv64 = (sv[0], sv[1].double(), sv[2].double())
ops = torch.ops.fusedloss
log_q = (sv[1].float().log(), sv[2].float().log())
for kind, (fused, ref) in KINDS.items():
    # The op itself (the public functions send fp16 to the recompute pair).
    # The public defaults: softmax removes accidental hits (every copy), NCE keeps them.
    mode, hit_mask = (0, 1) if kind == "softmax" else (1, 0)
    leaves = _leaves(x, w, b)
    got = [None, *ops.sampled_sum_and_grad(*leaves, target, sv[0], *log_q, torch.tensor(2048.0), mode, hit_mask,
                                           0.0, 1.0,
                                           False, 0, 0, [True, True, True])[1:4]]
    want = _run(ref, *(t.detach().double().requires_grad_() for t in (x, w, b)), target, sv64)
    # dX and db (dW's entries are ≈ 1e-6 themselves: subnormal in any fp16 result).
    for name, g, r in (("input", got[1], want[1]), ("bias", got[3], want[3])):
        error = ((g.double() - r).norm() / r.norm()).item()
        assert error < 5e-4, (kind, name, error)  # scaled before rounding: 7.6e-4 / 5.0e-3
        print(kind, name, f"{error:.1e}")
print("ok")
"""


def test_fp16_mean_gradients_do_not_underflow():
    """The candidates' fp16 dlogits (the CUDA layout) of a mean over many rows
    are formed by the single-pass op for an upstream gradient of 1 and scaled
    after the GEMMs (the public functions run fp16 through the recompute pair)."""
    env = dict(os.environ, FUSEDLOSS_CPU_HALF_OPERANDS="1")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", _FP16_MEAN_SCRIPT], cwd=tests, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_large_dense_gradients_match_the_oracle(kind):
    """A dense weight gradient over 4 MiB comes from calloc with huge-page
    advice (csrc/include/fusedloss/buffers.h): every row no candidate or true
    class touches is exactly zero, the touched ones equal the oracle."""
    x, w, b, target, sv = sampled_problem(n=64, d=64, c=20000, num_true=1, k=40, dtype=torch.float32, device="cpu")
    fused, ref = KINDS[kind]
    got = _run(fused, *_leaves(x, w, b), target, sv)
    want = _run(ref, *fp64_leaves(x, w, b), target, (sv[0], sv[1].double(), sv[2].double()))
    assert_all_close(got, want, rtol=3e-5, atol=3e-7)
    touched = torch.zeros(20000, dtype=torch.bool)
    touched[sv[0]] = True
    touched[target.reshape(-1)] = True
    assert torch.count_nonzero(got[2][~touched]) == 0 and torch.count_nonzero(got[3][~touched]) == 0
