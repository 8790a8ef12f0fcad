"""What LLM trainers expect of a fused CE, against the materialised reference:
per-token statistics from the same pass (return_stats), a global normaliser
(normalizer=), class weights with F.cross_entropy's semantics (class_weight=),
on both paths (single pass and recompute), under autograd, gradcheck and
torch.compile; bad arguments raise before any kernel."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference
from conftest import assert_all_close, fp64_leaves, linear_ce_problem

PATHS = {"single-pass": None, "recompute": 128}
STAT_OPTIONS = [{}, {"softcap": 3.0}, {"label_smoothing": 0.1, "z_loss": 1e-3}]


def loss_and_grads(fn, x, w, t, b, **kw):
    out = fn(x, w, t, b, **kw)
    loss = out.loss if kw.get("return_stats") else out
    seed = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    grads = torch.autograd.grad((loss * seed).sum(), [p for p in (x, w, b) if p is not None])
    return out, loss.detach(), list(grads)


def class_weights(v, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(v, generator=g, dtype=torch.float64) * 2 + 0.1).to(device=device, dtype=dtype)


# ----------------------------------------------------------------- return_stats


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", STAT_OPTIONS, ids=["plain", "softcap", "smoothing-zloss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_stats_match_reference(device, path, options, reduction):
    """lse, argmax and entropy of the (softcapped) logits equal the reference's
    on valid rows, NaN / -1 on ignored ones; the loss and gradients are the
    same as without statistics."""
    x, w, t, b = linear_ce_problem(37, 19, 1003, torch.float32, device, bias=True, ignore_every=5, scale=3.0)
    kw = dict(options, reduction=reduction)
    out, loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, return_stats=True,
                                      chunk_size=PATHS[path], **kw)
    _, plain_loss, plain_grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=PATHS[path],
                                                **kw)
    assert isinstance(out, fusedloss.LinearCEOutput)
    assert_all_close([loss, *grads], [plain_loss, *plain_grads], rtol=0, atol=0)
    xd, wd, bd = fp64_leaves(x, w, b)
    ref = reference.linear_cross_entropy(xd, wd, t, bd, return_stats=True, **kw)
    valid = t != -100
    for name in ("lse", "entropy"):
        got, expected = getattr(out, name), getattr(ref, name)
        assert got.shape == t.shape and not got.requires_grad
        assert_all_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
        assert got[~valid].isnan().all()
    assert out.argmax.dtype == torch.int64 and torch.equal(out.argmax, ref.argmax)
    assert (out.argmax[~valid] == -1).all()


@pytest.mark.parametrize("path", PATHS)
def test_stats_argmax_takes_the_first_index_on_ties(device, path):
    """Tied maxima inside a chunk and across chunks: the first index, as torch.argmax."""
    v, d = 300, 4
    w = torch.zeros(v, d, device=device)
    w[[7, 150, 299], 0] = 1.0  # three equal maxima: 7 and 150 in different chunks of 128
    w[[200, 201], 1] = 1.0
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]], device=device, requires_grad=True)
    t = torch.tensor([0, 1, 2], device=device)
    out = fusedloss.linear_cross_entropy(x, w, t, return_stats=True, chunk_size=PATHS[path])
    assert out.argmax.tolist() == [7, 200, 0] == (x @ w.T).argmax(-1).tolist()
    assert_all_close(out.entropy[2], torch.tensor(v, dtype=torch.float64).log())  # uniform row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stats_low_precision(device, dtype):
    """bf16 / fp16: the statistics of the fp32-accumulated logits, within the
    operands' rounding of the fp64 reference."""
    x, w, t, b = linear_ce_problem(64, 96, 3001, dtype, device, bias=True, ignore_every=7)
    out = fusedloss.linear_cross_entropy(x, w, t, b, return_stats=True, softcap=8.0)
    ref = reference.linear_cross_entropy(*fp64_leaves(x, w), t, fp64_leaves(b)[0], return_stats=True, softcap=8.0)
    valid = t != -100
    assert_all_close([out.lse[valid], out.entropy[valid]], [ref.lse[valid], ref.entropy[valid]], rtol=2e-2, atol=2e-2)
    # argmax may differ only where the top two logits are within rounding
    logits = (x.double() @ w.double().T + b.double()).float()
    top2 = logits.topk(2, dim=-1).values
    differs = out.argmax != ref.argmax
    assert (top2[differs, 0] - top2[differs, 1] < 0.1).all()


def test_stats_compile_fullgraph(device):
    """return_stats, class_weight and a tensor normalizer trace without graph breaks."""
    x, w, t, b = linear_ce_problem(12, 8, 64, torch.float32, device, bias=True, ignore_every=5)
    cw = class_weights(64, device)
    n = torch.tensor(7.0, device=device)

    def fn(x, w, b):
        out = fusedloss.linear_cross_entropy(x, w, t, b, class_weight=cw, label_smoothing=0.1, reduction="sum",
                                             normalizer=n, return_stats=True)
        return out.loss, out.lse, out.argmax, out.entropy

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, expected = compiled(x, w, b), fn(x, w, b)
    assert_all_close([got[0], got[1].nan_to_num(), got[3].nan_to_num()],
                     [expected[0], expected[1].nan_to_num(), expected[3].nan_to_num()], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[2], expected[2])
    grads = torch.autograd.grad(got[0], (x, w, b))
    expected_grads = torch.autograd.grad(expected[0], (x, w, b))
    assert_all_close(grads, expected_grads, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ------------------------------------------------------------------ class_weight


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weight_equals_torch_fp64(device, path, label_smoothing, reduction):
    """Loss and gradients equal F.cross_entropy(weight=...) on the
    materialised logits in fp64, smoothing included (mean divides by Σ w[y]
    over non-ignored rows)."""
    x, w, t, b = linear_ce_problem(37, 19, 1003, torch.float64, device, bias=True, ignore_every=5)
    cw = class_weights(1003, device, torch.float64)
    _, loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, class_weight=cw,
                                    label_smoothing=label_smoothing, reduction=reduction, chunk_size=PATHS[path])

    def torch_ce(x, w, t, b, **_):
        return F.cross_entropy(F.linear(x, w, b), t, weight=cw, label_smoothing=label_smoothing, reduction=reduction)

    _, ref_loss, ref_grads = loss_and_grads(torch_ce, x, w, t, b)
    assert_all_close([loss, *grads], [ref_loss, *ref_grads], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_class_weight_fp32_with_every_option(device, path):
    """fp32 with softcap, z-loss (scaled by w[y]) and smoothing against the fp64 reference."""
    x, w, t, b = linear_ce_problem(37, 19, 1003, torch.float32, device, bias=True, ignore_every=5)
    kw = dict(class_weight=class_weights(1003, device), label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    _, loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, chunk_size=PATHS[path], **kw)
    _, ref_loss, ref_grads = loss_and_grads(reference.linear_cross_entropy, *fp64_leaves(x, w), t,
                                            fp64_leaves(b)[0], **dict(kw, class_weight=kw["class_weight"].double()))
    assert_all_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_class_weight_gradcheck(path):
    x, w, t, b = linear_ce_problem(6, 4, 11, torch.float64, "cpu", bias=True, ignore_every=4)
    cw = class_weights(11, "cpu", torch.float64)

    def fn(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, t, b, class_weight=cw, label_smoothing=0.15, z_loss=0.01,
                                              softcap=2.0, chunk_size=PATHS[path] and 4)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_class_weight_mean_of_all_ignored_rows_is_zero(device):
    x, w, t, _ = linear_ce_problem(5, 4, 9, torch.float32, device)
    t.fill_(-100)
    loss = fusedloss.linear_cross_entropy(x, w, t, class_weight=class_weights(9, device))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all() and (w.grad == 0).all()


def test_class_weight_module_buffer():
    """LinearCrossEntropyLoss keeps class_weight as a buffer (moves with .to())."""
    cw = class_weights(9, "cpu")
    module = fusedloss.LinearCrossEntropyLoss(class_weight=cw, return_stats=True)
    assert "class_weight" in dict(module.named_buffers())
    x, w, t, _ = linear_ce_problem(5, 4, 9, torch.float32, "cpu")
    out = module(x, w, t)
    assert_all_close(out.loss, F.cross_entropy(x @ w.T, t, weight=cw), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- normalizer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_normalizer_divides_the_sum(device, path, as_tensor):
    """reduction='sum' with normalizer=n is the sum / n, gradients included
    (n a float, or a 0-dim / 1-element tensor, int or float)."""
    x, w, t, b = linear_ce_problem(37, 19, 1003, torch.float32, device, bias=True, ignore_every=5)
    n = torch.tensor([41], device=device) if as_tensor else 41.0
    _, loss, grads = loss_and_grads(fusedloss.linear_cross_entropy, x, w, t, b, reduction="sum", normalizer=n,
                                    chunk_size=PATHS[path])
    _, ref_loss, ref_grads = loss_and_grads(reference.linear_cross_entropy, *fp64_leaves(x, w), t,
                                            fp64_leaves(b)[0], reduction="sum")
    assert_all_close([loss, *grads], [ref_loss / 41, *(g / 41 for g in ref_grads)], rtol=1e-5, atol=1e-6)


def test_normalizer_micro_batches_equal_one_batch():
    """The data-parallel / accumulation recipe: each micro-batch's sum divided
    by the global token count adds up to the mean over the whole batch."""
    x, w, t, _ = linear_ce_problem(40, 8, 97, torch.float32, "cpu", ignore_every=3)
    full = torch.autograd.grad(fusedloss.linear_cross_entropy(x, w, t), (x, w))
    num_items = (t != -100).sum()
    for half in (slice(0, 20), slice(20, 40)):
        fusedloss.linear_cross_entropy(x[half], w, t[half], reduction="sum", normalizer=num_items).backward()
    assert_all_close([x.grad, w.grad], list(full), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(normalizer=4.0), ValueError, "pass reduction='sum'"),
    (dict(normalizer=4.0, reduction="none"), ValueError, "pass reduction='sum'"),
    (dict(normalizer=0.0, reduction="sum"), ValueError, "normalizer must be positive"),
    (dict(normalizer=float("inf"), reduction="sum"), ValueError, "normalizer must be positive and finite"),
    (dict(normalizer="4", reduction="sum"), TypeError, "normalizer must be a number"),
    (dict(normalizer=torch.ones(2), reduction="sum"), ValueError, "1-element real tensor"),
    (dict(normalizer=torch.tensor(True), reduction="sum"), ValueError, "1-element real tensor"),
    (dict(class_weight=[1.0] * 9), TypeError, "class_weight must be a torch.Tensor"),
    (dict(class_weight=torch.ones(8)), ValueError, r"class_weight must be \[num_classes\]=\[9\]"),
    (dict(class_weight=torch.ones(9, 1)), ValueError, r"class_weight must be \[num_classes\]"),
    (dict(class_weight=torch.ones(9, dtype=torch.long)), TypeError, "class_weight must be a floating tensor"),
    (dict(class_weight=torch.ones(9, device="meta")), ValueError, "class_weight is on meta"),
    (dict(class_weight=torch.ones(9, requires_grad=True)), ValueError, "class_weight is not differentiated"),
])
def test_bad_arguments_raise(kwargs, error, match):
    x, w, t, _ = linear_ce_problem(5, 4, 9, torch.float32, "cpu")
    for chunk_size in (None, 4):  # both paths
        with pytest.raises(error, match=match):
            fusedloss.linear_cross_entropy(x, w, t, chunk_size=chunk_size, **kwargs)
