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

Sampling is vectorised: the stream of independent draws is taken in batches
and the first K distinct values in draw order are kept, which is exactly the
sequence TensorFlow's one-at-a-time rejection loop produces from the same
draws. Batches grow geometrically, each is compared with the sorted set of
values seen so far and only its unseen draws are sorted, so K = range_max
(millions of draws for log-uniform) costs O(D log D) for D draws.
"""
import math

import torch

from ._validate import check_finite, check_generator, check_int, check_positive_int

__all__ = ["CandidateSampler", "LogUniformSampler", "UniformSampler", "UnigramSampler", "expected_count"]


def expected_count(prob, num_sampled, num_tries):
    """TensorFlow's ``ExpectedCountHelper`` on float32 probabilities."""
    prob = prob.to(torch.float32)
    if num_tries == num_sampled:
        return prob * num_sampled
    return -torch.expm1(num_tries * torch.log1p(-prob))


# Most draws per batch: bounds the memory of samples that need millions of draws.
_MAX_BATCH = 1 << 22


def _new_values(draws, seen):
    """Mask of the draws that are the first occurrence of their value (in draw
    order) and not in ``seen`` (sorted). Only the unseen draws are sorted: near
    the full range they are a small fraction of the batch."""
    unseen = torch.ones_like(draws, dtype=torch.bool)
    if seen.numel():
        at = torch.searchsorted(seen, draws).clamp_(max=seen.numel() - 1)
        unseen = seen[at] != draws
    where = unseen.nonzero().squeeze(1)
    values, order = torch.sort(draws[where], stable=True)  # stable: equal values stay in draw order
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    new = torch.zeros_like(unseen)
    new[where[order[first]]] = True
    return new


def _batch_size(shortfall, drawn, unseen_mass):
    """Draws for the next round. A draw is new with probability at most the
    mass not seen yet, so ``shortfall / unseen_mass`` is a lower bound on the
    draws still needed; taking at least as many as were drawn so far keeps the
    rounds logarithmic where that bound is far too low (the rare tail of
    log-uniform). The first round, ``max(2K, 64)``, is enough when K << range_max
    and keeps the CUDA stream of earlier versions there (Philox draws depend on
    the batch sizes; on the CPU the stream does not)."""
    want = 2 * shortfall / unseen_mass if unseen_mass > 0 else math.inf
    return int(min(max(want, drawn, 64), _MAX_BATCH))


class CandidateSampler:
    """Base class: subclasses define ``range_max``, ``_draw(n, generator, device)``
    (n independent draws, int64) and ``probability(classes)`` (float64), and
    override ``num_drawable()`` if some classes have probability 0."""

    range_max: int

    def _draw(self, n, generator, device):
        raise NotImplementedError

    def probability(self, classes):
        raise NotImplementedError

    def num_drawable(self):
        """Number of classes a draw can return (those of non-zero probability)."""
        return self.range_max

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
        num_sampled = check_positive_int(num_sampled, "num_sampled")
        device = true_classes.device
        check_generator(generator, device)
        if unique and num_sampled > self.range_max:
            raise ValueError(
                f"Sampler's range is too small: num_sampled={num_sampled} distinct candidates requested with "
                f"unique=True but range_max={self.range_max}"
            )
        drawable = self.num_drawable()
        if unique and num_sampled > drawable:
            # Rejection sampling would never find them (TensorFlow loops forever).
            raise ValueError(
                f"only {drawable} of the {self.range_max} classes have non-zero probability, so "
                f"unique=True cannot draw num_sampled={num_sampled} distinct candidates"
            )
        if unique:
            sampled, num_tries = self._draw_unique(num_sampled, generator, device)
        else:
            sampled, num_tries = self._draw(num_sampled, generator, device), num_sampled
        true_count = expected_count(self.probability(true_classes), num_sampled, num_tries)
        sampled_count = expected_count(self.probability(sampled), num_sampled, num_tries)
        return sampled, true_count, sampled_count

    def _draw_unique(self, k, generator, device):
        """First k distinct values of the draw stream, in draw order, and the
        number of draws that took (TensorFlow's num_tries)."""
        seen = torch.empty(0, dtype=torch.long, device=device)  # sorted
        found = []  # each batch's new values, in draw order
        drawn, seen_mass = 0, 0.0
        while True:
            shortfall = k - seen.numel()
            batch = _batch_size(shortfall, drawn, 1.0 - seen_mass)
            draws = self._draw(batch, generator, device)
            new = _new_values(draws, seen)
            count = torch.cumsum(new, 0)
            if int(count[-1]) >= shortfall:
                stop = int(torch.searchsorted(count, shortfall)) + 1  # the draw giving the k-th distinct value
                found.append(draws[:stop][new[:stop]])
                return torch.cat(found), drawn + stop
            fresh = draws[new]
            found.append(fresh)
            seen = torch.sort(torch.cat([seen, fresh])).values
            seen_mass += float(self.probability(fresh).sum())
            drawn += batch


class LogUniformSampler(CandidateSampler):
    """Zipfian: P(c) = (log(c + 2) - log(c + 1)) / log(range_max + 1). Classes
    should be sorted by decreasing frequency (TensorFlow's assumption)."""

    def __init__(self, range_max):
        self.range_max = check_positive_int(range_max, "range_max")
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
        self.range_max = check_positive_int(range_max, "range_max")

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
        if not bool((counts > 0).any()):
            raise ValueError("counts must contain a positive entry")
        self.distortion = check_finite(distortion, "distortion")
        if self.distortion < 0:
            raise ValueError(f"distortion must be >= 0, got {self.distortion}")
        self.num_reserved_ids = check_int(num_reserved_ids, "num_reserved_ids", minimum=0)
        weights = torch.cat([torch.zeros(self.num_reserved_ids, dtype=torch.float64), counts.pow(self.distortion)])
        total = weights.sum()
        if not bool(torch.isfinite(total)):
            raise ValueError(f"counts ** distortion (distortion={self.distortion}) overflows float64; rescale counts")
        self.range_max = weights.numel()
        self._probs = weights / total
        self._cdf = torch.cumsum(self._probs, 0)
        # The inverse CDF returns class c only if cdf[c] > cdf[c - 1]: a weight
        # too small to move the running sum can never be drawn either.
        self._num_drawable = int((torch.diff(self._cdf, prepend=self._cdf.new_zeros(1)) > 0).sum())
        self._device_cache = {}

    def num_drawable(self):
        return self._num_drawable

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
