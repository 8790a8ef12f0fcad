"""Fused linear cross-entropy vs the full-logits reference: values and all
gradients for every option, reduction and path (single pass, recompute),
low precision, odd shapes, ignored rows, extreme logits, gradcheck."""
import pytest
import torch

import fusedloss
from fusedloss import reference
from conftest import assert_all_close, assert_close_to_oracle, fp64_leaves, linear_ce_problem, requires_cuda

OPTION_SETS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 4.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0},
]


def loss_and_grads(fn, x, w, t, b, **kw):
    leaves = [p for p in (x, w, b) if p is not None]
    for p in leaves:
        p.grad = None
    loss = fn(x, w, t, b, **kw)
    seed = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    (loss * seed).sum().backward()
    grads = [p.grad.clone() for p in leaves]
    for p in leaves:
        p.grad = None
    return loss.detach(), grads


def fp64_oracle(x, w, t, b, **kw):
    x, w, b = fp64_leaves(x, w, b)
    return loss_and_grads(reference.linear_cross_entropy, x, w, t, b, **kw)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [128, None], ids=["recompute", "auto"])
def test_fp32_matches_reference(device, options, bias, reduction, chunk_size):
    """fp32 loss and gradients equal the fp64 oracle for every option, bias, reduction and path."""
    # V=1003 with chunk 128: 8 chunks, the last one partial. chunk_size=None
    # with a reduced loss takes the single-pass path.
    x, w, t, b = linear_ce_problem(37, 19, 1003, torch.float32, device, bias=bias, ignore_every=5)
    kw = dict(options, reduction=reduction)
    loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=chunk_size, **kw)
    ref_loss, ref_grads = fp64_oracle(x, w, t, b, **kw)
    assert_all_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 8.0}],
                         ids=["plain", "all-options"])
def test_low_precision_within_reference_error(device, dtype, options):
    """bf16 / fp16 loss and gradients are at most twice as far from the fp64 oracle as PyTorch's own."""
    x, w, t, b = linear_ce_problem(64, 96, 3001, dtype, device, bias=True, ignore_every=7)
    loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=256, **options)
    ref_loss, ref_grads = loss_and_grads(reference.linear_cross_entropy, x, w, t, b, **options)
    oracle_loss, oracle_grads = fp64_oracle(x, w, t, b, **options)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    assert_close_to_oracle([loss, *grads], [ref_loss, *ref_grads], [oracle_loss, *oracle_grads], atol=1e-4,
                           what="loss, grad input, grad weight, grad bias:")


@pytest.mark.parametrize("n,d,v,chunk", [(1, 1, 1, None), (1, 7, 5, 2), (5, 3, 130, 128), (9, 33, 257, None)])
def test_odd_shapes(device, n, d, v, chunk):
    """Single-row, single-class and partial-chunk shapes match the oracle."""
    x, w, t, b = linear_ce_problem(n, d, v, torch.float32, device, bias=True)
    loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=chunk)
    ref_loss, ref_grads = fp64_oracle(x, w, t, b)
    assert_all_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("row_block", [1, 8, 0])
@pytest.mark.parametrize("options", OPTION_SETS[:1] + OPTION_SETS[-1:], ids=["plain", "all-options"])
def test_single_pass_op_over_row_blocks(device, row_block, options):
    """linear_ce_sum_and_grad gives the oracle's sum and gradients for any row block size."""
    # The sum-and-gradient op processes rows in blocks; any block size (including
    # a last partial block) must give the same sum and gradients as the reference.
    x, w, t, b = linear_ce_problem(21, 6, 77, torch.float32, device, bias=True, ignore_every=4)
    ls, zl, cap = options.get("label_smoothing", 0.0), options.get("z_loss", 0.0), options.get("softcap") or 0.0
    total, gx, gw, gb, *_ = torch.ops.fusedloss.linear_ce_sum_and_grad(
        x.detach(), w.detach(), t, b.detach(), None, None, -100, ls, zl, cap, row_block, 0, False, [True, True, True])
    ref_total, ref_grads = fp64_oracle(x, w, t, b, reduction="sum", **options)
    assert_all_close(total, ref_total, rtol=1e-5, atol=1e-5)
    # fp64_oracle seeds the backward with 0.5 for a scalar loss
    assert_all_close([g * 0.5 for g in (gx, gw, gb)], ref_grads, rtol=1e-4, atol=1e-6)


def test_single_pass_supports_retain_graph():
    """A retained single-pass graph can be differentiated twice, consistently."""
    x, w, t, _ = linear_ce_problem(5, 4, 9, torch.float32, "cpu")
    loss = fusedloss.linear_cross_entropy(x, w, t)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, (x, w))
    assert_all_close([g * 3.0 for g in first], second, rtol=1.3e-6, atol=1e-5)


def test_3d_input_and_none_reduction_shape(device):
    """[B, T, D] input gives a [B, T] loss with reduction='none' and an input-shaped gradient."""
    x3 = torch.randn(2, 5, 8, device=device, requires_grad=True)
    w = torch.randn(50, 8, device=device, requires_grad=True)
    t = torch.randint(0, 50, (2, 5), device=device)
    loss = fusedloss.linear_cross_entropy(x3, w, t, reduction="none")
    assert loss.shape == (2, 5)
    ref = reference.linear_cross_entropy(x3, w, t, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    assert x3.grad.shape == x3.shape


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_grads(device, reduction):
    """Every target ignored: zero loss and zero gradients, not NaN."""
    x, w, t, b = linear_ce_problem(6, 4, 20, torch.float32, device, bias=True)
    t = torch.full_like(t, -100)
    loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, reduction=reduction)
    assert torch.all(loss == 0)
    assert all(torch.all(g == 0) for g in grads)


def test_ignored_rows_get_exactly_zero_input_grad(device):
    """Ignored rows get exactly zero input gradient, the others a non-zero one."""
    x, w, t, b = linear_ce_problem(10, 6, 40, torch.float32, device, ignore_every=3)
    loss, (gx, gw) = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=16, z_loss=0.1,
                                    label_smoothing=0.1)
    ignored = t == -100
    assert torch.all(gx[ignored] == 0)
    assert torch.all(gx[~ignored].abs().sum(1) > 0)


def test_custom_ignore_index(device):
    """A non-default ignore_index is honoured."""
    x, w, t, b = linear_ce_problem(8, 4, 16, torch.float32, device)
    t[2] = 3
    loss = fusedloss.linear_cross_entropy(x, w, t, ignore_index=3, reduction="none")
    ref = reference.linear_cross_entropy(x, w, t, ignore_index=3, reduction="none")
    torch.testing.assert_close(loss, ref)
    assert torch.all(loss[t == 3] == 0)


@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"z_loss": 1e-4, "label_smoothing": 0.1}],
                         ids=["plain", "softcap", "zloss-smooth"])
def test_extreme_logits(device, options):
    """Logits of magnitude ~1e4 give finite loss and gradients close to the oracle."""
    # Logits of magnitude ~1e4: naive exp overflows; the online LSE must not.
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 4, generator=g) * 100).to(device).requires_grad_()
    w = (torch.randn(300, 4, generator=g) * 30).to(device).requires_grad_()
    t = torch.randint(0, 300, (16,), generator=g).to(device)
    loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, None, chunk_size=64, **options)
    ref_loss, ref_grads = fp64_oracle(x, w, t, None, **options)
    assert torch.isfinite(loss).all() and all(torch.isfinite(gr).all() for gr in grads)
    assert_all_close(loss, ref_loss, rtol=1e-5, atol=1e-2)
    assert_all_close(grads, ref_grads, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("reduction,chunk_size", [("none", 4), ("mean", 4), ("sum", None)],
                         ids=["none-recompute", "mean-recompute", "sum-single-pass"])
def test_gradcheck_float64(options, reduction, chunk_size):
    """fp64 gradients pass gradcheck for every option and path."""
    x, w, t, b = linear_ce_problem(4, 3, 11, torch.float64, "cpu", bias=True, ignore_every=3)

    def fn(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, t, b, chunk_size=chunk_size, reduction=reduction, **options)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_frozen_weight_and_frozen_input(device):
    """Only the leaves that require grad get a gradient."""
    x, w, t, b = linear_ce_problem(6, 5, 33, torch.float32, device, bias=True)
    w.requires_grad_(False)
    fusedloss.linear_cross_entropy(x, w, t, b).backward()
    assert x.grad is not None and w.grad is None and b.grad is not None
    x.grad = None
    x.requires_grad_(False)
    w.requires_grad_(True)
    fusedloss.linear_cross_entropy(x, w, t).backward()
    assert w.grad is not None


def test_deterministic(device):
    """Two identical runs are bit-identical."""
    x, w, t, b = linear_ce_problem(33, 17, 500, torch.float32, device, bias=True)
    first = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=64)
    second = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=64)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, c) for a, c in zip(first[1], second[1]))


def test_chunking_does_not_change_the_result(device):
    """One chunk or many give the same loss and gradients."""
    x, w, t, b = linear_ce_problem(20, 8, 777, torch.float32, device, bias=True)
    whole = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=777)
    pieces = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=50)
    assert_all_close(whole[0], pieces[0], rtol=1e-6, atol=1e-6)
    assert_all_close(whole[1], pieces[1], rtol=1e-5, atol=1e-7)


def test_module_matches_function(device):
    """LinearCrossEntropyLoss equals the function with the same options."""
    x, w, t, b = linear_ce_problem(7, 5, 21, torch.float32, device, bias=True)
    module = fusedloss.LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="sum")
    torch.testing.assert_close(
        module(x, w, t, b),
        fusedloss.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="sum"),
    )
    assert "softcap=5.0" in repr(module)


def test_autocast_mixed_dtypes():
    """Under CPU autocast the loss runs in bf16 and the fp32 weight gets an fp32 gradient."""
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedloss.linear_cross_entropy(x, w, t)
    loss.backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, reference.linear_cross_entropy(x, w, t), rtol=5e-2, atol=5e-2)


@requires_cuda
def test_cuda_peak_memory_is_far_below_logits():
    """CUDA peak memory stays far below the size of the full fp32 logits."""
    n, d, v = 4096, 256, 65536
    x, w, t, _ = linear_ce_problem(n, d, v, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fusedloss.linear_cross_entropy(x, w, t, chunk_size=4096)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    gradients = x.numel() * 2 + w.numel() * 2
    logits_fp32 = n * v * 4
    assert extra - gradients < logits_fp32 / 8, (extra, gradients, logits_fp32)
