"""InfoNCE / NT-Xent / CLIP: every malformed call raises a clear error before
any kernel runs."""
import pytest
import torch

import fusedloss

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ops = torch.ops.fusedloss


def x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def test_nt_xent_needs_an_even_row_count():
    with pytest.raises(ValueError, match="even"):
        fusedloss.nt_xent_loss(x(7, 4))
    with pytest.raises(ValueError, match="even"):
        fusedloss.nt_xent_loss(x(0, 4))


@pytest.mark.parametrize("call", [
    lambda: fusedloss.info_nce_loss(x(4, 8), x(4, 6)),
    lambda: fusedloss.info_nce_loss(x(4, 8), x(4, 8), negatives=x(3, 5)),
    lambda: fusedloss.clip_loss(x(4, 8), x(4, 6), 10.0),
])
def test_mismatched_feature_dim(call):
    with pytest.raises(ValueError, match="D="):
        call()


@pytest.mark.parametrize("call", [
    lambda: fusedloss.info_nce_loss(x(4, 8), x(5, 8)),
    lambda: fusedloss.clip_loss(x(4, 8), x(3, 8), 10.0),
])
def test_batch_mismatch(call):
    with pytest.raises(ValueError, match="rows"):
        call()


@pytest.mark.parametrize("bad", [0.0, -0.1, torch.tensor(0.0), torch.tensor(-1.0, requires_grad=True)])
def test_non_positive_temperature(bad):
    with pytest.raises(ValueError, match="temperature must be positive"):
        fusedloss.info_nce_loss(x(4, 8), x(4, 8), temperature=bad)
    with pytest.raises(ValueError, match="temperature must be positive"):
        fusedloss.nt_xent_loss(x(4, 8), temperature=bad)
    with pytest.raises(ValueError, match="logit_scale must be positive"):
        fusedloss.clip_loss(x(4, 8), x(4, 8), bad)


def test_temperature_type_and_shape():
    with pytest.raises(TypeError, match="temperature"):
        fusedloss.info_nce_loss(x(4, 8), x(4, 8), temperature="0.1")
    with pytest.raises(ValueError, match="0-dim"):
        fusedloss.info_nce_loss(x(4, 8), x(4, 8), temperature=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="floating"):
        fusedloss.clip_loss(x(4, 8), x(4, 8), torch.tensor(10))


@pytest.mark.parametrize("call, match", [
    (lambda: fusedloss.info_nce_loss(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long)),
     "float32"),
    (lambda: fusedloss.info_nce_loss(x(4, 8), x(4, 8, dtype=torch.float64)), "dtype"),
    (lambda: fusedloss.info_nce_loss(x(4, 8), x(4, 8), negatives=x(3, 8, dtype=torch.bfloat16)), "dtype"),
    (lambda: fusedloss.clip_loss(x(4, 8, dtype=torch.float16), x(4, 8), 10.0), "dtype"),
])
def test_wrong_dtypes(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("other", ["meta", pytest.param("cuda", marks=CUDA)])
def test_wrong_devices(other):
    with pytest.raises(ValueError, match="is on"):
        fusedloss.info_nce_loss(x(4, 8), x(4, 8, device=other))
    with pytest.raises(ValueError, match="is on"):
        fusedloss.info_nce_loss(x(4, 8), x(4, 8), negatives=x(2, 8, device=other))
    with pytest.raises(ValueError, match="is on"):
        fusedloss.info_nce_loss(x(4, 8), x(4, 8), temperature=torch.tensor(0.1, device=other))
    with pytest.raises(ValueError, match="is on"):
        fusedloss.clip_loss(x(4, 8), x(4, 8, device=other), 10.0)


def test_shapes_and_options():
    with pytest.raises(ValueError, match="2-D"):
        fusedloss.info_nce_loss(x(8), x(8))
    with pytest.raises(ValueError, match="2-D"):
        fusedloss.nt_xent_loss(x(2, 3, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fusedloss.clip_loss([[1.0]], x(1, 1), 1.0)
    with pytest.raises(ValueError, match="reduction"):
        fusedloss.info_nce_loss(x(4, 8), x(4, 8), reduction="avg")
    with pytest.raises(ValueError, match="tile_size"):
        fusedloss.nt_xent_loss(x(4, 8), tile_size=0)


def test_op_level_validation():
    rows, cols, scale = x(3, 4), x(5, 4), torch.tensor(1.0)
    good = torch.arange(3)
    with pytest.raises(IndexError, match=r"positives\[1\]=7"):
        ops.contrastive_forward(rows, cols, torch.tensor([0, 7, 1]), scale, None, False, 0)
    with pytest.raises(ValueError, match="masked self column"):
        ops.contrastive_forward(rows, cols, good, scale, 0, False, 0)
    with pytest.raises(TypeError, match="int64"):
        ops.contrastive_forward(rows, cols, good.int(), scale, None, False, 0)
    with pytest.raises(ValueError, match=r"positives must be \[R\]"):
        ops.contrastive_forward(rows, cols, torch.arange(4), scale, None, False, 0)
    with pytest.raises(ValueError, match="0-dim"):
        ops.contrastive_forward(rows, cols, good, scale.view(1), None, False, 0)
    with pytest.raises(ValueError, match="no key columns"):
        ops.contrastive_forward(rows, cols[:0], good, scale, None, False, 0)
    with pytest.raises(ValueError, match="D=4"):
        ops.contrastive_forward(rows, x(5, 3), good, scale, None, False, 0)
    with pytest.raises(TypeError, match="dtype"):
        ops.contrastive_forward(rows, cols.double(), good, scale, None, False, 0)


@CUDA
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_invalid_positive_poisons_its_row(symmetric):
    # CUDA does not scan positives on the host (no sync); a row whose positive
    # is never seen gets NaN instead of a silently wrong loss or a stray read.
    rows, cols = x(3, 4, device="cuda"), x(5, 4, device="cuda")
    positives = torch.tensor([0, 9, 2], device="cuda")
    loss, _, _ = ops.contrastive_forward(rows, cols, positives, torch.tensor(1.0, device="cuda"), None, symmetric, 0)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
