"""SigLIP sigmoid loss: the fused op vs the full-matrix reference (open_clip's
formula), gradients of features, logit_scale and logit_bias, bad inputs,
torch.compile / opcheck, and the distributed version with 2-3 gloo ranks."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import distributed as fdist
from fusedloss import reference as ref
from conftest import assert_all_close, assert_close_to_oracle, detached, features, fp64_leaves, requires_cuda

ops = torch.ops.fusedloss
TILE = 8  # several column tiles, a ragged last one for B = 37


def grads(loss, inputs, weight=None):
    upstream = torch.ones_like(loss) if weight is None else weight
    return torch.autograd.grad(loss, inputs, upstream, retain_graph=True)


def problem(batch, dim, device, dtype=torch.float32, *, scale=10.0, bias=-10.0, normalize=True, seed=0):
    """Features (L2-normalised, as SigLIP models give them) and a learnable
    logit_scale (the multiplier, already exponentiated) and logit_bias."""
    image, text = features(batch, dim, device, dtype, seed=seed), features(batch, dim, device, dtype, seed=seed + 1)
    if normalize:
        image, text = (F.normalize(t.detach().float(), dim=-1).to(dtype).requires_grad_() for t in (image, text))
    s = torch.tensor(scale, device=device, requires_grad=True)
    b = torch.tensor(bias, device=device, requires_grad=True)
    return image, text, s, b


def open_clip_siglip(image, text, logit_scale, logit_bias):
    """open_clip's SigLipLoss (loss.py, world_size=1), restated: logits
    ``logit_scale * I @ T.T + logit_bias``, labels ``2 * eye - 1``,
    ``-logsigmoid(labels * logits).sum() / B``."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(image.shape[0], device=image.device, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


# --------------------------------------------------------------------- values


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tile_size", [1, TILE, 1000])
def test_matches_reference_fp32(device, reduction, tile_size):
    """Values and the gradients of both features, logit_scale and logit_bias equal the reference."""
    image, text, s, b = problem(37, 24, device)
    inputs = [image, text, s, b]
    ours = fusedloss.siglip_loss(image, text, s, b, reduction=reduction, tile_size=tile_size)
    expected = ref.siglip_loss(image, text, s, b, reduction=reduction)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    weight = torch.rand(ours.shape, device=device) if reduction == "none" else None
    assert_all_close(grads(ours, inputs, weight), grads(expected, inputs, weight), rtol=1e-4, atol=1e-6)


def test_equals_open_clip_formula_fp64(device):
    """fp64: mean equals open_clip's SigLipLoss formula to rounding, gradients included."""
    image, text, s, b = fp64_leaves(*problem(29, 16, device))
    inputs = [image, text, s, b]
    ours = fusedloss.siglip_loss(image, text, s, b, tile_size=TILE)
    expected = open_clip_siglip(image, text, s, b)
    torch.testing.assert_close(ours, expected, rtol=1e-13, atol=1e-13)
    assert_all_close(grads(ours, inputs), grads(expected, inputs), rtol=1e-12, atol=1e-13)


def _open_clip_loss_module():
    """open_clip's loss.py loaded by path (no torchvision needed), or None."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = spec.submodule_search_locations[0] + "/loss.py"
    loader = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def test_equals_open_clip_siglip_loss_when_installed():
    """The real open_clip SigLipLoss on the same inputs (skipped when open_clip is not installed)."""
    oc = _open_clip_loss_module()
    if oc is None:
        pytest.skip("open_clip is not installed")
    image, text, s, b = fp64_leaves(*problem(33, 16, "cpu"))
    inputs = [image, text, s, b]
    ours = fusedloss.siglip_loss(image, text, s, b, tile_size=TILE)
    theirs = oc.SigLipLoss()(image, text, s, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    assert_all_close(grads(ours, inputs), grads(theirs, inputs), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("scale, bias, normalize", [(10.0, -10.0, True), (100.0, -3.0, True), (30.0, 5.0, False)],
                         ids=["siglip-init", "large-scale", "unnormalised"])
def test_fp32_close_to_fp64_oracle(device, scale, bias, normalize):
    """fp32 stays as close to the fp64 oracle as PyTorch's fp32 reference, at
    SigLIP's initial scale / bias (most logits near -10, where the loss terms
    are ~4.5e-5 each), at a large scale, and with logits in the hundreds."""
    image, text, s, b = problem(64, 32, device, scale=scale, bias=bias, normalize=normalize, seed=3)
    inputs = [image, text, s, b]
    oracle_inputs = fp64_leaves(*inputs)
    ours = fusedloss.siglip_loss(image, text, s, b, tile_size=24)
    baseline = ref.siglip_loss(image, text, s, b)
    oracle = ref.siglip_loss(*oracle_inputs)
    assert_close_to_oracle([ours, *grads(ours, inputs)], [baseline, *grads(baseline, inputs)],
                           [oracle, *grads(oracle, oracle_inputs)], slack=2.0, atol=1e-7, rtol=1e-6,
                           what="loss, grads:")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp64_oracle(device, dtype):
    """bf16 / fp16 loss and gradients are within twice PyTorch's own error of the fp64 oracle."""
    image, text, s, b = problem(40, 64, device, dtype, seed=5)
    inputs = [image, text, s, b]
    oracle_inputs = fp64_leaves(*inputs)
    ours = fusedloss.siglip_loss(image, text, s, b, tile_size=TILE)
    baseline = ref.siglip_loss(image, text, s, b)  # the same math in half precision, full matrix
    oracle = ref.siglip_loss(*oracle_inputs)
    assert ours.dtype == torch.float32 and grads(ours, [image])[0].dtype == dtype
    # The feature gradients are fp32 results rounded once to the input dtype:
    # half an ulp of the largest one (2**-9 relative in bf16) is allowed even
    # where the reference happens to round closer.
    assert_close_to_oracle([ours, *grads(ours, inputs)], [baseline, *grads(baseline, inputs)],
                           [oracle, *grads(oracle, oracle_inputs)], slack=2.0, atol=0.0, rtol=2**-8,
                           what="loss, grads:")


def test_constants_noncontiguous_and_no_grad(device):
    """Float scale / bias are constants; non-contiguous features; without grad the
    loss-only path gives the same value."""
    image = features(24, 19, device, seed=7).T  # [19, 24], non-contiguous
    text = features(19, 24, device, seed=8)
    ours = fusedloss.siglip_loss(image, text, 5.0, -2.0, tile_size=TILE)
    expected = ref.siglip_loss(image, text, 5.0, -2.0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert_all_close(grads(ours, [image, text]), grads(expected, [image, text]), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fusedloss.siglip_loss(image, text, 5.0, -2.0, tile_size=TILE), ours.detach())


def test_only_some_inputs_require_grad(device):
    """Only the tensors that require grad get (and are asked for) gradients."""
    image, text, s, b = problem(17, 8, device, seed=9)
    text = text.detach()
    for reduction in ("mean", "none"):
        ours = fusedloss.siglip_loss(image, text, s.detach(), b, reduction=reduction, tile_size=4)
        expected = ref.siglip_loss(image, text, s.detach(), b, reduction=reduction)
        assert_all_close(grads(ours, [image, b]), grads(expected, [image, b]), rtol=1e-4, atol=1e-6)


def test_positive_offset_layout():
    """The op with R image rows against C gathered text columns, row i's positive
    at column i + offset (rows whose positive falls outside have only negatives)."""
    image = features(7, 8, "cpu", torch.float64, seed=10)
    text = features(30, 8, "cpu", torch.float64, seed=11)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    inputs = [image, text, s, b]
    for offset in (0, 12, 26):
        loss = ops.siglip_forward(image, text, s, b, offset, 4)
        column = torch.arange(7) + offset
        labels = torch.where(torch.arange(30) == column[:, None], 1.0, -1.0).double()
        expected = -F.logsigmoid(labels * (s * image @ text.T + b)).sum(1)
        torch.testing.assert_close(loss, expected)
        weight = torch.rand(7, dtype=torch.float64)
        assert_all_close(grads(loss, inputs, weight), grads(expected, inputs, weight), rtol=1e-10, atol=1e-12)
        total, *sum_grads = ops.siglip_sum_and_grad(*detached(inputs), offset, 4, [True] * 4)
        torch.testing.assert_close(total, expected.sum())
        assert_all_close(sum_grads, grads(expected.sum(), inputs), rtol=1e-10, atol=1e-12)


def test_module_matches_function():
    """SigLipLoss (open_clip's name) matches siglip_loss; Parameters get gradients."""
    image, text, _, _ = problem(10, 8, "cpu", seed=12)
    scale, bias = torch.nn.Parameter(torch.tensor(10.0)), torch.nn.Parameter(torch.tensor(-10.0))
    module = fusedloss.SigLipLoss(tile_size=3)
    module(image, text, scale, bias).backward()
    assert scale.grad is not None and bias.grad is not None
    torch.testing.assert_close(module(image, text, scale, bias), fusedloss.siglip_loss(image, text, scale, bias))
    assert "reduction='mean'" in repr(fusedloss.SigLipLoss())


# ------------------------------------------------------------------ autograd


def test_gradcheck_float64():
    """fp64 gradients of the one-pass (reduced) and recomputing (per-row) paths pass gradcheck."""
    image, text, s, b = fp64_leaves(*problem(5, 4, "cpu", scale=3.0, bias=-1.0, seed=13))
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda i, t, s, b: fusedloss.siglip_loss(i, t, s, b, reduction=reduction, tile_size=2), (image, text, s, b))


def test_retained_graph_backward_is_repeatable():
    """A retained graph differentiated twice (the second reruns the pass) gives identical gradients."""
    image, text, s, b = problem(12, 8, "cpu", seed=14)
    loss = fusedloss.siglip_loss(image, text, s, b, tile_size=5)
    first = grads(2.0 * loss, [image, text, s, b])
    second = grads(2.0 * loss, [image, text, s, b])
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_double_backward_is_a_clear_error():
    image, text, s, b = problem(6, 4, "cpu", seed=15)
    loss = fusedloss.siglip_loss(image, text, s, b)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [image], create_graph=True)


def test_autocast_runs_in_the_autocast_dtype():
    """Under CPU autocast the loss runs in bf16 and fp32 leaves get fp32 gradients."""
    image, text, s, b = problem(9, 8, "cpu", seed=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fusedloss.siglip_loss(image, text, s, b, tile_size=4)
    expected = fusedloss.siglip_loss(image.bfloat16(), text.bfloat16(), s, b)
    torch.testing.assert_close(got, expected)
    assert grads(got, [image])[0].dtype == torch.float32


@requires_cuda
def test_cuda_memory_is_not_quadratic():
    """CUDA memory stays far below the B x B logits."""
    batch, tile = 16384, 512  # B x B in fp32 would be 1 GiB
    image, text, s, b = problem(batch, 64, "cuda", torch.bfloat16, seed=17)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fusedloss.siglip_loss(image, text, s, b, tile_size=tile).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 256 * 2**20
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()


# ------------------------------------------------------------------ bad input


def rand(*shape, **kw):
    return torch.randn(*shape, **kw)


def siglip(image=None, text=None, scale=10.0, bias=-10.0, **kw):
    image = rand(4, 8) if image is None else image
    text = rand(4, 8) if text is None else text
    return fusedloss.siglip_loss(image, text, scale, bias, **kw)


BAD_INPUTS = [
    ("image not 2-D", lambda: siglip(image=rand(8)), ValueError, "image_features must be 2-D"),
    ("text D", lambda: siglip(text=rand(4, 6)), ValueError, "D="),
    ("text rows", lambda: siglip(text=rand(3, 8)), ValueError, "rows"),
    ("no pairs", lambda: siglip(image=rand(0, 8), text=rand(0, 8)), ValueError, "no rows"),
    ("dtype mismatch", lambda: siglip(text=rand(4, 8, dtype=torch.float64)), TypeError, "text_features dtype"),
    ("integer features", lambda: siglip(image=torch.ones(4, 8, dtype=torch.long), text=torch.ones(4, 8,
                                        dtype=torch.long)), TypeError, "image_features"),
    ("list features", lambda: siglip(image=[[1.0]]), TypeError, "torch.Tensor"),
    ("scale shape", lambda: siglip(scale=torch.ones(1)), ValueError, "logit_scale"),
    ("integer scale", lambda: siglip(scale=torch.tensor(10)), TypeError, "logit_scale"),
    ("nan scale", lambda: siglip(scale=float("nan")), ValueError, "logit_scale"),
    ("string bias", lambda: siglip(bias="-10"), TypeError, "logit_bias"),
    ("bool bias", lambda: siglip(bias=True), TypeError, "logit_bias"),
    ("inf bias", lambda: siglip(bias=float("-inf")), ValueError, "logit_bias"),
    ("reduction", lambda: siglip(reduction="avg"), ValueError, "reduction"),
    ("tile_size zero", lambda: siglip(tile_size=0), ValueError, "tile_size"),
    ("tile_size float", lambda: siglip(tile_size=8.0), TypeError, "tile_size"),
    ("op: text D", lambda: ops.siglip_forward(rand(4, 8), rand(4, 6), torch.tensor(1.0), torch.tensor(0.0), 0, 0),
     ValueError, "text_features"),
    ("op: scale shape", lambda: ops.siglip_sum_and_grad(rand(4, 8), rand(4, 8), torch.ones(2), torch.tensor(0.0), 0,
                                                         0, [True] * 4), ValueError, "logit_scale"),
    ("op: integer bias", lambda: ops.siglip_forward(rand(4, 8), rand(4, 8), torch.tensor(1.0), torch.tensor(0), 0, 0),
     TypeError, "logit_bias"),
    ("op: backward grad size", lambda: ops.siglip_backward(rand(3), rand(4, 8), rand(4, 8), torch.tensor(1.0),
                                                           torch.tensor(0.0), 0, 0, [True] * 4), ValueError,
     "grad_loss"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD_INPUTS])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@requires_cuda
@pytest.mark.parametrize("which", ["text_features", "logit_scale", "logit_bias"])
def test_device_mismatch(which):
    image, text = rand(4, 8, device="cuda"), rand(4, 8, device="cuda")
    scale, bias = torch.tensor(1.0, device="cuda"), torch.tensor(0.0, device="cuda")
    args = dict(text_features=text, logit_scale=scale, logit_bias=bias)
    args[which] = args[which].cpu()
    with pytest.raises(ValueError, match=which if which != "text_features" else "text_features"):
        fusedloss.siglip_loss(image, args["text_features"], args["logit_scale"], args["logit_bias"])


# ------------------------------------------------- torch.compile and opcheck


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("reduction, backend", [("mean", "inductor"), ("none", "aot_eager"), ("sum", "aot_eager")])
def test_compile_fullgraph(device, fresh_dynamo, reduction, backend):
    """siglip_loss with a learnable scale and bias compiles without graph breaks and matches eager."""
    image, text, s, b = problem(12, 8, device, seed=18)

    def loss_and_grads(fn):
        inputs = [t.detach().clone().requires_grad_() for t in (image, text, s, b)]
        loss = fn(*inputs)
        weight = torch.linspace(0.5, 1.5, loss.numel(), device=device).reshape(loss.shape)
        return [loss.detach(), *torch.autograd.grad((loss * weight).sum(), inputs)]

    def fn(i, t, s, b):
        return 2.0 * fusedloss.siglip_loss(i, t, s, b, reduction=reduction, tile_size=5)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    assert_all_close(loss_and_grads(compiled), loss_and_grads(fn), rtol=1e-5, atol=1e-6)


BACKWARD_MASKS = ([True, True, True, True], [True, False, False, True], [False, True, True, False])


def test_opcheck(device):
    """siglip_forward, siglip_backward and siglip_sum_and_grad: schema, fake kernel, autograd, AOT dispatch."""
    image, text, s, b = problem(6, 5, device, seed=19)
    image, text = image.detach()[:, :5], features(9, 5, device, seed=20)  # R != C: a gathered layout
    image.requires_grad_()
    options = (2, 4)  # positive_offset, tile_size
    torch.library.opcheck(ops.siglip_forward.default, (image, text, s, b, *options))
    plain = detached((image, text, s, b))
    for mask in BACKWARD_MASKS:
        torch.library.opcheck(ops.siglip_backward.default, (torch.rand(6, device=device), *plain, *options, mask))
        leaves = [t.clone().requires_grad_(m) for t, m in zip(plain, mask)]
        torch.library.opcheck(ops.siglip_sum_and_grad.default, (*leaves, *options, mask))


# ------------------------------------------------------------------ distributed


def _check_distributed(rank, world, device):
    batch, dim = 5, 8
    for index, (reduction, tensor_scalars) in enumerate([("mean", True), ("sum", True), ("none", False)]):
        gen = torch.Generator().manual_seed(index)  # the same data on every rank
        full = [F.normalize(torch.randn(world * batch, dim, generator=gen), dim=-1) for _ in range(2)]
        weights = torch.rand(world * batch, generator=gen)
        leaf = lambda t: t.detach().clone().to(device).requires_grad_()  # noqa: E731
        ref_in = [leaf(t) for t in full]
        ref_scalars = [leaf(torch.tensor(v)) for v in (8.0, -4.0)] if tensor_scalars else [8.0, -4.0]
        rows = fusedloss.siglip_loss(*ref_in, *ref_scalars, reduction="none", tile_size=4).view(world, batch)
        ref = {"mean": rows.sum(1) / batch, "sum": rows.sum(1), "none": rows * weights.view(world, batch)}[reduction]
        ref.sum().backward()

        mine = slice(rank * batch, (rank + 1) * batch)
        local = [leaf(t[mine]) for t in full]
        scalars = [leaf(torch.tensor(v)) for v in (8.0, -4.0)] if tensor_scalars else [8.0, -4.0]
        loss = fdist.siglip_loss(*local, *scalars, reduction=reduction, tile_size=3)
        objective = loss * weights[mine].to(device) if reduction == "none" else loss
        objective.sum().backward()

        where = f"siglip {reduction} rank {rank}/{world}"
        tol = dict(rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(objective.detach(), ref[rank].detach(), **tol, msg=where)
        torch.testing.assert_close(local[0].grad, ref_in[0].grad[mine], **tol, msg=where)
        torch.testing.assert_close(local[1].grad, ref_in[1].grad[mine], **tol, msg=where)
        if tensor_scalars:  # each rank holds d(its loss)/d(scale, bias); DDP would combine them
            for got, expected in zip(scalars, ref_scalars):
                total = got.grad.detach().clone()
                torch.distributed.all_reduce(total)
                torch.testing.assert_close(total, expected.grad, **tol, msg=where)
    _check_against_open_clip(rank, world, device)
    # Cross-rank checks: a different local batch on one rank raises everywhere.
    with pytest.raises(ValueError, match="local batch size"):
        fdist.siglip_loss(torch.randn(4 + rank, 3), torch.randn(4 + rank, 3), 1.0, 0.0)
    if rank == 0:
        with pytest.raises(ValueError, match="logit_bias"):
            fdist.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 1.0, float("nan"))
    else:
        with pytest.raises(ValueError, match="rank 0 of the group got invalid arguments"):
            fdist.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 1.0, 0.0)


def _check_against_open_clip(rank, world, device):
    """Each of open_clip's distributed SigLipLoss implementations, when open_clip
    is installed: the same per-rank loss and local gradients."""
    oc = _open_clip_loss_module()
    if oc is None:
        return
    gen = torch.Generator().manual_seed(42)
    full = [F.normalize(torch.randn(world * 4, 8, generator=gen, dtype=torch.float64), dim=-1) for _ in range(2)]
    mine = slice(rank * 4, (rank + 1) * 4)

    def run(fn):
        leaves = [t[mine].clone().to(device).requires_grad_() for t in full]
        scalars = [torch.tensor(v, dtype=torch.float64, device=device, requires_grad=True) for v in (6.0, -3.0)]
        loss = fn(*leaves, *scalars)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves + scalars]

    ours = run(lambda i, t, s, b: fdist.siglip_loss(i, t, s, b))
    for impl in ("bidir", "shift", "reduce", "gather"):
        theirs = run(oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl))
        assert_all_close(ours, theirs, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_single_process(tmp_path, world):
    """Every rank's loss and gradients (features, scale, bias) equal the
    single-process loss on the concatenated batch, restricted to its rows (and
    open_clip's distributed SigLipLoss, all four dist_impl, when installed)."""
    from test_distributed import _spawn

    _spawn(tmp_path, world, _check_distributed)


def test_distributed_needs_a_process_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        fdist.siglip_loss(torch.randn(4, 3), torch.randn(4, 3), 1.0, 0.0)
