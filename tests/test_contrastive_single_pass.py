"""The InfoNCE family's single pass (contrastive_sum_and_grad on chunk_driver.h's
single_pass, the orchestration the CPU and CUDA backends share): one row block
or several (dK accumulated across blocks; NT-Xent's self mask shifted per
block), the symmetric loss only as one block, the recompute fallback when no
block fits the budget, and — with FUSEDLOSS_CPU_HALF_OPERANDS=1 in a
subprocess — half-precision dlogits written over the fp32 tile as on CUDA."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_all_close, features, fp64_leaves
from fusedloss import reference
from fusedloss._extension import C

B, DIM, EXTRA = 150, 12, 37


def _problem(device, dtype=torch.float32):
    q, k = features(B, DIM, device, dtype, seed=1), features(B, DIM, device, dtype, seed=2)
    negatives = features(EXTRA, DIM, device, dtype, seed=3)
    temperature = torch.tensor(0.3, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                               device=device, requires_grad=True)
    return q, k, negatives, temperature


def _call(mod, kind, q, k, negatives, temperature, **kw):
    if kind == "info_nce":
        return mod.info_nce_loss(q, k, temperature=temperature, **kw)
    if kind == "info_nce_negatives":
        return mod.info_nce_loss(q, k, negatives=negatives, temperature=temperature, **kw)
    if kind == "symmetric_negatives":
        return mod.info_nce_loss(q, k, negatives=negatives, temperature=temperature, symmetric=True, **kw)
    if kind == "nt_xent":
        return mod.nt_xent_loss(torch.cat([q, k]), temperature=temperature, **kw)
    return mod.clip_loss(q, k, 1 / temperature, **kw)


KINDS = ["info_nce", "info_nce_negatives", "symmetric_negatives", "nt_xent", "clip"]


def _columns(kind):
    return {"info_nce": B, "info_nce_negatives": B + EXTRA, "symmetric_negatives": B + EXTRA, "nt_xent": 2 * B,
            "clip": B}[kind]


def _rows(kind):
    return 2 * B if kind == "nt_xent" else B


# Budgets per layout: the whole tile, blocks of 64..80 rows (the last one
# partial), and below the CPU's 64-row minimum (the recompute pair). A tile
# row is padded to a multiple of 16 elements (chunk_driver.h's aligned_columns).
def _budget(kind, layout):
    row_bytes = 4 * ((_columns(kind) + 15) // 16 * 16)
    return {"one_block": None, "blocks": 80 * row_bytes, "recompute": 63 * row_bytes}[layout]


def _loss_and_grads(mod, kind, leaves, **kw):
    loss = _call(mod, kind, *leaves, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, leaves, allow_unused=True)]


@pytest.mark.parametrize("layout", ["one_block", "blocks", "recompute"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_layout_matches_the_oracle(device, kind, layout, reduction):
    """Loss and the gradients of the features, the extra negatives and the temperature."""
    leaves = _problem(device)
    got = _loss_and_grads(fusedloss, kind, leaves, reduction=reduction, memory_budget=_budget(kind, layout))
    want = _loss_and_grads(reference, kind, fp64_leaves(*leaves), reduction=reduction)
    # fp32 rounding; `sum` gradients are B times larger than `mean` ones.
    assert_all_close(got, want, rtol=3e-5, atol=3e-6 if reduction == "mean" else 3e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_the_budget_picks_the_layout(kind):
    """What the op chooses for each budget: the symmetric losses need the whole
    tile as one block and otherwise take the recompute pair."""
    symmetric = kind in ("symmetric_negatives", "clip")
    rows, columns = _rows(kind), _columns(kind)
    plan = {layout: C.single_pass_block_rows(rows, columns, 0, _budget(kind, layout) or 0, 0, False)
            for layout in ("one_block", "blocks", "recompute")}
    assert plan["one_block"] == rows
    assert plan["blocks"] == 80 and (symmetric or rows % 80 != 0)  # a partial last block
    assert plan["recompute"] == 0


def test_single_pass_and_recompute_agree_in_float64_and_gradcheck():
    q, k, negatives, temperature = _problem("cpu", torch.float64)
    fn = lambda q, k, n, t: fusedloss.info_nce_loss(q, k, negatives=n, temperature=t, memory_budget=80 * 4 * 187)
    assert torch.autograd.gradcheck(fn, (q[:9], k[:9], negatives[:5], temperature))
    clip = lambda q, k, t: fusedloss.clip_loss(q, k, 1 / t)
    assert torch.autograd.gradcheck(clip, (q[:9], k[:9], temperature))
    nt = lambda h, t: fusedloss.nt_xent_loss(h, temperature=t, reduction="sum")
    assert torch.autograd.gradcheck(nt, (torch.cat([q[:5], k[:5]]).detach().requires_grad_(), temperature))


def test_only_the_requested_gradients():
    """A frozen key encoder or a fixed temperature: the op forms only what is asked."""
    q, k, _, temperature = _problem("cpu")
    loss = fusedloss.info_nce_loss(q, k.detach(), temperature=0.3)
    (grad_q,) = torch.autograd.grad(loss, [q])
    (q64,) = fp64_leaves(q)
    (want_q,) = torch.autograd.grad(reference.info_nce_loss(q64, k.detach().double(), temperature=0.3), [q64])
    assert_all_close(grad_q, want_q, rtol=2e-5, atol=3e-6)
    scale_only = fusedloss.clip_loss(q.detach(), k.detach(), 1 / temperature)
    (grad_t,) = torch.autograd.grad(scale_only, [temperature])
    t64 = temperature.detach().double().requires_grad_()
    (want_t,) = torch.autograd.grad(reference.clip_loss(q.detach().double(), k.detach().double(), 1 / t64), [t64])
    torch.testing.assert_close(grad_t.double(), want_t, rtol=1e-5, atol=1e-7)


def test_retained_graph_backward_is_bit_identical():
    q, k, negatives, temperature = _problem("cpu")
    loss = fusedloss.info_nce_loss(q, k, negatives=negatives, temperature=temperature)
    first = torch.autograd.grad(loss, [q, k, negatives, temperature], retain_graph=True)
    again = torch.autograd.grad(loss, [q, k, negatives, temperature])
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_memory_budget_is_validated():
    q, k, _, _ = _problem("cpu")
    with pytest.raises(TypeError, match="memory_budget"):
        fusedloss.info_nce_loss(q, k, memory_budget=1e6)
    with pytest.raises(ValueError, match="memory_budget"):
        fusedloss.clip_loss(q, k, 10.0, memory_budget=-1)


def test_opcheck():
    q, k, _, _ = _problem("cpu")
    positives = torch.arange(B)
    scale = torch.tensor(3.0, requires_grad=True)
    ids = torch.arange(B).remainder(50)[None]  # every id three times
    # ids: none, the id mask, or the id penalty [match, differ]
    for symmetric, self_offset, budget, with_ids in ((False, None, 0, None), (True, None, 0, None),
                                                     (False, None, 80 * 4 * B, None), (True, None, 0, "mask"),
                                                     (False, None, 80 * 4 * B, "mask"),
                                                     (False, None, 80 * 4 * B, "penalty")):
        mask = (None, None, []) if with_ids is None else (ids, ids, [B])
        penalty = [2.0, 0.5] if with_ids == "penalty" else []
        args = (q, k, positives, scale, torch.tensor(float(B)), *mask[:2], self_offset, mask[2], penalty, symmetric,
                0, budget, [True, True, True])
        torch.library.opcheck(torch.ops.fusedloss.contrastive_sum_and_grad, args)


_HALF_OPERANDS_SCRIPT = r"""
import torch, fusedloss
from fusedloss import reference
from conftest import assert_close_to_oracle, fp64_leaves
from test_contrastive_single_pass import KINDS, _budget, _loss_and_grads, _problem
for dtype in (torch.bfloat16, torch.float16):
    for kind in KINDS:
        leaves = _problem("cpu", dtype)
        oracle = _loss_and_grads(reference, kind, fp64_leaves(*leaves))
        present = [i for i, g in enumerate(oracle) if g is not None]  # the extra negatives are optional
        oracle = [oracle[i] for i in present]
        plain = [_loss_and_grads(reference, kind, leaves)[i] for i in present]
        for layout in ("one_block", "blocks", "recompute"):
            fused = _loss_and_grads(fusedloss, kind, leaves, memory_budget=_budget(kind, layout))
            assert fused[1].dtype == dtype
            fused = [fused[i] for i in present]
            assert_close_to_oracle(fused, plain, oracle, slack=2.0, atol=1e-5, what=f"{dtype} {kind} {layout}")
print("ok")
"""


def test_half_precision_dlogits_over_the_fp32_tile():
    """The CUDA layout on the CPU: bf16/fp16 GEMM operands and dlogits written
    in place over the fp32 tile (row stride doubled), every layout."""
    env = dict(os.environ, FUSEDLOSS_CPU_HALF_OPERANDS="1")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", _HALF_OPERANDS_SCRIPT], cwd=tests, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr



_FP16_MEAN_SCRIPT = r"""
import torch, fusedloss
from fusedloss import reference
from conftest import features
# A mean over 2048 pairs of unit features at scale 1: every dlogit is ≈ p/B ≈
# 2.4e-7, subnormal in fp16 (step 6e-8) had it been scaled by 1/B before rounding.
unit = lambda seed: torch.nn.functional.normalize(features(2048, 16, "cpu", seed=seed).detach(), dim=-1)
q, k = (unit(seed).half().requires_grad_() for seed in (5, 6))
cases = {"info_nce": lambda mod, q, k, **kw: mod.info_nce_loss(q, k, temperature=1.0, **kw),
         "clip": lambda mod, q, k, **kw: mod.clip_loss(q, k, 1.0, **kw)}
ops = torch.ops.fusedloss
positives, norm = torch.arange(2048), torch.tensor(2048.0)
direct = {"info_nce": lambda q, k: ops.contrastive_sum_and_grad(q, k, positives, torch.tensor(1.0), norm, None,
                                                                 None, None, [], [], False, 0, 0, [True, True, False])[1:3],
          "clip": lambda q, k: ops.contrastive_sum_and_grad(q, k, positives, torch.tensor(1.0), norm, None, None, None,
                                                            [], [], True, 0, 0, [True, True, False])[1:3]}
for name, fn in cases.items():
    # The op itself (the public functions send fp16 to the recompute pair, see below).
    got = direct[name](q, k)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    want = torch.autograd.grad(fn(reference, q64, k64), [q64, k64])
    for g, w in zip(got, want):
        error = ((g.double() - w).norm() / w.norm()).item()
        assert error < 6e-4, (name, error)  # scaled before rounding: 1.6e-3
        print(name, f"{error:.1e}")
    # The public function with a GradScaler's loss scale: fp16 runs the
    # recompute pair, whose backward rounds dlogits already scaled.
    assert not fusedloss._common.wants_single_pass("mean", q.device, q, k)
    scaled = torch.autograd.grad(fn(fusedloss, q, k) * 65536.0, [q, k])
    for g, w in zip(scaled, want):
        error = ((g.double() / 65536.0 - w).norm() / w.norm()).item()
        assert error < 6e-4, (name, "GradScaler", error)
print("ok")
"""


def test_fp16_mean_gradients_do_not_underflow():
    """fp16 dlogits (the CUDA layout) of a mean over many pairs: the single-pass
    op forms them for an upstream gradient of 1 and scales after the GEMMs, and
    the public functions run fp16 through the recompute pair so that a
    GradScaler's scale reaches the dlogits before they are rounded."""
    env = dict(os.environ, FUSEDLOSS_CPU_HALF_OPERANDS="1")
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", _FP16_MEAN_SCRIPT], cwd=tests, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def _clip_spread(spread):
    """Unit image / text features [96, 16] (fp64) and the logit scale of each
    test_symmetric_single_pass_factored_and_exact_rows case."""
    g = torch.Generator().manual_seed(7)
    image = F.normalize(torch.randn(96, 16, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(96, 16, generator=g, dtype=torch.float64), dim=-1)
    if spread == "near":
        return image, text, 5.0
    image[0] = text[5]  # row 0's max: logit 100
    if spread == "mixed":
        text[7] = F.normalize(-image.mean(0), dim=0)
        image[8:40] = F.normalize(text[7] + 0.05 * image[8:40], dim=-1)
        return image, text, 100.0
    # "extreme": every other image near v, caption 7 = -v orthogonal to image 0:
    # column 7's probability sits on row 0 (logit 0), 100 below row 0's max.
    v = torch.randn(16, generator=g, dtype=torch.float64)
    v = F.normalize(v - (v @ text[5]) * text[5], dim=0)
    image[1:] = F.normalize(v + 0.3 * torch.randn(95, 16, generator=g, dtype=torch.float64), dim=-1)
    text[7] = -v
    return image, text, 100.0


@pytest.mark.parametrize("spread", ["near", "mixed", "extreme"])
def test_symmetric_single_pass_factored_and_exact_rows(spread):
    """The symmetric single pass forms each entry's column probability from
    the row's kept exp times per-row and per-column factors, except in rows
    whose max lies more than 40 above the least column LSE (exact exps there:
    a kept exp clamped at exp(-87) would be wrong by a huge factor). "mixed"
    has rows of both kinds in one tile (logit scale 100, clamped kept exps in
    the factored rows); "extreme" a column whose probability is ≈ 1 in a row
    where its kept exp is clamped."""
    image, text, scale = _clip_spread(spread)
    leaves = [image.float().requires_grad_(), text.float().requires_grad_()]
    got = fusedloss.clip_loss(*leaves, scale)
    got = [got.detach(), *torch.autograd.grad(got, leaves)]
    oracle = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    want = reference.clip_loss(*oracle, scale)
    want = [want.detach(), *torch.autograd.grad(want, oracle)]
    assert all(torch.isfinite(t).all() for t in got)
    assert_all_close(got, want, rtol=3e-5, atol=3e-6)
