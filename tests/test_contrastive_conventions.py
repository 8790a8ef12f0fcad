"""scale= (sentence-transformers' convention: the logits' multiplier, e.g.
20.0 with cosine similarity) as the alternative to temperature= in the
contrastive losses, against the losses written out in plain PyTorch."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_all_close, features


def mnrl(anchors, positives, negatives, scale):
    """sentence-transformers' MultipleNegativesRankingLoss forward: cos_sim * scale, CE on the diagonal."""
    candidates = torch.cat([positives, negatives])
    scores = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(len(anchors), device=anchors.device))


@pytest.mark.parametrize("tile_size", [None, 4], ids=["default", "recompute"])
@pytest.mark.parametrize("learnable", [False, True])
def test_info_nce_scale_is_mnrl(device, tile_size, learnable):
    """info_nce_loss(scale=s, normalize=True) equals MNRL(scale=s), gradients
    included (also of a learnable scale), and temperature=1/s."""
    q, k, n = (features(rows, 8, device, seed=rows) for rows in (10, 10, 3))
    scale = torch.tensor(20.0, device=device, requires_grad=True) if learnable else 20.0
    leaves = [q, k, n] + ([scale] if learnable else [])
    loss = fusedloss.info_nce_loss(q, k, negatives=n, scale=scale, normalize=True, tile_size=tile_size)
    ref = mnrl(q, k, n, scale)
    assert_all_close([loss, *torch.autograd.grad(loss, leaves)], [ref, *torch.autograd.grad(ref, leaves)],
                     rtol=1e-5, atol=1e-6)
    by_temperature = fusedloss.info_nce_loss(q, k, negatives=n, temperature=1 / 20.0, normalize=True,
                                             tile_size=tile_size)
    assert_all_close(by_temperature, ref, rtol=1e-5, atol=1e-6)


def test_nt_xent_and_modules_take_scale(device):
    h = features(12, 8, device, seed=3)
    assert_all_close(fusedloss.nt_xent_loss(h, scale=4.0), fusedloss.nt_xent_loss(h, temperature=0.25), rtol=1e-6)
    assert_all_close(fusedloss.nt_xent_loss(h), fusedloss.nt_xent_loss(h, temperature=0.5), rtol=0, atol=0)
    assert_all_close(fusedloss.NTXentLoss(scale=4.0)(h), fusedloss.nt_xent_loss(h, scale=4.0), rtol=0, atol=0)
    q, k = h[:6], h[6:]
    assert_all_close(fusedloss.InfoNCELoss(scale=20.0, normalize=True)(q, k),
                     fusedloss.info_nce_loss(q, k, scale=20.0, normalize=True), rtol=0, atol=0)
    assert_all_close(fusedloss.info_nce_loss(q, k), fusedloss.info_nce_loss(q, k, temperature=0.07), rtol=0, atol=0)
    assert "scale=20.0" in repr(fusedloss.InfoNCELoss(scale=20.0))


@pytest.mark.parametrize("call", [
    lambda h: fusedloss.info_nce_loss(h[:6], h[6:], temperature=0.05, scale=20.0),
    lambda h: fusedloss.nt_xent_loss(h, temperature=0.5, scale=2.0),
    lambda h: fusedloss.InfoNCELoss(0.1, scale=10.0)(h[:6], h[6:]),
], ids=["info_nce", "nt_xent", "module"])
def test_temperature_and_scale_exclude_each_other(call):
    with pytest.raises(ValueError, match="give temperature= or scale="):
        call(features(12, 8, "cpu"))


@pytest.mark.parametrize("scale, error", [(0.0, ValueError), (-1.0, ValueError), ("20", TypeError),
                                          (torch.ones(2), ValueError)])
def test_bad_scale_raises(scale, error):
    h = features(12, 8, "cpu")
    with pytest.raises(error, match="scale"):
        fusedloss.info_nce_loss(h[:6], h[6:], scale=scale)
