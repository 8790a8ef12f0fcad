"""fusedloss.compat.tf against TensorFlow 2.21: the cases of
shared/reference/sampled_reference_cases.json (losses and all gradients), TF's
quirks, and the TF-signature samplers."""
import json
import os

import pytest
import torch

import fusedloss
from fusedloss import reference
from fusedloss.compat import tf

# Generated with TensorFlow 2.21 on CPU (inputs, per-example losses, dense gradients).
CASES_PATH = os.path.join(os.path.dirname(__file__), "data", "sampled_reference_cases.json")
with open(CASES_PATH) as f:
    DATA = json.load(f)
CASES = {c["name"]: c for c in DATA["cases"]}
FLT_MAX = torch.finfo(torch.float32).max


def inputs(device="cpu", dtype=torch.float32):
    w = torch.tensor(DATA["weights"], device=device, dtype=dtype)
    b = torch.tensor(DATA["biases"], device=device, dtype=dtype)
    x = torch.tensor(DATA["inputs"], device=device, dtype=dtype)
    return w, b, x


def sampled_values(case, device="cpu"):
    return (torch.tensor(case["sampled_candidates"], device=device),
            torch.tensor(case["true_expected_count"], device=device),
            torch.tensor(case["sampled_expected_count"], device=device))


def run_case(case, device="cpu", dtype=torch.float32):
    w, b, x = (t.requires_grad_() for t in inputs(device, dtype))
    fn = tf.sampled_softmax_loss if "softmax" in case["fn"] else tf.nce_loss
    loss = fn(w, b, torch.tensor(case["labels"], device=device), x, case["num_sampled"], 6,
              num_true=case["num_true"], sampled_values=sampled_values(case, device),
              remove_accidental_hits=case["remove_accidental_hits"])
    loss.sum().backward()
    return loss, w.grad, b.grad, x.grad


@pytest.mark.parametrize("name", list(CASES))
def test_tf_case(device, name):
    """Each recorded TensorFlow case: losses and all gradients match."""
    case = CASES[name]
    loss, gw, gb, gx = run_case(case, device)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    tol = dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(loss.cpu(), torch.tensor(case["loss"]), **tol)
    torch.testing.assert_close(gw.cpu(), torch.tensor(case["grad_weights_dense"]), **tol)
    torch.testing.assert_close(gb.cpu(), torch.tensor(case["grad_biases_dense"]), **tol)
    torch.testing.assert_close(gx.cpu(), torch.tensor(case["grad_inputs"]), **tol)


def test_case_j_compute_sampled_logits():
    """The sampled logits and hit mask equal TensorFlow's _compute_sampled_logits."""
    case, j = CASES["A_ssm_rah_true"], DATA["compute_sampled_logits_J"]
    w, b, x = inputs()
    logits, mask, _ = reference.sampled_logits(x, w, torch.tensor(case["labels"]), sampled_values(case), b,
                                               remove_accidental_hits=True, subtract_log_q=False,
                                               tf_hit_masking=True)
    want = torch.tensor(j["logits"])
    tf_mask = want == -FLT_MAX
    assert torch.equal(mask, tf_mask)
    torch.testing.assert_close(logits[~mask], want[~tf_mask])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_case_k_low_precision_is_finite(device, dtype):
    """Where TensorFlow gives NaN in half precision, the result is finite and close."""
    # TensorFlow returns NaN for rows 0 and 2 here (-FLT_MAX becomes -inf, then 0 * inf).
    case = CASES["A_ssm_rah_true"]
    loss, gw, gb, gx = run_case(case, device, dtype)
    assert loss.dtype == dtype
    assert all(torch.isfinite(t).all() for t in (loss, gw, gb, gx))
    torch.testing.assert_close(loss.float().cpu(), torch.tensor(case["loss"]), rtol=3e-2, atol=3e-2)


def test_native_differs_only_where_documented():
    """The native API differs from TensorFlow only in its documented choices."""
    # Case F: TF masks only the last copy of duplicated id 2; the native API masks both.
    case = CASES["F_ssm_dup_sampled"]
    w, b, x = inputs()
    labels, sv = torch.tensor(case["labels"]), sampled_values(case)
    native = fusedloss.sampled_softmax_loss(x, w, labels, None, b, sampled_values=sv, reduction="none")
    want = reference.sampled_softmax_loss(x, w, labels, sv, b, reduction="none")
    torch.testing.assert_close(native, want)
    assert not torch.allclose(native[0], torch.tensor(case["loss"][0]))
    torch.testing.assert_close(native[1:], torch.tensor(case["loss"][1:]))
    # NCE with num_true=2: TF labels each true column 1/2, the native API 1.
    case = CASES["E_nce_rah_true_numtrue2"]
    labels, sv = torch.tensor(case["labels"]), sampled_values(case)
    native = fusedloss.nce_loss(x, w, labels, None, b, sampled_values=sv, remove_accidental_hits=True,
                                reduction="none")
    torch.testing.assert_close(native, reference.nce_loss(x, w, labels, sv, b, remove_accidental_hits=True,
                                                          reduction="none"))
    tf_like = reference.nce_loss(x, w, labels, sv, b, remove_accidental_hits=True, reduction="none",
                                 true_label=0.5, tf_hit_masking=True)
    torch.testing.assert_close(tf_like, torch.tensor(case["loss"]), rtol=2e-6, atol=2e-6)
    assert not torch.allclose(native, tf_like)


def test_weight_shards_and_labels_reshape():
    """A list of weight shards and flat labels are accepted like TensorFlow."""
    case = CASES["A_ssm_rah_true"]
    w, b, x = inputs()
    loss = tf.sampled_softmax_loss([w[:4], w[4:]], b, torch.tensor(case["labels"]).view(-1), x, 3, 6,
                                   sampled_values=sampled_values(case))
    torch.testing.assert_close(loss, torch.tensor(case["loss"]), rtol=2e-6, atol=2e-6)


def test_default_sampler_and_seed():
    """The default sampler is reproducible with a seed."""
    w, b, x = inputs()
    labels = torch.tensor([[1], [2], [4]])
    first = tf.sampled_softmax_loss(w, b, labels, x, 4, 6, seed=7)
    second = tf.sampled_softmax_loss(w, b, labels, x, 4, 6, seed=7)
    assert first.shape == (3,) and torch.isfinite(first).all()
    torch.testing.assert_close(first, second)
    assert torch.isfinite(tf.nce_loss(w, b, labels, x, 4, 6, seed=1)).all()


def test_compute_accidental_hits():
    """compute_accidental_hits returns TensorFlow's indices, ids and weights."""
    indices, ids, weights = tf.compute_accidental_hits(torch.tensor([[2], [0], [3]]), torch.tensor([2, 0, 2]), 1)
    assert indices.dtype == torch.int32 and ids.dtype == torch.int64
    assert indices.tolist() == [0, 1] and ids.tolist() == [2, 1]
    assert (weights == -FLT_MAX).all()
    # A duplicated label in a row is reported twice (TF), at the same position.
    indices, ids, _ = tf.compute_accidental_hits(torch.tensor([[2, 2], [3, 1], [0, 4]]), torch.tensor([2, 4, 1]), 2)
    assert indices.tolist() == [0, 0, 1, 2] and ids.tolist() == [0, 0, 2, 1]


def test_candidate_samplers():
    """The TF-signature samplers give TensorFlow's counts and errors."""
    true_classes = torch.tensor([[0, 1, 2, 3, 4]])
    sampled, true_count, sampled_count = tf.fixed_unigram_candidate_sampler(
        true_classes, 5, 4, False, 5, distortion=0.5, num_reserved_ids=2, unigrams=[1, 4, 9], seed=3)
    torch.testing.assert_close(true_count, torch.tensor([[0.0, 0.0, 2 / 3, 4 / 3, 2.0]]))
    assert ((sampled >= 2) & (sampled < 5)).all() and sampled_count.shape == (4,)
    a = tf.log_uniform_candidate_sampler(true_classes, 5, 3, True, 100, seed=1)
    b = tf.log_uniform_candidate_sampler(true_classes, 5, 3, True, 100, seed=1)
    assert torch.equal(a[0], b[0]) and a[1].shape == (1, 5)
    u = tf.uniform_candidate_sampler(true_classes, 5, 3, True, 10, seed=1)
    torch.testing.assert_close(u[2], torch.full((3,), 0.3))
    with pytest.raises(ValueError, match="range_max"):
        tf.fixed_unigram_candidate_sampler(true_classes, 5, 4, False, 4, unigrams=[1, 4, 9], num_reserved_ids=2)
    with pytest.raises(ValueError, match="num_true"):
        tf.uniform_candidate_sampler(true_classes, 2, 3, True, 10)
    with pytest.raises(ValueError, match="range is too small"):
        tf.uniform_candidate_sampler(true_classes, 5, 11, True, 10)
