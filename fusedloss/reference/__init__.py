"""Plain-PyTorch references of every fusedloss op (they materialise the full
logits / similarity matrices): the tests' oracle and the benchmarks' baseline."""
from .contrastive import clip_loss, info_nce_loss, nt_xent_loss
from .linear_ce import linear_cross_entropy
from .mnrl import mnrl_loss
from .sampled import nce_loss, sampled_logits, sampled_softmax_loss
from .siglip import siglip_loss

__all__ = [
    "clip_loss",
    "info_nce_loss",
    "linear_cross_entropy",
    "mnrl_loss",
    "nce_loss",
    "nt_xent_loss",
    "sampled_logits",
    "sampled_softmax_loss",
    "siglip_loss",
]
