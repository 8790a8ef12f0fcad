"""False-negative masking by ids (query_ids / key_ids / negative_ids, NT-Xent's
ids, CLIP's image_ids / text_ids): values and every gradient (temperature
included) against the materialised masks of fusedloss.reference, on the single
pass (one block, several blocks) and on the recompute pair, symmetric, bf16,
fp64 gradcheck, exactly-zero gradients of masked columns, the op's id
channels directly, torch.compile and bad input."""
import pytest
import torch

import fusedloss
from conftest import assert_all_close, assert_close_to_oracle, features, fp64_leaves
from fusedloss import reference

B, M, DIM = 150, 11, 12
ops = torch.ops.fusedloss


def _ids(count, distinct, seed):
    """Ids with many repeats: about count / distinct copies of each."""
    return torch.randint(0, distinct, (count,), generator=torch.Generator().manual_seed(seed))


def _problem(device, dtype=torch.float32, batch=B):
    q, k, n = (features(rows, DIM, device, dtype, seed=s) for rows, s in ((batch, 1), (batch, 2), (M, 3)))
    temperature = torch.tensor(0.3, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                               requires_grad=True)
    ids = {"query_ids": _ids(batch, batch // 3, 4).to(device), "key_ids": _ids(batch, batch // 3, 5).to(device),
           "negative_ids": _ids(M, batch // 3, 6).to(device)}
    return q, k, n, temperature, ids


# Each loss with ids, as (function of the module, query, key, negatives, temperature, ids, **options).
def _call(mod, kind, q, k, n, t, ids, **kw):
    if kind == "key_ids":
        return mod.info_nce_loss(q, k, temperature=t, key_ids=ids["key_ids"], **kw)
    if kind == "query_and_key_ids":
        return mod.info_nce_loss(q, k, temperature=t, query_ids=ids["query_ids"], key_ids=ids["key_ids"], **kw)
    if kind == "negatives":  # key ids with extra negatives that have no ids of their own
        return mod.info_nce_loss(q, k, negatives=n, temperature=t, key_ids=ids["key_ids"], **kw)
    if kind == "negative_ids":
        return mod.info_nce_loss(q, k, negatives=n, temperature=t, **ids, **kw)
    if kind == "symmetric":
        return mod.info_nce_loss(q, k, negatives=n, temperature=t, symmetric=True, **ids, **kw)
    if kind == "nt_xent_n":  # one id per sample, shared by its two views
        return mod.nt_xent_loss(torch.cat([q, k]), temperature=t, ids=ids["key_ids"], **kw)
    if kind == "nt_xent_2n":  # one id per row
        return mod.nt_xent_loss(torch.cat([q, k]), temperature=t, ids=torch.cat([ids["key_ids"], ids["query_ids"]]),
                                **kw)
    return mod.clip_loss(q, k, 1 / t, image_ids=ids["query_ids"], text_ids=ids["key_ids"], **kw)


KINDS = ["key_ids", "query_and_key_ids", "negatives", "negative_ids", "symmetric", "nt_xent_n", "nt_xent_2n", "clip"]


def _columns(kind):
    return 2 * B if kind.startswith("nt_xent") else B + M if kind in ("negatives", "negative_ids", "symmetric") else B


# The single pass as one block and as blocks of 80 rows (the symmetric losses
# then take the recompute pair), and the recompute pair itself.
ALGORITHMS = {"one_block": lambda kind: {}, "blocks": lambda kind: {"memory_budget": 80 * 4 * _columns(kind)},
              "recompute": lambda kind: {"tile_size": 7}}


def _loss_and_grads(mod, kind, q, k, n, t, ids, **kw):
    leaves = [q, k, n, t]
    loss = _call(mod, kind, q, k, n, t, ids, **kw)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weight).sum(), leaves, allow_unused=True)
    return [loss.detach(), *(g for g in grads if g is not None)]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_materialised_mask(device, kind, algorithm):
    q, k, n, t, ids = _problem(device)
    got = _loss_and_grads(fusedloss, kind, q, k, n, t, ids, **ALGORITHMS[algorithm](kind))
    want = _loss_and_grads(reference, kind, *fp64_leaves(q, k, n, t), ids)
    assert_all_close(got, want, rtol=3e-5, atol=3e-6)


@pytest.mark.parametrize("kind", ["negative_ids", "symmetric", "nt_xent_n", "clip"])
def test_reduction_none_and_sum(device, kind):
    """Per-pair losses (upstream weights, the recompute pair) and sums."""
    q, k, n, t, ids = _problem(device, batch=37)
    ids = {name: v % 9 for name, v in ids.items()}
    for reduction in ("none", "sum"):
        got = _loss_and_grads(fusedloss, kind, q, k, n, t, ids, reduction=reduction)
        want = _loss_and_grads(reference, kind, *fp64_leaves(q, k, n, t), ids, reduction=reduction)
        assert_all_close(got, want, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("kind", ["negative_ids", "symmetric", "nt_xent_n", "clip"])
def test_bf16_close_to_the_fp64_oracle(kind, algorithm):
    q, k, n, t, ids = _problem("cpu", torch.bfloat16)
    got = _loss_and_grads(fusedloss, kind, q, k, n, t, ids, **ALGORITHMS[algorithm](kind))
    plain = _loss_and_grads(reference, kind, q, k, n, t, ids)
    oracle = _loss_and_grads(reference, kind, *fp64_leaves(q, k, n, t), ids)
    assert_close_to_oracle(got, plain, oracle, slack=2.0, atol=1e-5, rtol=1e-3, what=f"{kind} {algorithm}")


def test_gradcheck_float64():
    q, k, n, t, ids = _problem("cpu", torch.float64, batch=7)
    ids = {name: v[:5] % 3 for name, v in ids.items()}
    q, k, n = (x.detach()[:5].requires_grad_() for x in (q, k, n))
    for kind in KINDS:
        with_negatives = kind in ("negatives", "negative_ids", "symmetric")
        for kw in ({"reduction": "none", "tile_size": 3}, {}):
            def fn(q, k, n, t):
                return _call(fusedloss, kind, q, k, n if with_negatives else None, t, ids, **kw)
            assert torch.autograd.gradcheck(fn, (q, k, n, t)), (kind, kw)


@pytest.mark.parametrize("symmetric", [False, True])
def test_with_the_log_q_correction(symmetric):
    """Ids and log q together: the mask and the corrected logits are independent."""
    q, k, n, t, ids = _problem("cpu", batch=37)
    g = torch.Generator().manual_seed(7)
    log_q = {"key_log_q": torch.rand(37, generator=g) * -5, "negative_log_q": torch.rand(M, generator=g) * -5}
    ids = {name: v % 11 for name, v in ids.items()}
    for algorithm in ({}, {"tile_size": 6}):
        got = _loss_and_grads(fusedloss, "negative_ids", q, k, n, t, ids, symmetric=symmetric, **log_q, **algorithm)
        want = _loss_and_grads(reference, "negative_ids", *fp64_leaves(q, k, n, t), ids, symmetric=symmetric,
                               **log_q)
        assert_all_close(got, want, rtol=3e-5, atol=3e-6)


def test_distinct_ids_change_nothing():
    """Ids that are all different mask nothing: the loops with the id mask
    give the results of the loops without it, on every algorithm."""
    q, k, n, t, _ = _problem("cpu")
    distinct = {"query_ids": torch.arange(B), "key_ids": torch.arange(B), "negative_ids": torch.arange(B, B + M)}
    none = dict.fromkeys(distinct)
    for kind in ("negative_ids", "symmetric", "clip"):
        for algorithm in ALGORITHMS.values():
            with_ids = _loss_and_grads(fusedloss, kind, q, k, n, t, distinct, **algorithm(kind))
            without = _loss_and_grads(fusedloss, kind, q, k, n, t, none, **algorithm(kind))
            assert_all_close(with_ids, without, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_masked_columns_get_exactly_zero_gradient(dtype, algorithm):
    """Every key is the same item, and so are the first extra negatives: each
    row's softmax holds its positive and the other negatives only. The masked
    negatives get exactly zero gradient, the loss and gradients stay finite at
    a temperature that puts the logits in the thousands, and the loss equals
    InfoNCE over the positive and the unmasked negatives."""
    batch, masked = 40, 4
    q, k, n = (features(rows, DIM, "cpu", dtype, seed=s) for rows, s in ((batch, 7), (batch, 8), (M, 9)))
    key_ids = torch.full((batch,), 5)
    negative_ids = torch.tensor([5] * masked + list(range(100, 100 + M - masked)))
    for symmetric in (False, True):
        kw = ALGORITHMS[algorithm]("negative_ids")
        loss = fusedloss.info_nce_loss(q, k, negatives=n, temperature=0.01, key_ids=key_ids,
                                       negative_ids=negative_ids, symmetric=symmetric, **kw)
        grads = torch.autograd.grad(loss, [q, k, n])
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(grads[2][:masked], torch.zeros_like(grads[2][:masked]))
        assert grads[2][masked:].abs().sum() > 0
        # One row at a time: its positive against the unmasked negatives.
        per_row = torch.stack([fusedloss.info_nce_loss(q[i:i + 1].float(), k[i:i + 1].float(),
                                                       negatives=n[masked:].float(), temperature=0.01,
                                                       reduction="sum") for i in range(batch)])
        # The key -> query term of a column masked for every other row is 0.
        expected = per_row.mean() / (2 if symmetric else 1)
        torch.testing.assert_close(loss, expected, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)


def test_op_channels_and_id_columns():
    """The op directly: two channels, the second giving ids to its first
    columns only, rows a slice of the columns (the distributed layout)."""
    C, R, off = 30, 9, 12
    keys = features(C, DIM, "cpu", torch.float64, seed=20)
    rows = keys.detach()[off:off + R].clone().requires_grad_()
    positives = torch.arange(R) + off
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    row_ids = torch.stack([_ids(R, 4, 21), _ids(R, 4, 22)])
    col_ids = torch.stack([_ids(C, 4, 23), _ids(C, 4, 24)])
    id_columns = [C, 17]
    mask = torch.zeros(R, C, dtype=torch.bool)
    mask |= row_ids[0][:, None] == col_ids[0][None, :]
    mask[:, :17] |= row_ids[1][:, None] == col_ids[1][None, :17]
    mask[torch.arange(R), positives] = False
    for symmetric in (False, True):
        logits = (scale * rows @ keys.T).masked_fill(mask, float("-inf"))
        loss, _, _ = ops.contrastive_forward(rows, keys, positives, scale, row_ids, col_ids, None, id_columns, [],
                                             symmetric, 4)
        expected = torch.nn.functional.cross_entropy(logits, positives, reduction="none")
        if symmetric:
            column = torch.logsumexp(logits, 0)[positives] - logits[torch.arange(R), positives]
            expected = 0.5 * (expected + column)
        torch.testing.assert_close(loss, expected)
        weight = torch.rand(R, dtype=torch.float64)
        got = torch.autograd.grad(loss, [rows, keys, scale], weight)
        want = torch.autograd.grad(expected, [rows, keys, scale], weight)
        assert_all_close(got, want, rtol=1e-7, atol=1e-10)


def test_modules_pass_the_ids():
    q, k, n, t, ids = _problem("cpu", batch=20)
    ids = {name: v % 6 for name, v in ids.items()}
    torch.testing.assert_close(fusedloss.InfoNCELoss(0.3, symmetric=True)(q, k, n, **ids),
                               fusedloss.info_nce_loss(q, k, negatives=n, temperature=0.3, symmetric=True, **ids))
    hidden = torch.cat([q, k])
    torch.testing.assert_close(fusedloss.NTXentLoss(0.3)(hidden, ids=ids["key_ids"]),
                               reference.nt_xent_loss(hidden, temperature=0.3, ids=ids["key_ids"]))
    torch.testing.assert_close(fusedloss.ClipLoss()(q, k, 3.0, image_ids=ids["query_ids"], text_ids=ids["key_ids"]),
                               reference.clip_loss(q, k, 3.0, image_ids=ids["query_ids"], text_ids=ids["key_ids"]))


@pytest.mark.parametrize("backend, options", [("aot_eager", {}), ("aot_eager", {"tile_size": 5}),
                                              ("inductor", {})])
def test_compile(backend, options):
    """info_nce_loss and nt_xent_loss with ids compile without graph breaks and match eager."""
    torch._dynamo.reset()
    q, k, n, t, ids = _problem("cpu", batch=20)
    ids = {name: v % 6 for name, v in ids.items()}

    def fn(q, k, n, t):
        return (fusedloss.info_nce_loss(q, k, negatives=n, temperature=t, symmetric=True, **ids, **options)
                + fusedloss.nt_xent_loss(torch.cat([q, k]), temperature=t, ids=ids["key_ids"], **options))

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    leaves = [q, k, n, t]
    got = compiled(*leaves)
    want = fn(*leaves)
    assert_all_close([got, *torch.autograd.grad(got, leaves)], [want, *torch.autograd.grad(want, leaves)],
                     rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def _rand(*shape, **kw):
    return torch.randn(*shape, **kw)


BAD = [
    ("key_ids shape", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3), key_ids=torch.arange(5)),
     ValueError, r"key_ids must be \[4\]"),
    ("query_ids float", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3), query_ids=torch.zeros(4)),
     TypeError, "query_ids must be an integer tensor"),
    ("key_ids bool", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3), key_ids=torch.zeros(4, dtype=bool)),
     TypeError, "key_ids must be an integer tensor"),
    ("key_ids list", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3), key_ids=[0, 1, 2, 3]),
     TypeError, "key_ids must be a torch.Tensor"),
    ("key_ids device", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3),
                                                       key_ids=torch.arange(4, device="meta")),
     ValueError, "key_ids is on meta"),
    ("negative_ids without negatives", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3),
                                                                       key_ids=torch.arange(4),
                                                                       negative_ids=torch.arange(2)),
     ValueError, "negative_ids needs negatives"),
    ("negative_ids without key_ids", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3), negatives=_rand(2, 3),
                                                                     negative_ids=torch.arange(2)),
     ValueError, "negative_ids needs key_ids"),
    ("negative_ids shape", lambda: fusedloss.info_nce_loss(_rand(4, 3), _rand(4, 3), negatives=_rand(2, 3),
                                                           key_ids=torch.arange(4), negative_ids=torch.arange(3)),
     ValueError, r"negative_ids must be \[2\]"),
    ("nt_xent ids shape", lambda: fusedloss.nt_xent_loss(_rand(8, 3), ids=torch.arange(5)), ValueError,
     r"ids must be \[N\]=\[4\] \(one per sample\) or \[2N\]=\[8\]"),
    ("nt_xent ids dtype", lambda: fusedloss.nt_xent_loss(_rand(8, 3), ids=torch.zeros(4)), TypeError,
     "ids must be an integer tensor"),
    ("clip text_ids shape", lambda: fusedloss.clip_loss(_rand(4, 3), _rand(4, 3), 1.0, text_ids=torch.arange(3)),
     ValueError, r"text_ids must be \[4\]"),
    ("clip image_ids device", lambda: fusedloss.clip_loss(_rand(4, 3), _rand(4, 3), 1.0,
                                                          image_ids=torch.arange(4, device="meta")),
     ValueError, "image_ids is on meta"),
]


def _op(**overrides):
    kw = dict(rows=_rand(3, 4), cols=_rand(5, 4), positives=torch.arange(3), scale=torch.tensor(1.0),
              row_ids=torch.zeros(1, 3, dtype=torch.long), col_ids=torch.zeros(1, 5, dtype=torch.long),
              self_offset=None, id_columns=[5], id_penalty=[], symmetric=False, tile_size=0)
    return ops.contrastive_forward(**{**kw, **overrides})


BAD_OP = [
    ("row_ids alone", lambda: _op(col_ids=None), ValueError, "row_ids and col_ids are given together"),
    ("id_columns alone", lambda: _op(row_ids=None, col_ids=None), ValueError, "id_columns and id_penalty need"),
    ("id_penalty length", lambda: _op(id_penalty=[1.0]), ValueError, "id_penalty must be empty"),
    ("id_penalty finite", lambda: _op(id_penalty=[1.0, float("nan")]), ValueError, "id_penalty values must be finite"),
    ("three channels", lambda: _op(row_ids=torch.zeros(3, 3, dtype=torch.long)), ValueError,
     r"row_ids must be \[K, R\]"),
    ("row_ids R", lambda: _op(row_ids=torch.zeros(1, 4, dtype=torch.long)), ValueError, r"row_ids must be \[K, R\]"),
    ("col_ids C", lambda: _op(col_ids=torch.zeros(1, 4, dtype=torch.long)), ValueError, r"col_ids must be \[K, C\]"),
    ("int32 ids", lambda: _op(row_ids=torch.zeros(1, 3, dtype=torch.int32)), TypeError, "row_ids must be int64"),
    ("id_columns length", lambda: _op(id_columns=[5, 5]), ValueError, "id_columns must have K=1"),
    ("id_columns range", lambda: _op(id_columns=[6]), ValueError, r"id_columns entries must be in \[0, C=5\]"),
]


@pytest.mark.parametrize("what, call, exc, match", BAD + BAD_OP, ids=[c[0] for c in BAD + BAD_OP])
def test_bad_input(what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()
