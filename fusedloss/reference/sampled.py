"""Plain-PyTorch sampled softmax / NCE: gathers the candidate rows and builds
the [N, num_true + K] logits, straight from the semantics (TensorFlow's
``_compute_sampled_logits``). The test oracle and the benchmarks' baseline.

Candidates are always explicit: ``sampled_values`` is TensorFlow's triple
``(sampled [K] or [N, K], true_expected_count [N, T] or [N, 1],
sampled_expected_count like sampled)``. Masked (accidental-hit) columns are
removed with a mask rather than TensorFlow's -FLT_MAX offset, which gives the
same fp32 result and stays finite in bf16/fp16.
"""
import torch

from .. import _common, _validate


def sampled_logits(input, weight, target, sampled_values, bias=None, *, remove_accidental_hits=True,
                   subtract_log_q=True, tf_hit_masking=False):
    """Returns ``(logits [N, T+K] fp32/fp64, mask [N, T+K] bool of removed columns, num_true)``."""
    true_classes = target.unsqueeze(1) if target.dim() == 1 else target
    rows, num_true = true_classes.shape
    sampled, true_count, sampled_count = sampled_values
    per_row = sampled.dim() == 2
    true_w = weight[true_classes]  # [N, T, D]
    true_logits = torch.einsum("nd,ntd->nt", input, true_w)
    if per_row:
        sampled_logits_ = torch.einsum("nd,nkd->nk", input, weight[sampled])
    else:
        sampled_logits_ = input @ weight[sampled].T
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    true_logits, sampled_logits_ = true_logits.to(acc), sampled_logits_.to(acc)
    if bias is not None:
        true_logits = true_logits + bias[true_classes].to(acc)
        sampled_logits_ = sampled_logits_ + bias[sampled].to(acc)
    if subtract_log_q:
        true_logits = true_logits - torch.log(true_count.to(acc)).expand(rows, num_true)
        sampled_logits_ = sampled_logits_ - torch.log(sampled_count.to(acc))
    cand = sampled if per_row else sampled.unsqueeze(0).expand(rows, -1)
    hits = (cand.unsqueeze(2) == true_classes.unsqueeze(1)).any(2)  # [N, K]
    if tf_hit_masking:
        # TensorFlow's hit table maps id -> last position: only that copy is masked.
        later = torch.triu(sampled.unsqueeze(1) == sampled.unsqueeze(0), diagonal=1).any(1)
        hits = hits & ~later.unsqueeze(0)
    if not remove_accidental_hits:
        hits = torch.zeros_like(hits)
    logits = torch.cat([true_logits, sampled_logits_], 1)
    mask = torch.cat([torch.zeros_like(true_logits, dtype=torch.bool), hits], 1)
    return logits, mask, num_true


def sampled_softmax_loss(input, weight, target, sampled_values, bias=None, *, remove_accidental_hits=True,
                         subtract_log_q=True, label_smoothing=0.0, reduction="mean", tf_hit_masking=False):
    _validate.check_reduction(reduction)
    logits, mask, num_true = sampled_logits(input, weight, target, sampled_values, bias,
                                            remove_accidental_hits=remove_accidental_hits,
                                            subtract_log_q=subtract_log_q, tf_hit_masking=tf_hit_masking)
    logits = logits.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(logits, 1)
    true_sum = logits[:, :num_true].sum(1)
    rows = lse - (1.0 - label_smoothing) * true_sum / num_true
    if label_smoothing:
        unmasked = (~mask).sum(1).to(logits.dtype)
        rows = rows - label_smoothing * logits.masked_fill(mask, 0.0).sum(1) / unmasked
    return _common.reduce_rows(rows, None, reduction, rows.shape)


def nce_loss(input, weight, target, sampled_values, bias=None, *, remove_accidental_hits=False, subtract_log_q=True,
             reduction="mean", true_label=1.0, tf_hit_masking=False):
    _validate.check_reduction(reduction)
    logits, mask, num_true = sampled_logits(input, weight, target, sampled_values, bias,
                                            remove_accidental_hits=remove_accidental_hits,
                                            subtract_log_q=subtract_log_q, tf_hit_masking=tf_hit_masking)
    labels = torch.zeros_like(logits)
    labels[:, :num_true] = true_label
    terms = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    rows = terms.masked_fill(mask, 0.0).sum(1)
    return _common.reduce_rows(rows, None, reduction, rows.shape)
