"""fusedloss: large-vocabulary losses that never materialise the full logits."""
from ._extension import built_with_cuda
from .contrastive import ClipLoss, InfoNCELoss, NTXentLoss, clip_loss, info_nce_loss, nt_xent_loss
from .mnrl import MultipleNegativesRankingLoss, mnrl_loss
from .linear_ce import LinearCEOutput, LinearCrossEntropyLoss, linear_cross_entropy
from .memory import cpu_cache_bytes, empty_cache, set_cpu_cache_limit
from . import reference
from . import compat, samplers
from . import distributed
from .sampled import NCELoss, SampledSoftmaxLoss, nce_loss, sampled_softmax_loss
from .siglip import SigLipLoss, siglip_loss
from . import gradcache

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "InfoNCELoss",
    "NTXentLoss",
    "clip_loss",
    "info_nce_loss",
    "nt_xent_loss",
    "MultipleNegativesRankingLoss",
    "mnrl_loss",
    "LinearCEOutput",
    "LinearCrossEntropyLoss",
    "built_with_cuda",
    "linear_cross_entropy",
    "cpu_cache_bytes",
    "empty_cache",
    "set_cpu_cache_limit",
    "reference",
    "NCELoss",
    "SampledSoftmaxLoss",
    "compat",
    "distributed",
    "nce_loss",
    "sampled_softmax_loss",
    "samplers",
    "SigLipLoss",
    "siglip_loss",
    "gradcache",
]
