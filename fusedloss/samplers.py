"""Candidate samplers with TensorFlow's semantics (``tf.random.*_candidate_sampler``).

Each sampler's ``sample(true_classes, num_sampled, unique=True, generator=None)``
returns TensorFlow's triple ``(sampled [K] int64, true_expected_count [N, T]
float32, sampled_expected_count [K] float32)`` on the device of
``true_classes``. As in TensorFlow, the true classes do not change what is
drawn; they only get expected counts.

Expected counts follow TensorFlow's ``RangeSampler``: with ``unique=False``
each of the K draws is independent and the count of class c is ``K * p(c)``.
With ``unique=True`` the sampler draws until it has K distinct classes,
counting the draws (``num_tries``); the count of c is then
``1 - (1 - p(c)) ** num_tries`` (its probability of appearing), except that
TensorFlow keeps ``K * p(c)`` when there was no rejection (``num_tries == K``).
The counts are computed in float32 like TensorFlow's kernel.

Sampling is vectorised: a batch of draws is taken at once and the first K
distinct values in draw order are kept, which is exactly the sequence
TensorFlow's one-at-a-time rejection loop produces from the same draws.
"""
import math

import torch

__all__ = ["CandidateSampler", "LogUniformSampler", "UniformSampler", "UnigramSampler", "expected_count"]


def expected_count(prob, num_sampled, num_tries):
    """TensorFlow's ``ExpectedCountHelper`` on float32 probabilities."""
    prob = prob.to(torch.float32)
    if num_tries == num_sampled:
        return prob * num_sampled
    return -torch.expm1(num_tries * torch.log1p(-prob))


def _first_distinct(draws):
    """Mask of the draws that are the first occurrence of their value (draw order)."""
    order = torch.sort(draws, stable=True).indices
    sorted_draws = draws[order]
    first_sorted = torch.ones_like(sorted_draws, dtype=torch.bool)
    first_sorted[1:] = sorted_draws[1:] != sorted_draws[:-1]
    first = torch.empty_like(first_sorted)
    first[order] = first_sorted
    return first


class CandidateSampler:
    """Base class: subclasses define ``range_max``, ``_draw(n, generator, device)``
    (n independent draws, int64) and ``probability(classes)`` (float64)."""

    range_max: int

    def _draw(self, n, generator, device):
        raise NotImplementedError

    def probability(self, classes):
        raise NotImplementedError

    def _check_true_classes(self, true_classes):
        if not isinstance(true_classes, torch.Tensor):
            raise TypeError(f"true_classes must be a torch.Tensor, got {type(true_classes).__name__}")
        if true_classes.dtype.is_floating_point or true_classes.dtype.is_complex or true_classes.dtype == torch.bool:
            raise TypeError(f"true_classes must be an integer tensor, got {true_classes.dtype}")
        if true_classes.dim() == 1:
            true_classes = true_classes.unsqueeze(1)
        if true_classes.dim() != 2:
            raise ValueError(f"true_classes must be [N, num_true] (or [N]), got shape {tuple(true_classes.shape)}")
        true_classes = true_classes.long()
        if true_classes.numel() and not torch.compiler.is_compiling():
            bad = (true_classes < 0) | (true_classes >= self.range_max)
            if bool(bad.any()):
                raise IndexError(
                    f"true_classes contains {true_classes[bad][0].item()}, which is outside [0, {self.range_max})"
                )
        return true_classes

    def sample(self, true_classes, num_sampled, unique=True, generator=None):
        """Draw ``num_sampled`` candidates; returns ``(sampled, true_expected_count, sampled_expected_count)``."""
        true_classes = self._check_true_classes(true_classes)
        num_sampled = int(num_sampled)
        if num_sampled < 1:
            raise ValueError(f"num_sampled must be >= 1, got {num_sampled}")
        if unique and num_sampled > self.range_max:
            raise ValueError(
                f"Sampler's range is too small: num_sampled={num_sampled} distinct candidates requested with "
                f"unique=True but range_max={self.range_max}"
            )
        device = true_classes.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but true_classes is on {device}")
        if unique:
            sampled, num_tries = self._draw_unique(num_sampled, generator, device)
        else:
            sampled, num_tries = self._draw(num_sampled, generator, device), num_sampled
        true_count = expected_count(self.probability(true_classes), num_sampled, num_tries)
        sampled_count = expected_count(self.probability(sampled), num_sampled, num_tries)
        return sampled, true_count, sampled_count

    def _draw_unique(self, k, generator, device):
        """First k distinct draws in draw order and the number of draws that took."""
        draws = torch.empty(0, dtype=torch.long, device=device)
        distinct = 0
        while distinct < k:
            # Draw a batch sized to the shortfall (at least 2x, so heavy-tailed
            # samplers rarely need a third round); earlier draws keep their order.
            batch = max(2 * (k - distinct), 64)
            draws = torch.cat([draws, self._draw(batch, generator, device)])
            first = _first_distinct(draws)
            distinct = int(first.sum())
        positions = torch.cumsum(first, 0)
        num_tries = int(torch.searchsorted(positions, torch.tensor([k], device=device)).item()) + 1
        keep = first[:num_tries]
        return draws[:num_tries][keep], num_tries


class LogUniformSampler(CandidateSampler):
    """Zipfian: P(c) = (log(c + 2) - log(c + 1)) / log(range_max + 1). Classes
    should be sorted by decreasing frequency (TensorFlow's assumption)."""

    def __init__(self, range_max):
        self.range_max = _check_range(range_max)
        self._log_range = math.log1p(self.range_max)

    def _draw(self, n, generator, device):
        # TensorFlow: value = (int64)(exp(u * log(range + 1))) - 1, then % range.
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (torch.exp(u * self._log_range).long() - 1) % self.range_max

    def probability(self, classes):
        c = classes.to(torch.float64)
        return torch.log((c + 2.0) / (c + 1.0)) / self._log_range

    def __repr__(self):
        return f"LogUniformSampler(range_max={self.range_max})"


class UniformSampler(CandidateSampler):
    """Every class with probability 1 / range_max."""

    def __init__(self, range_max):
        self.range_max = _check_range(range_max)

    def _draw(self, n, generator, device):
        return torch.randint(self.range_max, (n,), generator=generator, device=device)

    def probability(self, classes):
        return torch.full(classes.shape, 1.0 / self.range_max, dtype=torch.float64, device=classes.device)

    def __repr__(self):
        return f"UniformSampler(range_max={self.range_max})"


class UnigramSampler(CandidateSampler):
    """TensorFlow's fixed unigram sampler: ``num_reserved_ids`` classes of weight
    0 followed by one class per entry of ``counts`` with weight
    ``count ** distortion``; P(c) = weight(c) / total. range_max is
    ``num_reserved_ids + len(counts)``."""

    def __init__(self, counts, distortion=1.0, num_reserved_ids=0):
        counts = torch.as_tensor(counts, dtype=torch.float64)
        if counts.dim() != 1 or counts.numel() == 0:
            raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError("counts must be finite and non-negative")
        if num_reserved_ids < 0:
            raise ValueError(f"num_reserved_ids must be >= 0, got {num_reserved_ids}")
        weights = torch.cat([torch.zeros(int(num_reserved_ids), dtype=torch.float64), counts.pow(float(distortion))])
        total = weights.sum()
        if not total > 0:
            raise ValueError("counts must contain a positive entry")
        self.range_max = weights.numel()
        self.distortion = float(distortion)
        self.num_reserved_ids = int(num_reserved_ids)
        self._probs = weights / total
        self._cdf = torch.cumsum(self._probs, 0)
        self._device_cache = {}

    def _tables(self, device):
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (self._probs.to(device), self._cdf.to(device))
        return self._device_cache[key]

    def _draw(self, n, generator, device):
        # Inverse CDF in float64 (torch.multinomial loses accuracy beyond 2**24
        # classes); zero-weight classes can never be returned.
        _, cdf = self._tables(device)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * cdf[-1]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=self.range_max - 1)

    def probability(self, classes):
        probs, _ = self._tables(classes.device)
        return probs[classes]

    def __repr__(self):
        return (f"UnigramSampler(range_max={self.range_max}, distortion={self.distortion}, "
                f"num_reserved_ids={self.num_reserved_ids})")


def _check_range(range_max):
    if isinstance(range_max, bool) or int(range_max) != range_max or range_max < 1:
        raise ValueError(f"range_max must be a positive integer, got {range_max!r}")
    return int(range_max)
