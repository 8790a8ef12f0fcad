"""InfoNCE's per-column log-q correction (key_log_q / negative_log_q, the
sampling-bias correction of in-batch negatives): values and every gradient
(temperature included) against the materialised reference, on the single
pass and on the recompute pair, symmetric, bf16, gradcheck and bad input."""
import pytest
import torch

import fusedloss
from conftest import assert_all_close, features, fp64_leaves
from fusedloss import reference

B, M, DIM = 37, 11, 8


def _problem(device, dtype=torch.float32):
    q, k, n = (features(rows, DIM, device, dtype, seed=s) for rows, s in ((B, 1), (B, 2), (M, 3)))
    g = torch.Generator().manual_seed(4)
    key_log_q = (torch.rand(B, generator=g) * -6 - 1).to(device)  # log q in [-7, -1]
    negative_log_q = (torch.rand(M, generator=g) * -6 - 1).to(device)
    temperature = torch.tensor(0.2, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                               requires_grad=True)
    return q, k, n, temperature, key_log_q, negative_log_q


def _grads(mod, q, k, n, t, **kw):
    loss = mod.info_nce_loss(q, k, negatives=n, temperature=t, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, [q, k, n, t])]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("algorithm", [{}, {"tile_size": 5}], ids=["single_pass", "recompute"])
@pytest.mark.parametrize("which", ["keys", "negatives", "both"])
def test_matches_the_reference(device, symmetric, algorithm, which):
    q, k, n, t, key_log_q, negative_log_q = _problem(device)
    kw = dict(key_log_q=key_log_q if which != "negatives" else None,
              negative_log_q=negative_log_q if which != "keys" else None, symmetric=symmetric)
    got = _grads(fusedloss, q, k, n, t, **kw, **algorithm)
    want = _grads(reference, *fp64_leaves(q, k, n, t), **kw)
    assert_all_close(got, want, rtol=3e-5, atol=3e-6)


def test_the_correction_changes_the_loss_as_tf_recommenders_does():
    """logit_ij - log q_j: a uniform log q is a constant shift (no change);
    a column's larger q lowers its logit."""
    q, k, n, t, key_log_q, _ = _problem("cpu")
    base = fusedloss.info_nce_loss(q, k, temperature=t)
    shifted = fusedloss.info_nce_loss(q, k, temperature=t, key_log_q=torch.full((B,), -3.0))
    torch.testing.assert_close(shifted, base)
    corrected = fusedloss.info_nce_loss(q, k, temperature=t, key_log_q=key_log_q)
    assert not torch.allclose(corrected, base)


def test_bf16():
    q, k, n, t, key_log_q, negative_log_q = _problem("cpu", torch.bfloat16)
    kw = dict(key_log_q=key_log_q, negative_log_q=negative_log_q)
    got = _grads(fusedloss, q, k, n, t, **kw)
    want = _grads(reference, *fp64_leaves(q, k, n, t), **kw)
    for g, w in zip(got, want):
        assert ((g.double() - w).abs().max() <= 3e-2 * w.abs().max() + 1e-3).item()


def test_gradcheck():
    q, k, n, t, key_log_q, negative_log_q = _problem("cpu", torch.float64)
    rows = 6
    fn = lambda q, k, n, t: fusedloss.info_nce_loss(q, k, negatives=n, temperature=t,
                                                    key_log_q=key_log_q[:rows].double(),
                                                    negative_log_q=negative_log_q[:rows].double())
    assert torch.autograd.gradcheck(fn, [x.detach()[:rows].requires_grad_() for x in (q, k, n)] + [t])


def test_bad_input():
    q, k, n, t, key_log_q, negative_log_q = _problem("cpu")
    with pytest.raises(ValueError, match=r"key_log_q must be \[37\]"):
        fusedloss.info_nce_loss(q, k, key_log_q=key_log_q[:5])
    with pytest.raises(TypeError, match="key_log_q must be floating"):
        fusedloss.info_nce_loss(q, k, key_log_q=torch.zeros(B, dtype=torch.long))
    with pytest.raises(TypeError, match="key_log_q must be a torch.Tensor"):
        fusedloss.info_nce_loss(q, k, key_log_q=[0.0] * B)
    with pytest.raises(ValueError, match="negative_log_q needs negatives"):
        fusedloss.info_nce_loss(q, k, negative_log_q=negative_log_q)
    with pytest.raises(ValueError, match=r"negative_log_q must be \[11\]"):
        fusedloss.info_nce_loss(q, k, negatives=n, negative_log_q=key_log_q)
