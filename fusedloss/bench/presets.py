"""Named shape sets.  ``cpu`` (the default on a CPU) takes a few minutes on 2
cores; ``gpu`` (the default on CUDA) holds the headline GPU shapes; the
others sweep one axis for the plots.  Entries are (op, shape, dtype or None)."""
import torch

bf16, f32 = torch.bfloat16, torch.float32


def _lce(n, d, v, dtype=None):
    return ("linear_ce", {"N": n, "D": d, "V": v}, dtype)


def _sampled(op, n, d, k, c, dtype=None):
    return (op, {"N": n, "D": d, "K": k, "C": c}, dtype)


def _pair(op, b, d, dtype=None):
    return (op, {"B": b, "D": d}, dtype)


CONTRASTIVE_OPS = ("info_nce", "nt_xent", "clip", "siglip")
SAMPLED_OPS = ("sampled_softmax", "nce")

PRESETS = {
    "cpu": (
        [_lce(2048, 512, v) for v in (8192, 32768)]
        + [_sampled(op, 2048, 256, 4096, c) for op in SAMPLED_OPS for c in (50_000, 200_000)]
        + [_pair(op, b, 256) for op in CONTRASTIVE_OPS for b in (2048, 8192)]
    ),
    "llm": [_lce(4096, 2048, v) for v in (32768, 65536, 131072)] + [_lce(8192, 4096, 128256)],
    "recsys": [_sampled(op, 4096, 128, 8192, c) for op in SAMPLED_OPS for c in (100_000, 300_000, 1_000_000)]
    + [_lce(4096, 128, c) for c in (100_000, 300_000)],
    "contrastive": [_pair(op, b, 256) for op in CONTRASTIVE_OPS for b in (2048, 8192, 32768)]
    + [_pair(op, b, 256) for op in ("info_nce_ids", "mnrl") for b in (2048, 8192)],
    # The headline: the references do not fit, the fused ops do.
    "million": [_sampled(op, 8192, 256, 8192, 1_000_000) for op in SAMPLED_OPS] + [_lce(2048, 256, 1_000_000)],
    "gpu": (
        [_lce(8192, 4096, 128256, bf16), _lce(8192, 2304, 256000, bf16)]
        + [_sampled(op, 8192, 256, 8192, 1_000_000, f32) for op in SAMPLED_OPS]
        + [_pair(op, 65536, 512, bf16) for op in CONTRASTIVE_OPS]
    ),
}


def default_preset(device):
    return "gpu" if torch.device(device).type == "cuda" else "cpu"
