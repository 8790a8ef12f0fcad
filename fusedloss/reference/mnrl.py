"""Plain-PyTorch MultipleNegativesRankingLoss (sentence-transformers 6.2's
``compute_loss_from_embeddings``, one device): it builds every [B, C] block of
similarities. The semantics fusedloss.mnrl_loss must reproduce; the tests'
oracle where sentence-transformers is not installed."""
import torch
import torch.nn.functional as F

from .. import _common, _validate
from .contrastive import _logits


def mnrl_loss(query, positive, negatives=None, *, scale=20.0, directions=("query_to_doc",), partition_mode="joint",
              hardness_mode=None, hardness_strength=0.0, normalize=True, reduction="mean"):
    _validate.check_reduction(reduction)
    negatives = [] if negatives is None else [negatives] if isinstance(negatives, torch.Tensor) else list(negatives)
    if normalize:
        query, positive = F.normalize(query, dim=-1), F.normalize(positive, dim=-1)
        negatives = [F.normalize(n, dim=-1) for n in negatives]
    docs = torch.cat([positive, *negatives])
    batch = query.shape[0]
    eye = torch.eye(batch, dtype=torch.bool, device=query.device)
    own = eye.repeat(1, 1 + len(negatives))  # the documents of each row's query
    similarity = _logits(query, docs, 1.0)
    blocks = [similarity * scale]
    if hardness_mode is not None and hardness_strength > 0:
        is_positive = torch.zeros_like(own)
        is_positive[:, :batch] = eye
        penalized = {"hard_negatives": own & ~is_positive, "in_batch_negatives": ~own,
                     "all_negatives": ~is_positive}[hardness_mode]
        blocks[0] = blocks[0] + hardness_strength * similarity.detach() * penalized
    if "query_to_query" in directions:
        blocks.append((_logits(query, query, scale)).masked_fill(eye, float("-inf")))
    if "doc_to_query" in directions:
        blocks.append(_logits(positive, query, scale))
    if "doc_to_doc" in directions:
        blocks.append(_logits(positive, docs, scale).masked_fill(own, float("-inf")))
    rows = torch.arange(batch, device=query.device)
    positive_logit = blocks[0][rows, rows]
    if partition_mode == "joint":
        lse = torch.logsumexp(torch.cat(blocks, dim=1), dim=1)
    else:
        lse = torch.stack([torch.logsumexp(b, dim=1) for b in blocks]).mean(0)
    loss = lse - positive_logit
    return _common.reduce_rows(loss, None, reduction, loss.shape)
