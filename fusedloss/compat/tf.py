"""TensorFlow-compatible sampled losses and candidate samplers.

Same signatures, defaults and per-example [N] results as ``tf.nn.sampled_softmax_loss``,
``tf.nn.nce_loss`` and ``tf.random.*_candidate_sampler``, so a TensorFlow model ports
with one import. Reproduced to the letter, quirks included:

- an accidental hit masks only the *last* copy of a duplicated sampled id;
- NCE labels each true column 1/num_true (tensorflow#10267);
- weights/biases are cast to the inputs' dtype and the loss is returned in it.

Not reproduced: masked columns are skipped instead of offset by -FLT_MAX, so
bf16/fp16 rows with a hit stay finite (TensorFlow returns NaN there) while fp32
results are identical. ``weights`` may be a list of shards (v2 "div" order: the
shards are concatenated). TensorFlow's op seeds do not make sampling
repeatable; here ``seed`` seeds a ``torch.Generator``, so it does. Where
TensorFlow returns NaN losses (an expected count of 0, e.g. a label of zero
unigram weight) or never returns (unique sampling with fewer classes of
non-zero probability than ``num_sampled``), a ValueError is raised.
"""
import torch

from .. import _validate
from .._ops import HIT_LAST_COPY, HIT_NONE, NCE, SOFTMAX
from .._validate import check_positive_int
from ..sampled import SampledOptions, _sampled_loss
from ..samplers import LogUniformSampler, UniformSampler, UnigramSampler

__all__ = [
    "compute_accidental_hits",
    "fixed_unigram_candidate_sampler",
    "log_uniform_candidate_sampler",
    "nce_loss",
    "sampled_softmax_loss",
    "uniform_candidate_sampler",
]

FLT_MAX = float(torch.finfo(torch.float32).max)


def _generator(seed, device):
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def _labels(labels, num_true, name="labels"):
    """``labels`` as int64 [batch, num_true]; 1-D labels are regrouped into rows of num_true."""
    num_true = check_positive_int(num_true, "num_true")
    labels = _validate.as_index_tensor(labels, name)
    if (labels.dim() == 1 and labels.numel() % num_true == 0) or (labels.dim() == 2 and labels.shape[1] == num_true):
        return labels.reshape(-1, num_true)
    raise ValueError(f"{name} must be [batch, num_true={num_true}] (or 1-D with a multiple of num_true entries), "
                     f"got shape {tuple(labels.shape)}")


def _tf_loss(mode, weights, biases, labels, inputs, num_sampled, num_classes, num_true, sampled_values,
             remove_accidental_hits, seed):
    labels = _labels(labels, num_true)
    num_sampled = check_positive_int(num_sampled, "num_sampled")
    num_classes = check_positive_int(num_classes, "num_classes")
    # NCE labels each true column 1/num_true like TensorFlow (tensorflow#10267).
    true_label = 1.0 / labels.shape[1] if mode == NCE else 1.0
    if isinstance(weights, (list, tuple)):
        weights = torch.cat(list(weights), 0)
    if isinstance(biases, (list, tuple)):
        biases = torch.cat(list(biases), 0)
    weights = weights.to(inputs.dtype)
    biases = biases.to(inputs.dtype) if biases is not None else None
    if sampled_values is None:
        sampled_values = log_uniform_candidate_sampler(labels, num_true, num_sampled, True, num_classes, seed=seed)
    # TensorFlow masks only the last copy of a duplicated candidate and returns
    # the per-example losses in the inputs' dtype.
    options = SampledOptions(mode, num_sampled=num_sampled, num_classes=num_classes, true_label=true_label,
                             hit_mask=HIT_LAST_COPY if remove_accidental_hits else HIT_NONE, reduction="none")
    loss = _sampled_loss(options, input=inputs, weight=weights, target=labels, bias=biases,
                         sampled_values=sampled_values)
    return loss.to(inputs.dtype)


def sampled_softmax_loss(weights, biases, labels, inputs, num_sampled, num_classes, num_true=1, sampled_values=None,
                         remove_accidental_hits=True, seed=None, name="sampled_softmax_loss"):
    """``tf.nn.sampled_softmax_loss``: per-example [N] losses."""
    return _tf_loss(SOFTMAX, weights, biases, labels, inputs, num_sampled, num_classes, num_true, sampled_values,
                    remove_accidental_hits, seed)


def nce_loss(weights, biases, labels, inputs, num_sampled, num_classes, num_true=1, sampled_values=None,
             remove_accidental_hits=False, seed=None, name="nce_loss"):
    """``tf.nn.nce_loss``: per-example [N] losses, true columns labelled 1/num_true."""
    return _tf_loss(NCE, weights, biases, labels, inputs, num_sampled, num_classes, num_true, sampled_values,
                    remove_accidental_hits, seed)


def _sample(sampler, true_classes, num_true, num_sampled, unique, seed):
    true_classes = _labels(true_classes, num_true, "true_classes")
    return sampler.sample(true_classes, num_sampled, unique=unique,
                          generator=_generator(seed, true_classes.device))


def log_uniform_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max, seed=None, name=None):
    """``tf.random.log_uniform_candidate_sampler``."""
    return _sample(LogUniformSampler(range_max), true_classes, num_true, num_sampled, unique, seed)


def uniform_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max, seed=None, name=None):
    """``tf.random.uniform_candidate_sampler``."""
    return _sample(UniformSampler(range_max), true_classes, num_true, num_sampled, unique, seed)


def fixed_unigram_candidate_sampler(true_classes, num_true, num_sampled, unique, range_max, vocab_file="",
                                    distortion=1.0, num_reserved_ids=0, num_shards=1, shard=0, unigrams=(),
                                    seed=None, name=None):
    """``tf.random.fixed_unigram_candidate_sampler`` from ``unigrams`` (single shard)."""
    if vocab_file:
        raise NotImplementedError("vocab_file is not supported; pass the counts as unigrams")
    if num_shards != 1 or shard != 0:
        raise NotImplementedError("sharded unigram sampling (num_shards > 1) is not supported")
    if len(unigrams) == 0:
        raise ValueError("fixed_unigram_candidate_sampler needs unigrams")
    range_max = check_positive_int(range_max, "range_max")
    sampler = UnigramSampler(unigrams, distortion=distortion, num_reserved_ids=num_reserved_ids)
    if sampler.range_max != range_max:
        raise ValueError(
            f"range_max={range_max} must equal num_reserved_ids + len(unigrams) = {sampler.range_max}"
        )
    return _sample(sampler, true_classes, num_true, num_sampled, unique, seed)


def compute_accidental_hits(true_classes, sampled_candidates, num_true, seed=None, name=None):
    """``tf.nn.compute_accidental_hits``: ``(indices int32, ids int64, weights)`` of
    the (row, sampled position) pairs where a candidate equals a true class, with
    weight -FLT_MAX. Like TensorFlow, only the last position of a duplicated
    candidate is reported, once per true column that matches it."""
    true_classes = _labels(true_classes, num_true, "true_classes")
    sampled = _validate.as_index_tensor(sampled_candidates, "sampled_candidates")
    later = torch.triu(sampled.unsqueeze(1) == sampled.unsqueeze(0), diagonal=1).any(1)
    hits = (true_classes.unsqueeze(2) == sampled.view(1, 1, -1)) & ~later.view(1, 1, -1)  # [N, T, K]
    row, _, position = hits.nonzero(as_tuple=True)
    weights = torch.full(row.shape, -FLT_MAX, dtype=torch.float32, device=row.device)
    return row.to(torch.int32), position, weights
