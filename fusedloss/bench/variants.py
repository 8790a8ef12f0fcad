"""What runs for each case: the fused op, the reference, ``torch.compile`` of the
reference, public peers (GPU only) and, for linear CE, the bare-GEMM baseline.

A variant is rebuilt by name in every process (the CPU memory measurement runs
each variant in a fresh subprocess), so everything here is a pure function of
(case, device, dtype).  Unavailable variants carry a skip reason instead of a
function; they are reported as skipped, never as failures.
"""
import dataclasses
import importlib
from typing import Callable, Optional

import torch

from .cases import INFO_NCE_TEMPERATURE

KINDS = ("fused", "reference", "compile", "peer", "baseline")


@dataclasses.dataclass
class Variant:
    name: str
    kind: str                              # one of KINDS
    fn: Optional[Callable] = None          # inputs -> output to differentiate
    skip: Optional[str] = None             # why it cannot run here
    compare: bool = True                   # its loss/grads are checked against the reference
    grad_output: Optional[Callable] = None  # inputs -> upstream gradient for a non-scalar output


def _import(module):
    try:
        return importlib.import_module(module)
    except Exception as e:  # a peer that fails to import for any reason is just skipped
        return e


def _peer(name, module, device, build):
    """A peer variant: needs CUDA (all peers are Triton/CUDA) and an importable module."""
    if torch.device(device).type != "cuda":
        return Variant(name, "peer", skip="needs a CUDA device")
    mod = _import(module)
    if isinstance(mod, Exception):
        return Variant(name, "peer", skip=f"{module} not importable ({type(mod).__name__})")
    return Variant(name, "peer", fn=build(mod))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _cce(mod):
    return lambda x: mod.linear_cross_entropy(x["input"], x["weight"], x["target"])


def _liger(mod):
    loss = mod.LigerFusedLinearCrossEntropyLoss()
    # Liger's module takes the weight first.
    return lambda x: _first(loss(x["weight"], x["input"], x["target"]))


def _inf_cl(mod):
    # inf_cl takes the logit scale (1 / temperature) and returns per-row losses.
    return lambda x: mod.cal_inf_loss(x["query"], x["key"], scale=1.0 / INFO_NCE_TEMPERATURE).mean()


PEERS = {
    "linear_ce": [("cut-cross-entropy", "cut_cross_entropy", _cce),
                  ("liger-kernel", "liger_kernel.transformers", _liger)],
    "info_nce": [("inf-cl", "inf_cl", _inf_cl)],
}


def _gemm_baseline(x):
    # Forward X·Wᵀ; autograd.grad with an explicit upstream gradient then runs
    # exactly the two backward GEMMs dX = G·W and dW = Gᵀ·X.
    return torch.matmul(x["input"], x["weight"].t())


def _gemm_grad_output(x):
    # Made once (during the warm-up) and kept with the inputs, so neither the
    # timed backward nor the measured memory includes filling it.
    if "_grad_logits" not in x:
        n, v = x["input"].shape[0], x["weight"].shape[0]
        x["_grad_logits"] = torch.full((n, v), 1e-3, dtype=x["input"].dtype, device=x["input"].device)
    return x["_grad_logits"]


def build_variants(case, device, compile_reference=False):
    """All variants of ``case`` on ``device``, in report order."""
    fused, ref = case.fused_fn(), case.reference_fn()
    out = [
        Variant("fused", "fused", fn=lambda x: case.call(fused, x)),
        Variant("reference", "reference", fn=lambda x: case.call_reference(ref, x)),
    ]
    if compile_reference:
        compiled = torch.compile(ref)
        out.append(Variant("torch.compile(reference)", "compile", fn=lambda x: case.call_reference(compiled, x)))
    else:
        out.append(Variant("torch.compile(reference)", "compile",
                           skip="off (--compile on enables it; slow to compile on the CPU)"))
    out += [_peer(name, module, device, build) for name, module, build in PEERS.get(case.op, [])]
    if case.op == "linear_ce":
        out.append(Variant("bare GEMMs", "baseline", fn=_gemm_baseline, compare=False,
                           grad_output=_gemm_grad_output))
    return out
