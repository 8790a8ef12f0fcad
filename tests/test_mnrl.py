"""fusedloss.mnrl_loss / MultipleNegativesRankingLoss against sentence-transformers'
own MultipleNegativesRankingLoss (v6.2.0, compute_loss_from_embeddings) on the
same embeddings — and against fusedloss.reference.mnrl_loss, the materialised
twin, which runs where sentence-transformers is not installed: every direction
/ partition / hardness combination, with and without hard-negative blocks,
cosine and dot similarity, values and gradients in fp64 (<= 1e-10), fp32 and
bf16; the op's id penalty it is built on against the materialised logits;
gradcheck, compile and bad input."""
import pytest
import torch

import fusedloss
from conftest import assert_all_close, assert_close_to_oracle, features, fp64_leaves
from fusedloss import reference

B, DIM, NEGATIVES = 13, 8, 2
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SETUPS = [(("query_to_doc",), "joint"), (("query_to_doc", "doc_to_query"), "per_direction"),
          (("query_to_doc", "doc_to_query"), "joint"), (("query_to_doc", "query_to_query"), "joint"),
          (("query_to_doc", "doc_to_doc"), "joint"), (ALL, "joint")]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]


def _embeddings(dtype=torch.float64, batch=B, negatives=NEGATIVES, seed=0):
    return [features(batch, DIM, "cpu", dtype, seed=seed + i) for i in range(2 + negatives)]


ORACLES = ["sentence_transformers", "reference"]


def _st(embeddings, directions, partition_mode, hardness_mode, *, scale=20.0, normalize=True, strength=3.0,
        oracle="sentence_transformers"):
    """The loss by sentence-transformers itself (skipped when it is not
    installed) or by fusedloss.reference."""
    if oracle == "reference":
        return reference.mnrl_loss(embeddings[0], embeddings[1], embeddings[2:], scale=scale, directions=directions,
                                   partition_mode=partition_mode, hardness_mode=hardness_mode,
                                   hardness_strength=strength if hardness_mode else 0.0, normalize=normalize)
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    st_util = pytest.importorskip("sentence_transformers.util")
    loss = st_losses.MultipleNegativesRankingLoss(
        None, scale=scale, similarity_fct=st_util.cos_sim if normalize else st_util.dot_score,
        directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
        hardness_strength=strength if hardness_mode else 0.0)
    return loss.compute_loss_from_embeddings(embeddings, None)


def _ours(embeddings, directions, partition_mode, hardness_mode, *, scale=20.0, normalize=True, strength=3.0, **kw):
    return fusedloss.mnrl_loss(embeddings[0], embeddings[1], embeddings[2:], scale=scale, directions=directions,
                               partition_mode=partition_mode, hardness_mode=hardness_mode,
                               hardness_strength=strength if hardness_mode else 0.0, normalize=normalize, **kw)


def _loss_and_grads(loss, leaves):
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("negatives", [0, NEGATIVES], ids=["pairs", "hard_negatives"])
@pytest.mark.parametrize("hardness_mode", HARDNESS)
@pytest.mark.parametrize("directions, partition_mode", SETUPS, ids=["+".join(d) + "-" + m for d, m in SETUPS])
def test_equals_sentence_transformers_fp64(directions, partition_mode, hardness_mode, negatives, normalize, oracle):
    embeddings = _embeddings(negatives=negatives)
    scale = 20.0 if normalize else 0.5  # dot products of unnormalised features are O(DIM)
    want = _loss_and_grads(_st(embeddings, directions, partition_mode, hardness_mode, scale=scale,
                               normalize=normalize, oracle=oracle), embeddings)
    for algorithm in ({}, {"tile_size": 4}):
        got = _loss_and_grads(_ours(embeddings, directions, partition_mode, hardness_mode, scale=scale,
                                    normalize=normalize, **algorithm), embeddings)
        assert_all_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("oracle", ORACLES)
@pytest.mark.parametrize("hardness_mode", HARDNESS)
@pytest.mark.parametrize("directions, partition_mode", SETUPS, ids=["+".join(d) + "-" + m for d, m in SETUPS])
def test_fp32_close_to_sentence_transformers(directions, partition_mode, hardness_mode, oracle):
    """fp32 against ST in fp64 (the oracle), within twice ST's own fp32 error."""
    embeddings = _embeddings(torch.float32, batch=37)
    oracle_in = fp64_leaves(*embeddings)
    want = _loss_and_grads(_st(oracle_in, directions, partition_mode, hardness_mode, oracle=oracle), oracle_in)
    plain = _loss_and_grads(_st(embeddings, directions, partition_mode, hardness_mode, oracle=oracle), embeddings)
    for algorithm in ({}, {"tile_size": 5}):
        got = _loss_and_grads(_ours(embeddings, directions, partition_mode, hardness_mode, **algorithm), embeddings)
        assert_close_to_oracle(got, plain, want, slack=2.0, atol=2e-6, rtol=2e-5, what=str(algorithm))


@pytest.mark.parametrize("directions, partition_mode", [SETUPS[0], SETUPS[1], SETUPS[-1]])
def test_bf16_close_to_the_fp64_oracle(directions, partition_mode):
    """bf16 embeddings (ST itself computes in fp32 from them): within bf16's
    rounding of the normalised features of the fp64 oracle."""
    embeddings = _embeddings(torch.bfloat16, batch=40)
    oracle_in = fp64_leaves(*embeddings)
    oracle = _loss_and_grads(_st(oracle_in, directions, partition_mode, "all_negatives"), oracle_in)
    for algorithm in ({}, {"tile_size": 8}):
        got = _loss_and_grads(_ours(embeddings, directions, partition_mode, "all_negatives", **algorithm), embeddings)
        assert all(torch.isfinite(g).all() for g in got)
        assert_close_to_oracle(got, None, oracle, atol=1e-3, rtol=2e-2, what=str(algorithm))


def test_learnable_scale_and_reductions():
    """A 0-dim tensor scale gets ST's gradient (without masked blocks: ST's
    scale gradient is NaN with them, -inf * scale; see test_gradcheck); "sum"
    and "none" agree with "mean"."""
    embeddings = _embeddings()
    scale = torch.tensor(15.0, dtype=torch.float64, requires_grad=True)
    ours = _ours(embeddings, SETUPS[2][0], "joint", "in_batch_negatives", scale=scale)
    want = _st(embeddings, SETUPS[2][0], "joint", "in_batch_negatives", scale=scale)
    assert_all_close(_loss_and_grads(ours, [*embeddings, scale]), _loss_and_grads(want, [*embeddings, scale]),
                     rtol=0, atol=1e-10)
    for directions, mode in (SETUPS[0], SETUPS[-1]):
        mean = _ours(embeddings, directions, mode, None)
        rows = _ours(embeddings, directions, mode, None, reduction="none")
        assert rows.shape == (B,)
        torch.testing.assert_close(rows.mean(), mean)
        torch.testing.assert_close(_ours(embeddings, directions, mode, None, reduction="sum"), B * mean)


def test_query_to_doc_alone_is_info_nce():
    """The default configuration is the contrastive op itself: InfoNCE over
    the positives and hard negatives, bit for bit (the single pass)."""
    embeddings = _embeddings(torch.float32)
    ours = _ours(embeddings, ("query_to_doc",), "joint", None)
    info_nce = fusedloss.info_nce_loss(embeddings[0], embeddings[1], negatives=torch.cat(embeddings[2:]), scale=20.0,
                                       normalize=True)
    assert torch.equal(ours, info_nce)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(ours, embeddings),
                                                 torch.autograd.grad(info_nce, embeddings)))


@pytest.mark.parametrize("directions, partition_mode", [SETUPS[1], SETUPS[-1]])
def test_a_single_query(directions, partition_mode):
    """B = 1: the same-type blocks are empty (ST's are all -inf)."""
    embeddings = _embeddings(batch=1)
    assert_all_close(_loss_and_grads(_ours(embeddings, directions, partition_mode, "all_negatives"), embeddings),
                     _loss_and_grads(_st(embeddings, directions, partition_mode, "all_negatives"), embeddings),
                     rtol=0, atol=1e-10)


def test_gradcheck():
    """Without the hardness penalty (a stop-gradient term: its values are not
    its gradient's integral), the scale included."""
    embeddings = _embeddings(batch=5, negatives=1)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    for directions, mode in (SETUPS[1], SETUPS[-1]):
        for reduction in ("none", "mean"):
            fn = lambda s, *e: _ours(list(e), directions, mode, None, scale=s, reduction=reduction)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (scale, *embeddings)), (directions, reduction)


def test_module_matches_function():
    embeddings = _embeddings()
    module = fusedloss.MultipleNegativesRankingLoss(20.0, directions=ALL, hardness_mode="hard_negatives",
                                                    hardness_strength=5.0)
    torch.testing.assert_close(module(*embeddings), _ours(embeddings, ALL, "joint", "hard_negatives", strength=5.0))
    assert "hardness_mode='hard_negatives'" in repr(module)


@pytest.mark.parametrize("directions", [("query_to_doc",), ALL])
def test_compile(directions):
    torch._dynamo.reset()
    embeddings = _embeddings(torch.float32)

    def fn(*e):
        return _ours(list(e), directions, "joint", "all_negatives")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_all_close(_loss_and_grads(compiled(*embeddings), embeddings),
                     _loss_and_grads(fn(*embeddings), embeddings), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ----------------------------------------------------- the op's id penalty


@pytest.mark.parametrize("symmetric", [False, True])
def test_op_id_penalty_matches_the_materialised_logits(symmetric):
    """logit_ij = scale * dot_ij + penalty_ij * stop_grad(dot_ij), penalty_ij
    = match / differ by whether the ids agree, 0 at the positive; nothing
    masked. Both algorithms, rows a slice of the columns."""
    C, R, off = 24, 9, 6
    cols = features(C, DIM, "cpu", torch.float64, seed=40)
    rows = features(R, DIM, "cpu", torch.float64, seed=41)
    positives = torch.arange(R) + off
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    row_ids = (torch.arange(R) % 4)[None]
    col_ids = (torch.arange(C) % 4)[None]
    match, differ = 1.5, 0.25
    dots = rows @ cols.T
    same = row_ids[0][:, None] == col_ids[0][None, :]
    penalty = torch.where(same, match, differ).to(torch.float64)
    penalty[torch.arange(R), positives] = 0
    logits = scale * dots + penalty * dots.detach()
    expected = torch.nn.functional.cross_entropy(logits, positives, reduction="none")
    if symmetric:
        column = torch.logsumexp(logits, 0)[positives] - logits[torch.arange(R), positives]
        expected = 0.5 * (expected + column)
    ops = torch.ops.fusedloss
    loss, _, _ = ops.contrastive_forward(rows, cols, positives, scale, row_ids, col_ids, None, [C], [match, differ],
                                         symmetric, 5)
    torch.testing.assert_close(loss, expected)
    weight = torch.rand(R, dtype=torch.float64)
    assert_all_close(torch.autograd.grad(loss, [rows, cols, scale], weight),
                     torch.autograd.grad(expected, [rows, cols, scale], weight, retain_graph=True), rtol=1e-7,
                     atol=1e-10)
    total, *grads = ops.contrastive_sum_and_grad(rows.detach(), cols.detach(), positives, scale.detach(), None,
                                                 row_ids, col_ids, None, [C], [match, differ], symmetric, 0, 0,
                                                 [True, True, True])
    torch.testing.assert_close(total, expected.sum())
    assert_all_close(grads, torch.autograd.grad(expected.sum(), [rows, cols, scale]), rtol=1e-7, atol=1e-10)


# -------------------------------------------------------------- bad input


def _e(*shape):
    return torch.randn(*shape)


BAD = [
    ("no directions", dict(directions=()), ValueError, "at least one direction"),
    ("unknown direction", dict(directions=("query_to_doc", "doc_to_image")), ValueError, "unknown"),
    ("without query_to_doc", dict(directions=("doc_to_query",)), ValueError, "must include 'query_to_doc'"),
    ("a string", dict(directions="query_to_doc"), TypeError, "tuple of direction names"),
    ("partition mode", dict(partition_mode="both"), ValueError, "partition_mode must be"),
    ("per_direction with same-type", dict(directions=ALL, partition_mode="per_direction"), ValueError,
     "per_direction"),
    ("hardness mode", dict(hardness_mode="hard"), ValueError, "hardness_mode must be None or one of"),
    ("negative strength", dict(hardness_mode="all_negatives", hardness_strength=-1.0), ValueError, "non-negative"),
    ("strength type", dict(hardness_strength="5"), TypeError, "hardness_strength must be a float"),
    ("scale", dict(scale=0.0), ValueError, "scale"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
]


@pytest.mark.parametrize("what, options, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_options(what, options, exc, match):
    with pytest.raises(exc, match=match):
        fusedloss.mnrl_loss(_e(4, 3), _e(4, 3), **options)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fusedloss.mnrl_loss(_e(4, 3), _e(5, 3)), ValueError, "row i of each must be a positive pair"),
    (lambda: fusedloss.mnrl_loss(_e(4, 3), _e(4, 3), _e(5, 3)), ValueError, r"negatives\[0\] has 5 rows"),
    (lambda: fusedloss.mnrl_loss(_e(4, 3), _e(4, 3), [_e(4, 3), _e(4, 2)]), ValueError, r"negatives\[1\] has D=2"),
    (lambda: fusedloss.mnrl_loss(_e(4, 3), _e(4, 3).double()), TypeError, "dtype"),
    (lambda: fusedloss.mnrl_loss(_e(4, 3), _e(4, 3), _e(4, 3).to("meta")), ValueError, "is on meta"),
    (lambda: fusedloss.MultipleNegativesRankingLoss(directions=("doc_to_query",)), ValueError, "query_to_doc"),
], ids=["positive rows", "negative rows", "negative D", "dtype", "device", "module"])
def test_bad_tensors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
