"""Every malformed call raises a clear error before any kernel runs: one table
per loss family (linear cross-entropy, sampled softmax / NCE, contrastive),
each row naming the exception type and a fragment of its message (a regex;
mostly the argument's name, as the wording may change)."""
import types

import pytest
import torch

import fusedloss
from conftest import detached, linear_ce_problem, requires_cuda, sampled_problem

ops = torch.ops.fusedloss
lce = fusedloss.linear_cross_entropy


def case(id, call, exc, match, *, cuda=False):
    """A table row: ``call`` must raise ``exc`` with a message matching ``match``."""
    return pytest.param(call, exc, match, id=id, marks=requires_cuda if cuda else ())


def elsewhere(t):
    """``t`` on the other device of a CUDA machine."""
    return t.cpu() if t.is_cuda else t.cuda()


# ------------------------------------------------- linear cross-entropy
# Rows are called with a valid problem x [6, 5], w [20, 5], t [6], b [20] on each device.

LINEAR_CE_CASES = [
    case("mismatched D", lambda x, w, t, b: lce(x[:, :-1], w, t), ValueError, "D=4"),
    case("weight not 2-D", lambda x, w, t, b: lce(x, w[0], t), ValueError, "weight.*2-D"),
    case("float target", lambda x, w, t, b: lce(x, w, t.float()), TypeError, "target"),
    case("target shape", lambda x, w, t, b: lce(x, w, t[:-1]), ValueError, "target"),
    case("target too large", lambda x, w, t, b: lce(x, w, torch.full_like(t, 20)), IndexError, "target"),
    case("negative target", lambda x, w, t, b: lce(x, w, torch.full_like(t, -2)), IndexError, "target"),
    case("bias length", lambda x, w, t, b: lce(x, w, t, b[:-1]), ValueError, "bias"),
    case("dtype mismatch", lambda x, w, t, b: lce(x, w.double(), t), TypeError, "weight"),
    case("bias dtype", lambda x, w, t, b: lce(x, w, t, b.double()), TypeError, "bias"),
    case("integer input", lambda x, w, t, b: lce(x.long(), w.long(), t), TypeError, "input"),
    case("negative softcap", lambda x, w, t, b: lce(x, w, t, softcap=-1.0), ValueError, "softcap"),
    case("zero softcap", lambda x, w, t, b: lce(x, w, t, softcap=0.0), ValueError, "softcap"),
    case("unknown reduction", lambda x, w, t, b: lce(x, w, t, reduction="avg"), ValueError, "reduction"),
    case("label_smoothing > 1", lambda x, w, t, b: lce(x, w, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    case("negative z_loss", lambda x, w, t, b: lce(x, w, t, z_loss=-1.0), ValueError, "z_loss"),
    case("weight on another device", lambda x, w, t, b: lce(x, elsewhere(w), t), ValueError, "same device",
         cuda=True),
]


@pytest.mark.parametrize("call, exc, match", LINEAR_CE_CASES)
def test_linear_ce_bad_input(device, call, exc, match):
    """linear_cross_entropy rejects the malformed call with a clear error."""
    x, w, t, b = detached(linear_ce_problem(6, 5, 20, torch.float32, device, bias=True))
    with pytest.raises(exc, match=match):
        call(x, w, t, b)


# ---------------------------------------------------- sampled softmax / NCE
# Rows are called with a valid CPU problem p: x [7, 12], w [40, 12], b [40],
# target [7, 2], shared candidates s [10] with counts tc [7, 2] and sc [10],
# and per-row candidates [7, 10].


def sampled_loss(p, **overrides):
    """sampled_softmax_loss on the valid problem with some arguments replaced."""
    kw = dict(input=p.x, weight=p.w, target=p.target, num_sampled=None, bias=p.b, sampled_values=(p.s, p.tc, p.sc))
    return fusedloss.sampled_softmax_loss(**{**kw, **overrides})


def sampled_op(p, **overrides):
    """fusedloss::sampled_forward on the per-row problem with some arguments replaced."""
    kw = dict(input=p.x, weight=p.w, bias=p.b, true_classes=p.target, sampled=p.per_row, true_log_q=None,
              sampled_log_q=None, mode=0, hit_mask=1, label_smoothing=0.0, true_label=1.0, chunk_size=0,
              sparse_grad=False)
    return ops.sampled_forward(**{**kw, **overrides})


SAMPLED_CASES = [
    # targets
    case("target >= C", lambda p: sampled_loss(p, target=torch.full((7, 2), 40)), IndexError, "target"),
    case("negative target", lambda p: sampled_loss(p, target=torch.full((7, 2), -1)), IndexError, "target"),
    case("target rows", lambda p: sampled_loss(p, target=torch.zeros(6, 2, dtype=torch.long)), ValueError,
         "target"),
    case("float target", lambda p: sampled_loss(p, target=torch.zeros(7, 2)), TypeError, "target"),
    # sampled_values
    case("candidate >= C", lambda p: sampled_loss(p, sampled_values=(p.s + 40, p.tc, p.sc)), IndexError, "sampled"),
    case("sampled count length", lambda p: sampled_loss(p, sampled_values=(p.s, p.tc, p.sc[:-1])), ValueError,
         r"sampled_values\[2\]"),
    case("true count columns", lambda p: sampled_loss(p, sampled_values=(p.s, p.tc[:, :1].expand(7, 3), p.sc)),
         ValueError, r"sampled_values\[1\]"),
    case("true count rows", lambda p: sampled_loss(p, sampled_values=(p.s, p.tc[:5], p.sc)), ValueError,
         r"sampled_values\[1\]"),
    case("candidates rows", lambda p: sampled_loss(p, sampled_values=(p.s.view(2, 5), p.tc, p.sc.view(2, 5))),
         ValueError, r"sampled_values\[0\]"),
    case("integer counts", lambda p: sampled_loss(p, sampled_values=(p.s, p.tc.long(), p.sc)), TypeError,
         r"sampled_values\[1\]"),
    case("two-tuple", lambda p: sampled_loss(p, sampled_values=(p.s, p.tc)), ValueError, "tuple"),
    # shapes, dtypes, options
    case("1-D input", lambda p: sampled_loss(p, input=p.x[0]), ValueError, "input"),
    case("mismatched D", lambda p: sampled_loss(p, weight=p.w[:, :5]), ValueError, "D="),
    case("weight dtype", lambda p: sampled_loss(p, weight=p.w.double()), TypeError, "weight"),
    case("bias length", lambda p: sampled_loss(p, bias=p.b[:-1]), ValueError, "bias"),
    case("bias dtype", lambda p: sampled_loss(p, bias=p.b.double()), TypeError, "bias"),
    case("unknown reduction", lambda p: sampled_loss(p, reduction="avg"), ValueError, "reduction"),
    case("label_smoothing > 1", lambda p: sampled_loss(p, label_smoothing=1.5), ValueError, "label_smoothing"),
    case("no num_sampled", lambda p: sampled_loss(p, sampled_values=None), ValueError, "num_sampled"),
    case("num_sampled > C", lambda p: sampled_loss(p, sampled_values=None, num_sampled=41), ValueError,
         "num_sampled"),
    case("unknown sampler", lambda p: sampled_loss(p, sampled_values=None, num_sampled=4, sampler="zipf"),
         ValueError, "sampler"),
    case("numpy input", lambda p: sampled_loss(p, input=p.x.numpy()), TypeError, "input"),
    # the op's own checks
    case("op: last-copy masking per row", lambda p: sampled_op(p, hit_mask=2), ValueError, "last-copy"),
    case("op: unknown hit_mask", lambda p: sampled_op(p, hit_mask=5), ValueError, "hit_mask"),
    case("op: true_log_q shape", lambda p: sampled_op(p, true_log_q=torch.zeros(7, 3)), ValueError, "true_log_q"),
    case("op: label_smoothing with NCE", lambda p: sampled_op(p, mode=1, label_smoothing=0.1), ValueError,
         "label_smoothing"),
    # devices
    case("input and weight on another device",
         lambda p: sampled_loss(p, input=elsewhere(p.x), weight=elsewhere(p.w), bias=elsewhere(p.b)), ValueError,
         "device|on cuda|on cpu", cuda=True),
    case("sampled_values on another device",
         lambda p: sampled_loss(p, input=elsewhere(p.x), weight=elsewhere(p.w), bias=elsewhere(p.b),
                                target=elsewhere(p.target)), ValueError, "sampled_values", cuda=True),
]


@pytest.mark.parametrize("call, exc, match", SAMPLED_CASES)
def test_sampled_bad_input(call, exc, match):
    """sampled_softmax_loss (and the sampled_forward op) reject the malformed
    call with a clear error."""
    x, w, b, target, (s, tc, sc) = sampled_problem(num_true=2)
    per_row = sampled_problem(num_true=2, per_row=True)[4][0]
    with pytest.raises(exc, match=match):
        call(types.SimpleNamespace(x=x, w=w, b=b, target=target, s=s, tc=tc, sc=sc, per_row=per_row))


# ------------------------------------------------------------- contrastive


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def contrastive_op(**overrides):
    """fusedloss::contrastive_forward on a valid 3 x 5 problem with some arguments replaced."""
    kw = dict(rows=rand(3, 4), cols=rand(5, 4), positives=torch.arange(3), scale=torch.tensor(1.0), row_ids=None,
              col_ids=None, self_offset=None, id_columns=[], id_penalty=[], symmetric=False, tile_size=0)
    return ops.contrastive_forward(**{**kw, **overrides})


def contrastive_device_cases(other, **marks):
    """Each tensor argument in turn on device ``other``."""
    calls = {
        "key": lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8, device=other)),
        "negatives": lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8), negatives=rand(2, 8, device=other)),
        "temperature": lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8),
                                                       temperature=torch.tensor(0.1, device=other)),
        "text_features": lambda: fusedloss.clip_loss(rand(4, 8), rand(4, 8, device=other), 10.0),
    }
    return [case(f"{arg} on {other}", call, ValueError, f"{arg} is on", **marks) for arg, call in calls.items()]


NON_POSITIVE = [("0.0", lambda: 0.0), ("-0.1", lambda: -0.1), ("tensor 0", lambda: torch.tensor(0.0)),
                ("tensor -1 requiring grad", lambda: torch.tensor(-1.0, requires_grad=True))]
SCALED_LOSSES = [
    ("info_nce", "temperature", lambda t: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8), temperature=t)),
    ("nt_xent", "temperature", lambda t: fusedloss.nt_xent_loss(rand(4, 8), temperature=t)),
    ("clip", "logit_scale", lambda t: fusedloss.clip_loss(rand(4, 8), rand(4, 8), t)),
]
NON_POSITIVE_CASES = [case(f"{loss} {arg}={value_id}", lambda fn=fn, make=make: fn(make()), ValueError,
                           f"{arg}.*positive")
                      for loss, arg, fn in SCALED_LOSSES for value_id, make in NON_POSITIVE]


CONTRASTIVE_CASES = [
    case("nt_xent odd rows", lambda: fusedloss.nt_xent_loss(rand(7, 4)), ValueError, "even"),
    case("nt_xent no rows", lambda: fusedloss.nt_xent_loss(rand(0, 4)), ValueError, "even"),
    case("info_nce key D", lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 6)), ValueError, "D="),
    case("info_nce negatives D", lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8), negatives=rand(3, 5)),
         ValueError, "D="),
    case("clip text D", lambda: fusedloss.clip_loss(rand(4, 8), rand(4, 6), 10.0), ValueError, "D="),
    case("info_nce key rows", lambda: fusedloss.info_nce_loss(rand(4, 8), rand(5, 8)), ValueError, "rows"),
    case("clip text rows", lambda: fusedloss.clip_loss(rand(4, 8), rand(3, 8), 10.0), ValueError, "rows"),
    case("string temperature", lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8), temperature="0.1"),
         TypeError, "temperature"),
    case("1-D temperature", lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8), temperature=torch.ones(2)),
         ValueError, "0-dim"),
    case("integer logit_scale", lambda: fusedloss.clip_loss(rand(4, 8), rand(4, 8), torch.tensor(10)), TypeError,
         "floating"),
    case("integer features",
         lambda: fusedloss.info_nce_loss(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long)),
         TypeError, "query"),
    case("key dtype", lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8, dtype=torch.float64)), TypeError,
         "dtype"),
    case("negatives dtype",
         lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8), negatives=rand(3, 8, dtype=torch.bfloat16)),
         TypeError, "dtype"),
    case("image dtype", lambda: fusedloss.clip_loss(rand(4, 8, dtype=torch.float16), rand(4, 8), 10.0), TypeError,
         "dtype"),
    case("1-D features", lambda: fusedloss.info_nce_loss(rand(8), rand(8)), ValueError, "2-D"),
    case("3-D hidden", lambda: fusedloss.nt_xent_loss(rand(2, 3, 4)), ValueError, "2-D"),
    case("list features", lambda: fusedloss.clip_loss([[1.0]], rand(1, 1), 1.0), TypeError, "torch.Tensor"),
    case("unknown reduction", lambda: fusedloss.info_nce_loss(rand(4, 8), rand(4, 8), reduction="avg"), ValueError,
         "reduction"),
    case("zero tile_size", lambda: fusedloss.nt_xent_loss(rand(4, 8), tile_size=0), ValueError, "tile_size"),
    # the op's own checks
    case("op: positive out of range", lambda: contrastive_op(positives=torch.tensor([0, 7, 1])), IndexError,
         r"positives\[1\]=7"),
    case("op: positive is the masked self column", lambda: contrastive_op(self_offset=0), ValueError, "self"),
    case("op: int32 positives", lambda: contrastive_op(positives=torch.arange(3, dtype=torch.int32)), TypeError,
         "int64"),
    case("op: positives length", lambda: contrastive_op(positives=torch.arange(4)), ValueError, "positives"),
    case("op: 1-D scale", lambda: contrastive_op(scale=torch.ones(1)), ValueError, "0-dim"),
    case("op: no key columns", lambda: contrastive_op(cols=rand(0, 4)), ValueError,
         "no key columns|has no rows"),
    case("op: cols D", lambda: contrastive_op(cols=rand(5, 3)), ValueError, "D=4"),
    case("op: cols dtype", lambda: contrastive_op(cols=rand(5, 4, dtype=torch.float64)), TypeError, "dtype"),
] + NON_POSITIVE_CASES + contrastive_device_cases("meta") + contrastive_device_cases("cuda", cuda=True)


@pytest.mark.parametrize("call, exc, match", CONTRASTIVE_CASES)
def test_contrastive_bad_input(call, exc, match):
    """info_nce_loss / nt_xent_loss / clip_loss (and the contrastive_forward
    op) reject the malformed call with a clear error."""
    with pytest.raises(exc, match=match):
        call()


@requires_cuda
@pytest.mark.parametrize("symmetric", [False, True])
def test_cuda_invalid_positive_poisons_its_row(symmetric):
    """CUDA does not scan positives on the host (no sync): a row whose positive
    is never seen gets NaN instead of a silently wrong loss or a stray read."""
    rows, cols = rand(3, 4, device="cuda"), rand(5, 4, device="cuda")
    positives = torch.tensor([0, 9, 2], device="cuda")
    loss, _, _ = ops.contrastive_forward(rows, cols, positives, torch.tensor(1.0, device="cuda"), None, None, None, [], [],
                                         symmetric, 0)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
