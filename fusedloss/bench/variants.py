"""What runs for each case: the fused op, the reference, ``torch.compile`` of the
reference, public peers (Triton ones on a GPU only) and, for linear CE, torch's
own chunked ``F.linear_cross_entropy``, and the bare-GEMM floor of every op.

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


def _peer(name, module, device, build, needs_cuda=True):
    """A peer variant: an importable module and, for Triton/CUDA-only peers, a CUDA device."""
    if needs_cuda and torch.device(device).type != "cuda":
        return Variant(name, "peer", skip="needs a CUDA device")
    mod = _import(module)
    if isinstance(mod, Exception):
        return Variant(name, "peer", skip=f"{module} not installed ({type(mod).__name__}); benchmarks/run installs it")
    return Variant(name, "peer", fn=build(mod))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _cce(impl):
    def build(mod):
        return lambda x: mod.linear_cross_entropy(x["input"], x["weight"], x["target"], impl=impl)
    return build


def _liger(mod):
    loss = mod.LigerFusedLinearCrossEntropyLoss()
    # Liger's module takes the weight first.
    return lambda x: _first(loss(x["weight"], x["input"], x["target"]))


def _torch_chunked_variant():
    """torch >= 2.14's own F.linear_cross_entropy, on its chunked path (given options)."""
    name = "torch F.linear_cross_entropy (chunked)"
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return Variant(name, "peer", skip="needs torch >= 2.14")
    options = torch.nn.LinearCrossEntropyOptions()
    return Variant(name, "peer", fn=lambda x: torch.nn.functional.linear_cross_entropy(
        x["input"], x["weight"], x["target"], options=options))


def _inf_cl(mod):
    # inf_cl takes the logit scale (1 / temperature) and returns per-row losses.
    return lambda x: mod.cal_inf_loss(x["query"], x["key"], scale=1.0 / INFO_NCE_TEMPERATURE).mean()


# (name, module, builder, needs CUDA). Cut Cross-Entropy's torch_compile impl
# materialises the [N, V] logits once and lets inductor fuse the softmax
# gradient: it runs on the CPU too.
PEERS = {
    "linear_ce": [("cut-cross-entropy (torch_compile)", "cut_cross_entropy", _cce("torch_compile"), False),
                  ("cut-cross-entropy (cce)", "cut_cross_entropy", _cce("cce"), True),
                  ("liger-kernel", "liger_kernel.transformers", _liger, True)],
    "info_nce": [("inf-cl", "inf_cl", _inf_cl, True)],
}


class _GemmFloor(torch.autograd.Function):
    """The three GEMMs of a step with no softmax: logits = R·Cᵀ, then dR = G·C
    and dC = Gᵀ·R (rows R: the hidden states / queries; columns C: the
    classifier, the gathered candidates or the keys), each into a buffer kept
    across calls (like the fused ops' kept tile: a fresh output each call
    would add ≈15 % of page faults to the floor on the CPU)."""

    @staticmethod
    def forward(ctx, rows, columns, buffers):
        ctx.save_for_backward(rows, columns)
        ctx.buffers = buffers
        return torch.mm(rows, columns.t(), out=buffers["logits"])

    @staticmethod
    def backward(ctx, grad_logits):
        rows, columns = ctx.saved_tensors
        buffers = ctx.buffers
        grad_rows = torch.mm(grad_logits, columns, out=buffers["grad_rows"])
        grad_columns = torch.mm(grad_logits.t(), rows, out=buffers["grad_columns"])
        return grad_rows, grad_columns if ctx.needs_input_grad[1] else None, None


def _gemm_floor(case):
    def buffers(x):
        # Made once (during the warm-up) and kept with the inputs, so neither
        # the timed steps nor the measured memory include allocating them.
        if "_gemm_buffers" not in x:
            rows, columns = case.gemm_operands(x)
            n, c = rows.shape[0], columns.shape[0]
            x["_gemm_buffers"] = {"rows": rows, "columns": columns, "logits": rows.new_empty(n, c),
                                  "grad_rows": torch.empty_like(rows), "grad_columns": torch.empty_like(columns),
                                  "grad_logits": rows.new_full((n, c), 1e-3)}
        return x["_gemm_buffers"]

    def run(x):
        b = buffers(x)
        return _GemmFloor.apply(b["rows"], b["columns"], b)

    return Variant("bare GEMMs", "baseline", fn=run, compare=False, grad_output=lambda x: buffers(x)["grad_logits"])


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
    out += [_peer(name, module, device, build, cuda) for name, module, build, cuda in PEERS.get(case.op, [])]
    if case.op == "linear_ce":
        out.append(_torch_chunked_variant())
    if case.gemm_operands is not None:
        out.append(_gemm_floor(case))
    return out
