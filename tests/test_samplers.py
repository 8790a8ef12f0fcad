"""Candidate samplers: distributions, TensorFlow's expected-count formulas,
unique sampling, seeding and errors."""
import math

import pytest
import torch

from fusedloss.samplers import LogUniformSampler, UniformSampler, UnigramSampler, expected_count
from conftest import requires_cuda

SAMPLERS = {
    "log_uniform": lambda: LogUniformSampler(50),
    "uniform": lambda: UniformSampler(50),
    "unigram": lambda: UnigramSampler(torch.arange(48, dtype=torch.float64) % 7 + 1, distortion=0.75,
                                      num_reserved_ids=2),
}


def test_log_uniform_probability():
    """LogUniformSampler's probabilities sum to one and follow the log-uniform formula."""
    s = LogUniformSampler(1000)
    p = s.probability(torch.arange(1000))
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert math.isclose(p[0].item(), math.log(2) / math.log(1001), rel_tol=1e-12)


def test_unigram_probability_tf_example():
    """UnigramSampler reproduces TensorFlow's documented example."""
    # TensorFlow: unigrams [1, 4, 9], distortion 0.5, 2 reserved ids, k=4 -> counts [0, 0, .667, 1.333, 2.0].
    s = UnigramSampler([1, 4, 9], distortion=0.5, num_reserved_ids=2)
    assert s.range_max == 5
    _, true_count, _ = s.sample(torch.arange(5).view(1, 5), 4, unique=False)
    torch.testing.assert_close(true_count, torch.tensor([[0.0, 0.0, 2 / 3, 4 / 3, 2.0]]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_empirical_frequencies(device, name):
    """Draws follow each sampler's distribution (chi-square) with counts k * p."""
    sampler = SAMPLERS[name]()
    g = torch.Generator(device=device).manual_seed(0)
    draws = 200_000
    sampled, _, counts = sampler.sample(torch.zeros(1, 1, dtype=torch.long, device=device), draws, unique=False,
                                        generator=g)
    assert sampled.device.type == device and sampled.dtype == torch.int64
    freq = torch.bincount(sampled.cpu(), minlength=sampler.range_max).double() / draws
    p = sampler.probability(torch.arange(sampler.range_max)).cpu()
    # Chi-square over the classes with p > 0 (49 dof at most: the 0.1% quantile is ~86).
    live = p > 0
    chi2 = (draws * (freq[live] - p[live]).square() / p[live]).sum().item()
    assert chi2 < 100, chi2
    assert (freq[~live] == 0).all()
    # unique=False: count = k * p exactly.
    torch.testing.assert_close(counts.cpu(), (draws * sampler.probability(sampled.cpu())).float())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_unique_expected_counts_follow_num_tries(name):
    """unique=True counts follow TensorFlow's num_tries formula."""
    sampler = SAMPLERS[name]()
    k = 20
    g = torch.Generator().manual_seed(1)
    true_classes = torch.tensor([[3, 7], [10, 11]])
    sampled, true_count, sampled_count = sampler.sample(true_classes, k, unique=True, generator=g)
    assert sampled.numel() == k and torch.unique(sampled).numel() == k
    p = sampler.probability(sampled).float()
    # Recover num_tries from one count and check TensorFlow's formula everywhere.
    tries = [n for n in range(k, 2000)
             if torch.allclose(expected_count(p, k, n), sampled_count, rtol=1e-5, atol=1e-7)]
    assert len(tries) >= 1
    n = tries[0]
    assert n > k  # 20 distinct out of 50 always collides with these distributions
    torch.testing.assert_close(sampled_count, -torch.expm1(n * torch.log1p(-p)))
    torch.testing.assert_close(true_count, expected_count(sampler.probability(true_classes), k, n))


def test_unique_without_collision_uses_pk():
    """unique=True without any rejection keeps the p * k counts."""
    # TensorFlow keeps p*k when rejection never triggered (range 1e6, k=5).
    s = UniformSampler(10**6)
    sampled, _, counts = s.sample(torch.zeros(1, 1, dtype=torch.long), 5, unique=True,
                                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(counts, torch.full((5,), 5e-6))


def test_unique_inclusion_frequency_matches_counts():
    """unique=True expected counts approximate the inclusion frequency."""
    # Monte-Carlo: over many unique draws the inclusion frequency of class c is
    # close to the average expected count reported for c. (TensorFlow's count
    # conditions on num_tries, which is only approximately the inclusion
    # probability; the approximation is good when K << range_max.)
    s = LogUniformSampler(1000)
    k, trials = 50, 2000
    g = torch.Generator().manual_seed(2)
    hits = torch.zeros(1000, dtype=torch.float64)
    expected = torch.zeros(1000, dtype=torch.float64)
    all_classes = torch.arange(1000).view(1, -1)
    for _ in range(trials):
        sampled, true_count, _ = s.sample(all_classes, k, unique=True, generator=g)
        hits[sampled] += 1
        expected += true_count[0].double()
    torch.testing.assert_close(hits / trials, expected / trials, atol=0.05, rtol=0)


def test_range_equals_k_unique():
    """unique=True with k = range_max draws every class once."""
    s = LogUniformSampler(6)
    sampled, _, counts = s.sample(torch.zeros(1, 1, dtype=torch.long), 6, unique=True,
                                  generator=torch.Generator().manual_seed(0))
    assert sorted(sampled.tolist()) == list(range(6))
    assert (counts <= 1.0).all() and (counts > 0).all()


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("unique", [True, False])
def test_same_seed_same_samples(device, name, unique):
    """The same seed gives the same samples, another seed different ones."""
    sampler = SAMPLERS[name]()
    t = torch.tensor([[1], [4]], device=device)
    a = sampler.sample(t, 12, unique=unique, generator=torch.Generator(device=device).manual_seed(5))
    b = sampler.sample(t, 12, unique=unique, generator=torch.Generator(device=device).manual_seed(5))
    c = sampler.sample(t, 12, unique=unique, generator=torch.Generator(device=device).manual_seed(6))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    assert a[1].shape == (2, 1) and a[1].dtype == torch.float32 and a[2].shape == (12,)


def test_errors():
    """Sampler argument errors are clear."""
    t = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="range is too small"):
        LogUniformSampler(10).sample(t, 11, unique=True)
    LogUniformSampler(10).sample(t, 11, unique=False)  # fine with replacement
    with pytest.raises(IndexError, match="true_classes"):
        UniformSampler(10).sample(torch.tensor([[10]]), 3)
    with pytest.raises(IndexError, match="true_classes"):
        UniformSampler(10).sample(torch.tensor([[-1]]), 3)
    with pytest.raises(TypeError, match="true_classes"):
        UniformSampler(10).sample(torch.zeros(2, 1), 3)
    with pytest.raises(ValueError, match="num_sampled"):
        UniformSampler(10).sample(t, 0)
    with pytest.raises(ValueError, match="range_max"):
        LogUniformSampler(0)
    with pytest.raises(ValueError, match="non-negative"):
        UnigramSampler([1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="1-D"):
        UnigramSampler([[1.0, 2.0]])
    with pytest.raises(ValueError, match="1-D"):
        UnigramSampler([])
    with pytest.raises(ValueError, match="positive entry"):
        UnigramSampler([0.0, 0.0])
    with pytest.raises(ValueError, match="num_reserved_ids"):
        UnigramSampler([1.0], num_reserved_ids=-1)


@requires_cuda
def test_generator_on_wrong_device():
    """A CPU generator for CUDA sampling is a clear error."""
    with pytest.raises(ValueError, match="generator"):
        UniformSampler(10).sample(torch.zeros(2, 1, dtype=torch.long, device="cuda"), 3,
                                  generator=torch.Generator().manual_seed(0))
