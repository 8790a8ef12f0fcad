"""Regression tests for the candidate samplers and the argument checks of the
sampled losses: unique sampling that could never finish, unique sampling that
was quadratic near the full range, and arguments that were silently truncated
or failed obscurely (or only inside the kernel)."""
import contextlib
import signal
import time

import numpy as np
import pytest
import torch

import fusedloss
from fusedloss import _ops, _validate
from fusedloss.compat import tf
from fusedloss.samplers import LogUniformSampler, UniformSampler, UnigramSampler, expected_count
from conftest import requires_cuda

ONE = torch.zeros(1, 1, dtype=torch.long)


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: a sampling loop that never ends is interrupted
    (Python runs the handler between the loop's tensor ops)."""
    def expire(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def no_kernel(monkeypatch):
    """Argument errors must come before the fused op is reached."""
    class Unreachable:
        def __getattr__(self, name):
            raise AssertionError(f"torch.ops.fusedloss.{name} ran before the argument check")

    monkeypatch.setattr(_ops, "ops", Unreachable())


def problem(n=4, d=5, c=12, num_true=1, k=3):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    target = torch.randint(0, c, (n, num_true), generator=g)
    sv = (torch.randint(0, c, (k,), generator=g), torch.rand(n, num_true, generator=g) + 0.1,
          torch.rand(k, generator=g) + 0.1)
    return x, w, b, target, sv


# ------------------------------------------------------- 1. unique sampling that cannot finish


@pytest.mark.parametrize("make, drawable", [
    (lambda: UnigramSampler([5, 0, 0, 0, 0]), 1),
    (lambda: UnigramSampler([2, 7], num_reserved_ids=3), 2),
    # The second weight cannot move the float64 running sum: the inverse CDF never returns it.
    (lambda: UnigramSampler([1e20, 1.0]), 1),
])
def test_unique_needs_enough_classes_of_nonzero_probability(make, drawable):
    sampler = make()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with deadline(5), pytest.raises(ValueError, match=rf"only {drawable} of the {sampler.range_max} classes .*"
                                                      rf"num_sampled={drawable + 1}"):
        sampler.sample(ONE, drawable + 1, unique=True, generator=g)
    assert torch.equal(g.get_state(), state)  # raised before drawing
    sampler.sample(ONE, drawable + 1, unique=False, generator=g)  # with replacement it is fine
    with deadline(5):
        got, _, counts = sampler.sample(ONE, drawable, unique=True, generator=g)
    assert torch.equal(got.sort().values, torch.nonzero(sampler.probability(torch.arange(sampler.range_max))
                                                        .gt(0)).flatten()[:drawable])
    assert (counts > 0).all()


def test_tf_fixed_unigram_with_zero_counts_raises():
    true = torch.zeros(2, 1, dtype=torch.long)
    with deadline(5), pytest.raises(ValueError, match="only 1 of the 5 classes have non-zero probability"):
        tf.fixed_unigram_candidate_sampler(true, 1, 3, True, 5, unigrams=[5, 0, 0, 0, 0])
    with deadline(5), pytest.raises(ValueError, match="only 3 of the 5 classes"):
        tf.fixed_unigram_candidate_sampler(true, 1, 4, True, 5, unigrams=[1, 2, 3], num_reserved_ids=2)


# ------------------------------------------------------- 2. unique sampling near the full range


def oracle_unique(sampler, k, seed):
    """TensorFlow's loop, one draw at a time (the old vectorised algorithm
    returned the same), over the CPU stream: there torch's stream does not
    depend on how the draws are batched."""
    g = torch.Generator().manual_seed(seed)
    seen, values, tries = set(), [], 0
    while True:
        for value in sampler._draw(1 << 16, g, "cpu").tolist():
            tries += 1
            if value not in seen:
                seen.add(value)
                values.append(value)
                if len(values) == k:
                    return torch.tensor(values), tries


@pytest.mark.parametrize("make", [
    lambda: LogUniformSampler(50),
    lambda: UniformSampler(50),
    lambda: UnigramSampler(torch.arange(48, dtype=torch.float64) % 7 + 1, distortion=0.75, num_reserved_ids=2),
])
@pytest.mark.parametrize("k", [1, 5, 30, 47, 48])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unique_equals_one_draw_at_a_time(make, k, seed):
    sampler = make()
    true = torch.tensor([[0], [3], [40]])
    got, true_count, sampled_count = sampler.sample(true, k, unique=True,
                                                    generator=torch.Generator().manual_seed(seed))
    want, tries = oracle_unique(sampler, k, seed)
    assert torch.equal(got, want)
    assert torch.equal(sampled_count, expected_count(sampler.probability(want), k, tries))
    assert torch.equal(true_count, expected_count(sampler.probability(true), k, tries))


@pytest.mark.parametrize("make", [LogUniformSampler, UniformSampler])
def test_unique_full_range_is_fast(make):
    # Was quadratic: 100 s for 10000 (log-uniform); TensorFlow takes 0.04 s for
    # 20000. A generous bound on 2 cores: a regression guard, not a benchmark.
    n = 20_000
    sampler = make(n)
    start = time.perf_counter()
    with deadline(30):
        got, _, counts = sampler.sample(ONE, n, unique=True, generator=torch.Generator().manual_seed(0))
    assert time.perf_counter() - start < 10
    # Many batches were needed; still exactly TensorFlow's loop on the same stream.
    want, tries = oracle_unique(sampler, n, 0)
    assert tries > 5 * n
    assert torch.equal(got, want)
    assert torch.equal(counts, expected_count(sampler.probability(want), n, tries))


@requires_cuda
def test_unique_full_range_on_cuda():
    n = 20_000
    g = torch.Generator(device="cuda").manual_seed(0)
    got, true_count, counts = LogUniformSampler(n).sample(ONE.cuda(), n, unique=True, generator=g)
    assert got.is_cuda and torch.equal(got.sort().values.cpu(), torch.arange(n))
    assert (counts > 0).all() and (counts <= 1).all() and true_count.is_cuda


# ------------------------------------------------------- 3. argument checks


@pytest.mark.parametrize("fn", [tf.sampled_softmax_loss, tf.nce_loss])
def test_tf_loss_num_true(fn, no_kernel):
    x, w, b, _, _ = problem()
    labels = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="num_true must be >= 1"):  # was ZeroDivisionError (nce_loss)
        fn(w, b, labels, x, 3, 12, num_true=0)
    with pytest.raises(TypeError, match="num_true"):
        fn(w, b, labels, x, 3, 12, num_true=2.0)
    with pytest.raises(ValueError, match=r"labels must be \[batch, num_true=3\]"):
        fn(w, b, labels, x, 3, 12, num_true=3)  # 2-D of another width
    with pytest.raises(ValueError, match="labels must be"):
        fn(w, b, torch.zeros(7, dtype=torch.long), x, 3, 12, num_true=2)  # 7 labels are not rows of 2


def test_tf_samplers_and_hits_num_true():
    true = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="num_true"):
        tf.uniform_candidate_sampler(true, 0, 3, True, 10)
    with pytest.raises(ValueError, match="num_true"):
        tf.compute_accidental_hits(true, torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="true_classes must be"):
        tf.compute_accidental_hits(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1]), 2)


def test_generator_type():
    x, w, b, target, sv = problem()
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        UniformSampler(10).sample(ONE, 3, generator=0)
    with pytest.raises(TypeError, match="generator"):
        fusedloss.sampled_softmax_loss(x, w, target, 3, b, generator=torch.manual_seed)
    with pytest.raises(TypeError, match="generator"):
        fusedloss.nce_loss(x, w, target, None, b, sampled_values=sv, generator=3)


@requires_cuda
def test_generator_device():
    x, w, b, target = (t.cuda() for t in problem()[:4])
    with pytest.raises(ValueError, match="generator is on cpu"):
        fusedloss.sampled_softmax_loss(x, w, target, 3, b, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator is on cuda"):
        UniformSampler(10).sample(ONE, 3, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (12.0, TypeError), (True, TypeError)])
def test_num_classes(bad, error, no_kernel):
    x, w, b, target, sv = problem()
    for make in (LogUniformSampler, UniformSampler):
        with pytest.raises(error, match="range_max"):
            make(bad)
    with pytest.raises(error, match="range_max"):
        tf.log_uniform_candidate_sampler(ONE, 1, 1, True, bad)
    for fn in (fusedloss.sampled_softmax_loss, fusedloss.nce_loss):
        with pytest.raises(error, match="num_classes"):  # 0 was an IndexError about the targets
            fn(x, w, target, None, b, num_classes=bad, sampled_values=sv)
    for fn in (tf.sampled_softmax_loss, tf.nce_loss):
        with pytest.raises(error, match="num_classes"):
            fn(w, b, target, x, 3, bad)
    for module in (fusedloss.SampledSoftmaxLoss, fusedloss.NCELoss):
        with pytest.raises(error, match="num_classes"):
            module(bad, 3)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("which", [1, 2])
def test_expected_counts_must_be_positive_for_log_q(value, which, no_kernel):
    x, w, b, target, sv = problem()
    sv = list(sv)
    sv[which] = sv[which].clone()
    sv[which][1] = value
    for fn in (fusedloss.sampled_softmax_loss, fusedloss.nce_loss):
        with pytest.raises(ValueError, match=rf"sampled_values\[{which}\].*positive and finite"):
            fn(x, w, target, None, b, sampled_values=tuple(sv))
    with pytest.raises(ValueError, match=rf"sampled_values\[{which}\]"):
        tf.sampled_softmax_loss(w, b, target, x, 3, 12, sampled_values=tuple(sv))


def test_expected_counts_unchecked_without_log_q_or_value_checks(monkeypatch):
    x, w, b, target, sv = problem()
    sv = (sv[0], torch.zeros_like(sv[1]), sv[2])
    assert torch.isfinite(fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv,
                                                         subtract_log_q=False))
    # Where values cannot be read (torch.compile, CUDA graph capture) the check is skipped like the range checks.
    monkeypatch.setattr(_validate, "should_check_values", lambda t: False)
    fusedloss.sampled_softmax_loss(x, w, target, None, b, sampled_values=sv)


def test_unigram_arguments():
    with pytest.raises(ValueError, match="distortion"):
        UnigramSampler([1, 2, 3], distortion=-0.5)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="distortion"):
            UnigramSampler([1, 2, 3], distortion=bad)
    with pytest.raises(TypeError, match="distortion"):
        UnigramSampler([1, 2, 3], distortion="0.75")
    with pytest.raises(ValueError, match="positive entry"):
        UnigramSampler([0, 0, 0], distortion=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        UnigramSampler([3, -1, 2])
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="finite"):
            UnigramSampler([1.0, bad])
    with pytest.raises(ValueError, match="overflows"):  # was NaN probabilities
        UnigramSampler([1e200, 1.0], distortion=2.0)
    with pytest.raises(TypeError, match="num_reserved_ids"):
        UnigramSampler([1, 2], num_reserved_ids=1.5)
    assert UnigramSampler([1, 2], distortion=0, num_reserved_ids=np.int64(1)).range_max == 3


@pytest.mark.parametrize("bad, error", [(5.0, TypeError), (5.5, TypeError), (True, TypeError),
                                        (torch.tensor(5), TypeError), (0, ValueError), (-2, ValueError)])
def test_num_sampled(bad, error, no_kernel):
    x, w, b, target, sv = problem()
    with pytest.raises(error, match="num_sampled"):  # 5.5 was silently truncated to 5
        LogUniformSampler(12).sample(target, bad, generator=torch.Generator().manual_seed(0))
    for fn in (fusedloss.sampled_softmax_loss, fusedloss.nce_loss):
        with pytest.raises(error, match="num_sampled"):
            fn(x, w, target, bad, b, generator=torch.Generator().manual_seed(0))
    for fn in (tf.sampled_softmax_loss, tf.nce_loss):
        with pytest.raises(error, match="num_sampled"):
            fn(w, b, target, x, bad, 12, seed=0)
    with pytest.raises(error, match="num_sampled"):
        tf.uniform_candidate_sampler(target, 1, bad, True, 12)
    with pytest.raises(error, match="num_sampled"):
        fusedloss.SampledSoftmaxLoss(12, bad)


def test_num_sampled_integer_types_accepted():
    sampled_ids, _, _ = LogUniformSampler(12).sample(ONE, np.int64(5), generator=torch.Generator().manual_seed(0))
    assert sampled_ids.shape == (5,)


def test_num_sampled_above_num_classes_with_unique(no_kernel):
    x, w, b, target, _ = problem()
    with pytest.raises(ValueError, match="range is too small.*num_sampled=13.*range_max=12"):
        fusedloss.sampled_softmax_loss(x, w, target, 13, b)
    with pytest.raises(ValueError, match="range is too small"):
        tf.nce_loss(w, b, target, x, 13, 12)
    with pytest.raises(ValueError, match="range is too small"):
        UniformSampler(12).sample(target, 13, unique=True)


@pytest.mark.parametrize("bad, error", [(4.0, TypeError), (True, TypeError), (0, ValueError), (-8, ValueError)])
def test_chunk_size(bad, error, no_kernel):
    x, w, b, target, sv = problem()
    for fn in (fusedloss.sampled_softmax_loss, fusedloss.nce_loss):
        with pytest.raises(error, match="chunk_size"):
            fn(x, w, target, None, b, sampled_values=sv, chunk_size=bad)
    with pytest.raises(error, match="chunk_size"):
        fusedloss.NCELoss(12, 3, chunk_size=bad)
