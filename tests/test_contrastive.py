"""InfoNCE / NT-Xent / CLIP: fused tiled op vs the full-matrix references
(bad inputs: test_bad_input.py; opcheck, torch.compile: test_compile.py)."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import reference as ref
from conftest import assert_all_close, assert_close_to_oracle, features, fp64_leaves, requires_cuda

TILE = 8  # forces several column tiles, with a ragged last one for B = 37


def grads(loss, inputs, weight=None):
    upstream = torch.ones_like(loss) if weight is None else weight
    return torch.autograd.grad(loss, inputs, upstream, retain_graph=True)


# --------------------------------------------------------------------- values


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("num_negatives", [0, 11])
@pytest.mark.parametrize("normalize", [False, True])
def test_info_nce_matches_reference_fp32(device, symmetric, num_negatives, normalize):
    """info_nce_loss equals the full-matrix reference, values and gradients (temperature included)."""
    B, D = 37, 24
    q, k = features(B, D, device, seed=1), features(B, D, device, seed=2)
    negatives = features(num_negatives, D, device, seed=3) if num_negatives else None
    temperature = torch.tensor(0.2 if normalize else 3.0, device=device, requires_grad=True)
    inputs = [q, k, temperature] + ([negatives] if negatives is not None else [])
    kwargs = dict(negatives=negatives, temperature=temperature, normalize=normalize, symmetric=symmetric)
    ours = fusedloss.info_nce_loss(q, k, tile_size=TILE, **kwargs)
    expected = ref.info_nce_loss(q, k, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert_all_close(grads(ours, inputs), grads(expected, inputs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("tile_size", [1, 5, 1000])
def test_info_nce_reductions_and_upstream_weights(device, reduction, tile_size):
    """Every reduction and tile size, with a non-contiguous key and per-row upstream weights."""
    B, D = 19, 8
    q, n = features(B, D, device, seed=4), features(6, D, device, seed=6)
    k = features(D, B, device, seed=5).T  # non-contiguous
    kwargs = dict(negatives=n, temperature=0.5, symmetric=True, reduction=reduction)
    ours = fusedloss.info_nce_loss(q, k, tile_size=tile_size, **kwargs)
    expected = ref.info_nce_loss(q, k, **kwargs)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    weight = torch.rand(ours.shape, device=device) if reduction == "none" else None
    assert_all_close(grads(ours, [q, k, n], weight), grads(expected, [q, k, n], weight), rtol=1e-4, atol=1e-6)


def test_nt_xent_matches_reference_and_simclr(device):
    """nt_xent_loss equals the reference and SimCLR's own formulation."""
    N, D, tau = 13, 16, 0.5
    hidden = features(2 * N, D, device, seed=7)
    temperature = torch.tensor(tau, device=device, requires_grad=True)
    ours = fusedloss.nt_xent_loss(hidden, temperature=temperature, tile_size=TILE)
    expected = ref.nt_xent_loss(hidden, temperature=temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert_all_close(grads(ours, [hidden, temperature]), grads(expected, [hidden, temperature]),
                     rtol=1e-4, atol=1e-6)

    # SimCLR's objective.py (google-research/simclr), re-derived: per-view
    # blocks, self-similarity removed by subtracting LARGE_NUM, returns
    # loss_a + loss_b = twice the 2N-mean.
    h = F.normalize(hidden.detach().double(), dim=-1)
    h1, h2 = h[:N], h[N:]
    masks = torch.eye(N, dtype=torch.float64, device=device) * 1e9
    aa, bb = h1 @ h1.T / tau - masks, h2 @ h2.T / tau - masks
    ab, ba = h1 @ h2.T / tau, h2 @ h1.T / tau
    labels = torch.arange(N, device=device)
    simclr = (F.cross_entropy(torch.cat([ab, aa], 1), labels)
              + F.cross_entropy(torch.cat([ba, bb], 1), labels))
    torch.testing.assert_close(2 * ours.double(), simclr, rtol=1e-5, atol=1e-6)
    per_anchor = fusedloss.nt_xent_loss(hidden, temperature=tau, reduction="none", tile_size=TILE)
    assert per_anchor.shape == (2 * N,)
    torch.testing.assert_close(per_anchor.mean(), ours.detach(), rtol=1e-6, atol=1e-6)


def test_clip_is_mean_of_row_and_column_ce(device):
    """clip_loss is the mean of the image->text and text->image cross-entropies."""
    B, D = 29, 16
    image = features(B, D, device, seed=8)
    text = features(B, D, device, seed=9)
    image_n, text_n = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logit_scale = torch.tensor(14.0, device=device, requires_grad=True)
    ours = fusedloss.clip_loss(image_n, text_n, logit_scale, tile_size=TILE)
    logits = logit_scale * image_n @ text_n.T
    labels = torch.arange(B, device=device)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    inputs = [image, text, logit_scale]
    assert_all_close(grads(ours, inputs), grads(expected, inputs), rtol=1e-4, atol=1e-6)
    # A float logit_scale is a constant; per-pair losses average to the mean.
    rows = fusedloss.clip_loss(image_n, text_n, 14.0, reduction="none", tile_size=TILE)
    torch.testing.assert_close(rows, ref.clip_loss(image_n, text_n, 14.0, reduction="none"), rtol=1e-5, atol=1e-6)


def test_single_query_with_only_extra_negatives(device):
    """One query with extra negatives matches the reference."""
    D = 12
    q, k, n = features(1, D, device, seed=10), features(1, D, device, seed=11), features(9, D, device, seed=12)
    ours = fusedloss.info_nce_loss(q, k, negatives=n, temperature=0.3, tile_size=4)
    expected = ref.info_nce_loss(q, k, negatives=n, temperature=0.3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert_all_close(grads(ours, [q, k, n]), grads(expected, [q, k, n]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_name", ["info_nce", "nt_xent", "clip"])
def test_tiny_temperature_does_not_overflow(device, dtype, loss_name):
    """Logits in the thousands stay finite and close to the fp64 oracle."""
    # tau = 0.01 on unnormalised features: logits in the thousands, where a
    # naive exp overflows. Compared with the fp64 oracle.
    B, D = 24, 32
    a = features(B, D, device, dtype, seed=13)
    b = features(B, D, device, dtype, seed=14)
    if loss_name == "info_nce":
        run = lambda mod, x, y, **kw: mod.info_nce_loss(x, y, temperature=0.01, symmetric=True, **kw)  # noqa: E731
    elif loss_name == "nt_xent":
        run = lambda mod, x, y, **kw: mod.nt_xent_loss(torch.cat([x, y]), temperature=0.01, **kw)  # noqa: E731
    else:
        run = lambda mod, x, y, **kw: mod.clip_loss(x, y, 100.0, **kw)  # noqa: E731
    ours = run(fusedloss, a, b, tile_size=TILE)
    oracle_inputs = fp64_leaves(a, b)
    oracle = run(ref, *oracle_inputs)
    # Logits ~ 1e3: fp32 rounds them by ~6e-5 (bf16 operands are exact in the
    # fp32 CPU GEMM; the CUDA path rounds dlogits to bf16). A NaN or inf fails.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close_to_oracle([ours, *grads(ours, [a, b])], None, [oracle, *grads(oracle, oracle_inputs)],
                           atol=1e-6, rtol=tol, what="loss, grads:")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["info_nce", "nt_xent", "clip"])
def test_half_precision_close_to_fp64_oracle(device, dtype, loss_name):
    """bf16 / fp16 loss and gradients are within twice PyTorch's own error of the fp64 oracle."""
    B, D = 40, 64
    tensors = [features(B, D, device, dtype, seed=15 + i) for i in range(3)]
    temperature = torch.tensor(0.1, device=device, requires_grad=True)

    def run(mod, q, k, n, t, **kw):
        if loss_name == "info_nce":
            return mod.info_nce_loss(q, k, negatives=n, temperature=t, normalize=True, symmetric=True, **kw)
        if loss_name == "nt_xent":
            return mod.nt_xent_loss(torch.cat([q, k]), temperature=t, **kw)
        return mod.clip_loss(F.normalize(q, dim=-1), F.normalize(k, dim=-1), 1 / t, **kw)

    inputs = tensors + [temperature] if loss_name == "info_nce" else tensors[:2] + [None, temperature]
    oracle_inputs = fp64_leaves(*inputs)
    used, oracle_used = ([t for t in ts if t is not None] for ts in (inputs, oracle_inputs))
    ours = run(fusedloss, *inputs, tile_size=TILE)
    baseline = run(ref, *inputs)  # the same math in half precision, full matrix
    oracle = run(ref, *oracle_inputs)
    assert_close_to_oracle([ours, *grads(ours, used)], [baseline, *grads(baseline, used)],
                           [oracle, *grads(oracle, oracle_used)], slack=2.0, atol=0.0, rtol=1e-3,
                           what="loss, grads:")


def test_rows_as_slice_of_gathered_columns():
    """The op with rows at an offset into the columns (distributed layout) matches a masked cross-entropy."""
    # The distributed layout: R local query rows are rows [off, off + R) of the
    # C gathered key columns; positives and the self mask sit at an offset.
    C, R, D, off = 30, 7, 8, 12
    keys = features(C, D, "cpu", torch.float64, seed=20)
    rows = keys.detach()[off:off + R].clone().requires_grad_()
    positives = torch.arange(R) + off + 3
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss, _, _ = torch.ops.fusedloss.contrastive_forward(rows, keys, positives, scale, None, None, off, [], [], False, 4)
    logits = scale * rows @ keys.T
    logits = logits.masked_fill(torch.arange(C) == (torch.arange(R) + off)[:, None], float("-inf"))
    expected = F.cross_entropy(logits, positives, reduction="none")
    torch.testing.assert_close(loss, expected)
    weight = torch.rand(R, dtype=torch.float64)
    assert_all_close(grads(loss, [rows, keys, scale], weight), grads(expected, [rows, keys, scale], weight),
                     rtol=1e-7, atol=1e-10)


def test_modules_match_functions():
    """InfoNCELoss / NTXentLoss / ClipLoss match the functional forms; a Parameter temperature gets a gradient."""
    B, D = 10, 8
    q, k = features(B, D, "cpu", seed=21), features(B, D, "cpu", seed=22)
    temperature = torch.nn.Parameter(torch.tensor(0.3))
    module = fusedloss.InfoNCELoss(temperature, symmetric=True, tile_size=3)
    module(q, k).backward()
    assert temperature.grad is not None and torch.isfinite(temperature.grad)
    torch.testing.assert_close(module(q, k), fusedloss.info_nce_loss(q, k, temperature=temperature, symmetric=True))
    hidden = torch.cat([q, k])
    torch.testing.assert_close(fusedloss.NTXentLoss(0.2, reduction="sum")(hidden),
                               fusedloss.nt_xent_loss(hidden, temperature=0.2, reduction="sum"))
    torch.testing.assert_close(fusedloss.ClipLoss()(q, k, 5.0), ref.clip_loss(q, k, 5.0))


# ------------------------------------------------------------------ autograd


def test_gradcheck_float64():
    """fp64 gradients of the three losses pass gradcheck."""
    B, D = 5, 4
    q, k, n = (features(r, D, "cpu", torch.float64, seed=30 + r) for r in (B, B, 3))
    t = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, n, t: fusedloss.info_nce_loss(q, k, negatives=n, temperature=t, normalize=True,
                                                   symmetric=True, reduction="none", tile_size=2),
        (q, k, n, t))
    h = features(2 * B, D, "cpu", torch.float64, seed=40)
    assert torch.autograd.gradcheck(
        lambda h, t: fusedloss.nt_xent_loss(h, temperature=t, reduction="none", tile_size=3), (h, t))
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, s: fusedloss.clip_loss(q, k, s, reduction="none", tile_size=2), (q, k, s))


def test_autocast_runs_in_the_autocast_dtype():
    """Under CPU autocast the loss runs in bf16 and fp32 leaves get fp32 gradients."""
    B, D = 9, 8
    q, k = features(B, D, "cpu", seed=70), features(B, D, "cpu", seed=71)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fusedloss.info_nce_loss(q, k, temperature=0.5, symmetric=True, tile_size=4)
    expected = fusedloss.info_nce_loss(q.bfloat16(), k.bfloat16(), temperature=0.5, symmetric=True)
    torch.testing.assert_close(got, expected)
    assert grads(got, [q, k])[0].dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("loss_name", ["info_nce", "clip"])
def test_cuda_memory_is_not_quadratic(loss_name):
    """CUDA memory stays far below the B x B logits."""
    # B x B in fp32 would be 1 GiB; the tiled op needs the [B, tile] block.
    B, D, tile = 16384, 64, 512
    q, k = features(B, D, "cuda", torch.bfloat16, seed=80), features(B, D, "cuda", torch.bfloat16, seed=81)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if loss_name == "info_nce":
        loss = fusedloss.info_nce_loss(q, k, temperature=0.07, symmetric=True, tile_size=tile)
    else:
        loss = fusedloss.clip_loss(q, k, 14.0, tile_size=tile)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 256 * 2**20
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_symmetric_with_self_mask_over_several_column_strips(device):
    """Square, self-masked, symmetric op over several column strips matches the reference."""
    # The op's most general form: square, self-masked, symmetric, tiles wider
    # than one CPU column strip (32) with a ragged last tile.
    n, D = 100, 16
    hidden = features(n, D, device, seed=90)
    positives = (torch.arange(n, device=device) + n // 2) % n
    scale = torch.tensor(3.0, device=device, requires_grad=True)
    loss, _, _ = torch.ops.fusedloss.contrastive_forward(hidden, hidden, positives, scale, None, None, 0, [], [], True,
                                                         70)
    logits = (scale * hidden @ hidden.T).masked_fill(torch.eye(n, dtype=torch.bool, device=device), float("-inf"))
    expected = 0.5 * (F.cross_entropy(logits, positives, reduction="none")
                      + torch.logsumexp(logits, 0)[positives] - logits.gather(1, positives[:, None]).squeeze(1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    weight = torch.rand(n, device=device)
    assert_all_close(grads(loss, [hidden, scale], weight), grads(expected, [hidden, scale], weight),
                     rtol=1e-4, atol=1e-5)
