"""GradCache (fusedloss.gradcache.cached_loss): the same parameter gradients as
backpropagating the whole batch in one go, with dropout in the encoders, for
InfoNCE / CLIP / SigLIP, one or two encoders; bad arguments raise."""
import pytest
import torch

import fusedloss
from fusedloss import gradcache
from conftest import assert_all_close, requires_cuda

DIM_IN, DIM_OUT = 6, 8


def encoder(seed, dropout=0.3, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, 16), torch.nn.Dropout(dropout), torch.nn.Tanh(),
                               torch.nn.Linear(16, DIM_OUT)).to(dtype)


def batches(rows, count, dtype=torch.float64):
    g = torch.Generator().manual_seed(100)
    return [torch.randn(rows, DIM_IN, generator=g, dtype=dtype) for _ in range(count)]


def whole_batch_grads(loss_fn, towers, mini_batch_size, extra):
    """The plain way: every mini-batch embedded with autograd, the whole
    batch's graph kept, one backward. Returns (loss, grads of every parameter
    and of ``extra``), and the random state afterwards."""
    outs = [torch.cat([enc(x[i:i + mini_batch_size]) for i in range(0, x.shape[0], mini_batch_size)])
            for enc, x in towers]
    loss = loss_fn(*outs)
    loss.backward()
    return loss.detach(), collect(towers, extra), torch.get_rng_state()


def collect(towers, extra):
    modules = list({id(enc): enc for enc, _ in towers}.values())
    out = [p.grad.clone() for m in modules for p in m.parameters()] + [t.grad.clone() for t in extra]
    for m in modules:
        m.zero_grad(set_to_none=True)
    for t in extra:
        t.grad = None
    return out


def cached_grads(loss_fn, towers, mini_batch_size, extra):
    loss = gradcache.cached_loss(loss_fn, towers, mini_batch_size=mini_batch_size)
    loss.backward()
    return loss.detach(), collect(towers, extra), torch.get_rng_state()


def make_case(name):
    """(loss_fn, towers, learnable loss tensors): InfoNCE with one encoder
    shared by queries and docs, CLIP and SigLIP with an image and a text encoder."""
    queries, docs = batches(23, 2)
    if name == "info_nce":
        shared = encoder(0)
        temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        return (lambda q, d: fusedloss.info_nce_loss(q, d, temperature=temperature, normalize=True, symmetric=True),
                [(shared, queries), (shared, docs)], [temperature])
    towers = [(encoder(1), queries), (encoder(2), docs)]
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    if name == "clip":
        return lambda i, t: fusedloss.clip_loss(i, t, scale), towers, [scale]
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    return lambda i, t: fusedloss.siglip_loss(i, t, scale, bias), towers, [scale, bias]


@pytest.mark.parametrize("name", ["info_nce", "clip", "siglip"])
@pytest.mark.parametrize("mini_batch_size", [1, 5, 100])
def test_same_gradients_as_the_whole_batch(name, mini_batch_size):
    """Parameter (and loss-parameter) gradients equal the whole batch's, with
    dropout active; the random state afterwards is the one a plain step leaves."""
    loss_fn, towers, extra = make_case(name)
    torch.manual_seed(7)
    expected_loss, expected, expected_rng = whole_batch_grads(loss_fn, towers, mini_batch_size, extra)
    torch.manual_seed(7)
    loss, got, rng = cached_grads(loss_fn, towers, mini_batch_size, extra)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-14, atol=1e-14)
    assert_all_close(got, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(rng, expected_rng)


@requires_cuda
def test_cuda_dropout_is_replayed():
    """Encoders on CUDA: the CUDA generator's state is recorded and restored too."""
    loss_fn, towers, extra = make_case("siglip")
    towers = [(enc.cuda(), x.cuda()) for enc, x in towers]
    extra = [t.detach().cuda().requires_grad_() for t in extra]
    loss_fn = lambda i, t: fusedloss.siglip_loss(i, t, *extra)  # noqa: E731
    torch.manual_seed(7)
    _, expected, _ = whole_batch_grads(loss_fn, towers, 5, extra)
    expected_rng = torch.cuda.get_rng_state()
    torch.manual_seed(7)
    _, got, _ = cached_grads(loss_fn, towers, 5, extra)
    assert_all_close(got, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.cuda.get_rng_state(), expected_rng)


def test_replay_without_the_recorded_random_state_would_differ(monkeypatch):
    """The random state restore is what makes dropout match (the test above is not vacuous)."""
    loss_fn, towers, extra = make_case("clip")
    torch.manual_seed(7)
    _, expected, _ = whole_batch_grads(loss_fn, towers, 5, extra)
    monkeypatch.setattr(gradcache._RandomState, "restore", lambda self: None)
    torch.manual_seed(7)
    _, got, _ = cached_grads(loss_fn, towers, 5, extra)
    assert not torch.allclose(got[0], expected[0])


def test_equals_one_full_batch_call_without_dropout():
    """Without dropout, the gradients of encoding the whole batch in one call."""
    image_encoder, text_encoder = encoder(3, dropout=0.0), encoder(4, dropout=0.0)
    images, texts = batches(30, 2)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    loss_fn = lambda i, t: fusedloss.siglip_loss(i, t, scale, -1.0)  # noqa: E731
    towers = [(image_encoder, images), (text_encoder, texts)]
    loss_fn(image_encoder(images), text_encoder(texts)).backward()
    expected = collect(towers, [scale])
    _, got, _ = cached_grads(loss_fn, towers, 7, [scale])
    assert_all_close(got, expected, rtol=1e-12, atol=1e-14)


def test_encoder_sees_only_mini_batches_with_autograd():
    """No encoder call with autograd ever holds more than mini_batch_size rows
    (so activation memory is one mini-batch's)."""
    sizes = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = encoder(5)

        def forward(self, x):
            sizes.append((torch.is_grad_enabled(), x.shape[0]))
            return self.inner(x)

    model = Recording()
    queries, docs = batches(20, 2)
    loss = gradcache.cached_loss(lambda q, d: fusedloss.info_nce_loss(q, d), [(model, queries), (model, docs)],
                                 mini_batch_size=6)
    loss.backward()
    with_grad = [rows for enabled, rows in sizes if enabled]
    assert len(with_grad) == 8 and max(with_grad) == 6  # 4 mini-batches per tower, replayed once
    assert all(p.grad is not None for p in model.parameters())


def test_upstream_gradient_scales_everything():
    """backward of 3 * loss gives three times the gradients (e.g. a GradScaler's scale)."""
    loss_fn, towers, extra = make_case("siglip")
    torch.manual_seed(8)
    _, single, _ = cached_grads(loss_fn, towers, 4, extra)
    torch.manual_seed(8)
    (3.0 * gradcache.cached_loss(loss_fn, towers, mini_batch_size=4)).backward()
    assert_all_close(collect(towers, extra), [3.0 * g for g in single], rtol=1e-12, atol=1e-14)


def test_dict_and_tuple_batches():
    """A dict batch is passed as keywords, a tuple positionally; non-tensor values and 0-dim tensors reach every
    mini-batch."""

    class Keyed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = encoder(6, dropout=0.0)

        def forward(self, features, mask, scale=1.0):
            return self.inner(features * mask[:, None]) * scale

    model = Keyed()
    features, = batches(11, 1)
    mask = (torch.arange(11) % 3 != 0).double()
    scale = torch.tensor(0.5, dtype=torch.float64)
    towers_dict = [(model, {"features": features, "mask": mask, "scale": 2.0}), (model, (features, mask, scale))]
    loss_fn = lambda a, b: fusedloss.clip_loss(a, b, 3.0)  # noqa: E731
    loss_fn(model(features, mask, scale=2.0), model(features, mask, scale)).backward()
    expected = collect([(model, None)], [])
    _, got, _ = cached_grads(loss_fn, towers_dict, 4, [])
    assert_all_close(got, expected, rtol=1e-12, atol=1e-14)


def test_autocast_state_is_replayed():
    """A forward under CPU autocast replays under the same autocast although
    the backward runs outside it; the gradients match the plain step's to bf16
    resolution (the plain step sums the mini-batches' weight gradients in bf16,
    through autocast's cached bf16 weight copy; each replay adds its own in fp32)."""
    dtypes = []

    def recording(enc):
        def forward(x):
            out = enc(x)
            if torch.is_grad_enabled():
                dtypes.append(out.dtype)
            return out
        return forward

    image_encoder, text_encoder = (encoder(seed, dropout=0.0, dtype=torch.float32) for seed in (9, 10))
    images, texts = batches(16, 2, torch.float32)
    loss_fn = lambda i, t: fusedloss.clip_loss(i, t, 2.0)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_fn(*(torch.cat([enc(x[i:i + 4]) for i in range(0, 16, 4)])
                          for enc, x in ((image_encoder, images), (text_encoder, texts))))
    plain.backward()
    towers = [(image_encoder, images), (text_encoder, texts)]
    expected = collect(towers, [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gradcache.cached_loss(loss_fn, [(recording(image_encoder), images), (recording(text_encoder), texts)],
                                     mini_batch_size=4)
    loss.backward()
    assert dtypes == [torch.bfloat16] * 8
    torch.testing.assert_close(loss, plain.detach())
    for got, want in zip(collect(towers, []), expected):
        assert (got - want).abs().max() <= 2**-7 * want.abs().max()


def test_no_grad_returns_the_plain_loss():
    loss_fn, towers, _ = make_case("clip")
    for enc, _ in towers:
        enc.eval()
    with torch.no_grad():
        loss = gradcache.cached_loss(loss_fn, towers, mini_batch_size=5)
        expected = loss_fn(*(enc(x) for enc, x in towers))
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)


def test_second_backward_is_a_clear_error():
    loss_fn, towers, _ = make_case("clip")
    loss = gradcache.cached_loss(loss_fn, towers, mini_batch_size=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def _enc():
    return encoder(11)


BAD_ARGUMENTS = [
    ("mini_batch_size zero", lambda: gradcache.cached_loss(lambda a: a.sum(), [(_enc(), torch.ones(3, DIM_IN))],
                                                            mini_batch_size=0), ValueError, "mini_batch_size"),
    ("mini_batch_size float", lambda: gradcache.cached_loss(lambda a: a.sum(), [(_enc(), torch.ones(3, DIM_IN))],
                                                             mini_batch_size=2.0), TypeError, "mini_batch_size"),
    ("loss_fn not callable", lambda: gradcache.cached_loss(3, [(_enc(), torch.ones(3, DIM_IN))], mini_batch_size=2),
     TypeError, "loss_fn"),
    ("no towers", lambda: gradcache.cached_loss(lambda a: a.sum(), [], mini_batch_size=2), ValueError, "towers"),
    ("towers a tensor", lambda: gradcache.cached_loss(lambda a: a.sum(), torch.ones(3), mini_batch_size=2), TypeError,
     "towers"),
    ("tower not a pair", lambda: gradcache.cached_loss(lambda a: a.sum(), [_enc()], mini_batch_size=2), TypeError,
     r"towers\[0\]"),
    ("encoder not callable", lambda: gradcache.cached_loss(lambda a: a.sum(), [(3, torch.ones(3, DIM_IN))],
                                                            mini_batch_size=2), TypeError, "encoder"),
    ("batch without tensors", lambda: gradcache.cached_loss(lambda a: a.sum(), [(_enc(), [1, 2])],
                                                             mini_batch_size=2), TypeError, "batch"),
    ("ragged batch", lambda: gradcache.cached_loss(lambda a: a.sum(), [(_enc(), (torch.ones(3, 6), torch.ones(4)))],
                                                    mini_batch_size=2), ValueError, "same number of rows"),
    ("empty batch", lambda: gradcache.cached_loss(lambda a: a.sum(), [(_enc(), torch.ones(0, 6))],
                                                   mini_batch_size=2), ValueError, "no rows"),
    ("encoder output rows", lambda: gradcache.cached_loss(lambda a: a.sum(), [(lambda x: x[:1], torch.ones(3, 6))],
                                                           mini_batch_size=2), ValueError, "one row per input row"),
    ("loss not scalar", lambda: gradcache.cached_loss(lambda a: a, [(_enc().double(), torch.ones(3, 6,
                                                      dtype=torch.float64))], mini_batch_size=2), ValueError,
     "0-dim loss"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD_ARGUMENTS])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
