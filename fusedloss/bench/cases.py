"""The benchmarked ops: one small adapter ("case") per fusedloss function.

A case knows how to build deterministic inputs for a shape, how to call the
fused function and its same-named reference in ``fusedloss.reference`` on those
inputs, which inputs get gradients, and roughly how much memory the reference
needs (used on the CPU to report OOM instead of swapping the machine to death).
"""
import dataclasses
import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch

import fusedloss

MiB = 1 << 20
GiB = 1 << 30

# Workspace the fused ops are designed around (see csrc/README.md); the fused
# estimate is generous so the CPU OOM check never rejects a fused run that fits.
_FUSED_WORKSPACE = {"cpu": 32 * MiB, "cuda": 512 * MiB}


def elt_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class Case:
    op: str                 # bench name, e.g. "linear_ce"
    func: str               # function name in fusedloss and fusedloss.reference
    dims: Tuple[str, ...]   # shape dimension names, e.g. ("N", "D", "V")
    size_dim: str           # the x axis of the plot
    make_inputs: Callable   # (shape, dtype, device, generator) -> dict of tensors
    call: Callable          # (fused loss function, inputs) -> scalar loss
    grad_names: Tuple[str, ...]
    logits_elems: Callable  # shape -> number of elements of the reference's logits/similarities
    logits_copies: int = 3  # fp32 [logits]-sized buffers the reference keeps alive (logits, softmax, grad)
    flops: Optional[Callable] = None  # shape -> useful fwd+bwd FLOPs (6NDV convention for linear CE)
    ref_call: Optional[Callable] = None  # (reference function, inputs) -> loss, when it differs from call
    # inputs -> (rows [R, D], columns [C, D]) of the logits GEMM: the bare-GEMM floor's operands
    gemm_operands: Optional[Callable] = None
    # (shape, dtype, device) -> the algorithm the fused op runs there (see fused_path)
    path: Optional[Callable] = None

    def call_reference(self, fn, inputs):
        return (self.ref_call or self.call)(fn, inputs)

    def fused_fn(self):
        return getattr(fusedloss, self.func)

    def reference_fn(self):
        return getattr(fusedloss.reference, self.func)

    def shape_str(self, shape):
        return " ".join(f"{d}={_fmt_count(shape[d])}" for d in self.dims)

    def grad_bytes(self, shape, dtype):
        """Bytes of the gradients every variant must return (the memory floor)."""
        inputs = self.make_inputs(shape, dtype, "meta", None)
        return sum(inputs[n].numel() * inputs[n].element_size() for n in self.grad_names)

    def estimate_bytes(self, kind, shape, dtype, device):
        """Rough peak memory above the inputs of one fwd+bwd of a variant kind."""
        grads = self.grad_bytes(shape, dtype)
        if kind in ("fused", "peer"):
            return grads + 3 * _FUSED_WORKSPACE.get(torch.device(device).type, 512 * MiB)
        if kind == "baseline":  # bare GEMMs: logits + their upstream gradient in the operand dtype
            return grads + 2 * self.logits_elems(shape) * elt_size(dtype)
        # reference / compiled reference: fp32 logits, softmax and their grad, plus
        # a low-precision copy of the logits and of their grad for bf16/fp16
        per = 4 * self.logits_copies + (2 * elt_size(dtype) if elt_size(dtype) < 4 else 0)
        return grads + per * self.logits_elems(shape)


def _fmt_count(n):
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 10_000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def _randn(shape, dtype, device, gen, scale=1.0):
    if str(device) == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    t = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
    return (t * scale).to(device=device, dtype=dtype)


def _randint(high, shape, device, gen):
    if str(device) == "meta":
        return torch.empty(shape, dtype=torch.long, device="meta")
    return torch.randint(0, high, shape, generator=gen, device=gen.device).to(device)


def _unit_rows(shape, dtype, device, gen):
    t = _randn(shape, torch.float32, "meta" if str(device) == "meta" else gen.device, gen)
    if str(device) != "meta":
        t = torch.nn.functional.normalize(t, dim=-1)
    return t.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- linear CE
def _linear_ce_inputs(s, dtype, device, gen):
    return {
        "input": _randn((s["N"], s["D"]), dtype, device, gen),
        "weight": _randn((s["V"], s["D"]), dtype, device, gen, scale=s["D"] ** -0.5),
        "target": _randint(s["V"], (s["N"],), device, gen),
    }


# ---------------------------------------------------------- sampled softmax / NCE
def log_uniform_sampled_values(target, num_sampled, num_classes, generator=None):
    """Draw ``num_sampled`` classes from the log-uniform (Zipfian) proposal with
    replacement and return TF's ``(sampled [K], true_expected_count [N, 1],
    sampled_expected_count [K])``, so the fused op and the reference see
    identical samples.  P(k) = log((k + 2) / (k + 1)) / log(C + 1); with
    replacement the expected count of k among K draws is K * P(k)."""
    device = target.device
    u = torch.rand(num_sampled, generator=generator, device=generator.device if generator else device,
                   dtype=torch.float64).to(device)
    sampled = (torch.exp(u * math.log(num_classes + 1)).floor().long() - 1).clamp_(0, num_classes - 1)

    def expected(k):
        k = k.double()
        return (num_sampled * torch.log1p(1.0 / (k + 1)) / math.log(num_classes + 1)).float()

    return sampled, expected(target.reshape(-1, 1)), expected(sampled)


def _sampled_inputs(s, dtype, device, gen):
    inputs = {
        "input": _randn((s["N"], s["D"]), dtype, device, gen),
        "weight": _randn((s["C"], s["D"]), dtype, device, gen, scale=s["D"] ** -0.5),
        "target": _randint(s["C"], (s["N"],), device, gen),
    }
    if str(device) != "meta":
        values = log_uniform_sampled_values(inputs["target"], s["K"], s["C"], gen)
        inputs["sampled_values"] = tuple(v.to(device) for v in values)
    inputs["num_sampled"] = s["K"]
    inputs["num_classes"] = s["C"]
    return inputs


def _sampled_call(fn, x):
    return fn(x["input"], x["weight"], x["target"], x["num_sampled"], num_classes=x["num_classes"],
              sampled_values=x["sampled_values"])


def _sampled_ref_call(fn, x):
    # The references take the candidates positionally (they never sample).
    return fn(x["input"], x["weight"], x["target"], x["sampled_values"])


# --------------------------------------------------------------- contrastive
def _pair_inputs(s, dtype, device, gen):
    return {"query": _unit_rows((s["B"], s["D"]), dtype, device, gen),
            "key": _unit_rows((s["B"], s["D"]), dtype, device, gen)}


def _clip_inputs(s, dtype, device, gen):
    x = _pair_inputs(s, dtype, device, gen)
    # the multiplier (already exponentiated), at CLIP's initial value 1 / 0.07
    scale = torch.empty((), device="meta") if str(device) == "meta" else torch.tensor(1 / 0.07)
    return {"image": x["query"], "text": x["key"], "logit_scale": scale.to(device=device, dtype=torch.float32)}


INFO_NCE_TEMPERATURE = 0.07


def _sampled_gemm_operands(x):
    # The candidates' weight rows, gathered once (outside the timed floor).
    return x["input"], x["weight"].detach().index_select(0, x["sampled_values"][0])


def fused_path(device, plan_block_rows, rows, *, whole_tile_only=False):
    """The algorithm a fused op runs for a reduced, differentiated loss:
    ``plan_block_rows(cuda)`` is the op's own block sizing (0: the recompute pair)."""
    from fusedloss import _common

    cuda = torch.device(device).type == "cuda"
    if cuda and os.environ.get(_common.CUDA_SINGLE_PASS_ENV, "0") != "1":
        return "recompute (CUDA single pass off)"
    block = plan_block_rows(cuda)
    if block == 0 or (whole_tile_only and block < rows):
        return "recompute"
    return "single pass" if block >= rows else f"single pass, {block}-row blocks"


def _single_pass_block_rows(rows, columns, per_pass_bytes=0):
    from fusedloss._extension import C

    return lambda cuda: C.single_pass_block_rows(rows, columns, 0, 0, per_pass_bytes, cuda)


def _half(dtype):
    return elt_size(dtype) < 4


def _linear_ce_path(s, dtype, device):
    per_pass = 4 * s["V"] * s["D"] if _half(dtype) else 0
    return fused_path(device, _single_pass_block_rows(s["N"], s["V"], per_pass), s["N"])


def _sampled_path(s, dtype, device):
    from fusedloss._extension import C

    # bf16/fp16 inputs are GEMM operands as they are on CUDA only (gemm.h).
    plan = lambda cuda: C.sampled_single_pass_block_rows(s["N"], 1, s["K"], s["D"], _half(dtype) and cuda, cuda)
    return fused_path(device, plan, s["N"])


def _pair_path(whole_tile_only):
    return lambda s, dtype, device: fused_path(device, _single_pass_block_rows(s["B"], s["B"]), s["B"],
                                               whole_tile_only=whole_tile_only)


def _ids_inputs(s, dtype, device, gen):
    # Popular items recur in a big batch: ids drawn from B / 4 of them, so
    # each key shares its id with about 4 others (false negatives to mask).
    x = _pair_inputs(s, dtype, device, gen)
    x["key_ids"] = _randint(max(s["B"] // 4, 1), (s["B"],), device, gen)
    return x


def _mnrl_inputs(s, dtype, device, gen):
    # (anchor, positive, hard negative) triplets, sentence-transformers' usual batch.
    x = _pair_inputs(s, dtype, device, gen)
    return {"query": x["query"], "positive": x["key"], "negatives": _unit_rows((s["B"], s["D"]), dtype, device, gen)}


def _mnrl_path(s, dtype, device):
    # The default direction is InfoNCE over the positives and the hard negatives.
    return fused_path(device, _single_pass_block_rows(s["B"], 2 * s["B"]), s["B"])


def _scalar(value, device):
    t = torch.empty((), device="meta") if str(device) == "meta" else torch.tensor(value)
    return t.to(device=device, dtype=torch.float32)


def _siglip_inputs(s, dtype, device, gen):
    # SigLIP's initial multiplier (already exponentiated) and bias, both learnt.
    x = _pair_inputs(s, dtype, device, gen)
    return {"image": x["query"], "text": x["key"], "logit_scale": _scalar(10.0, device),
            "logit_bias": _scalar(-10.0, device)}


def _linear_flops(s):
    return 6.0 * s["N"] * s["D"] * s["V"]


CASES: Dict[str, Case] = {c.op: c for c in [
    Case("linear_ce", "linear_cross_entropy", ("N", "D", "V"), "V", _linear_ce_inputs,
         lambda fn, x: fn(x["input"], x["weight"], x["target"]),
         ("input", "weight"), lambda s: s["N"] * s["V"], flops=_linear_flops,
         gemm_operands=lambda x: (x["input"], x["weight"]), path=_linear_ce_path),
    Case("sampled_softmax", "sampled_softmax_loss", ("N", "D", "K", "C"), "C", _sampled_inputs,
         _sampled_call, ("input", "weight"), lambda s: s["N"] * (s["K"] + 1), ref_call=_sampled_ref_call,
         gemm_operands=_sampled_gemm_operands, path=_sampled_path),
    Case("nce", "nce_loss", ("N", "D", "K", "C"), "C", _sampled_inputs,
         _sampled_call, ("input", "weight"), lambda s: s["N"] * (s["K"] + 1), ref_call=_sampled_ref_call,
         gemm_operands=_sampled_gemm_operands, path=_sampled_path),
    Case("info_nce", "info_nce_loss", ("B", "D"), "B", _pair_inputs,
         lambda fn, x: fn(x["query"], x["key"], temperature=INFO_NCE_TEMPERATURE),
         ("query", "key"), lambda s: s["B"] * s["B"], gemm_operands=lambda x: (x["query"], x["key"]),
         path=_pair_path(False)),
    Case("info_nce_ids", "info_nce_loss", ("B", "D"), "B", _ids_inputs,
         lambda fn, x: fn(x["query"], x["key"], temperature=INFO_NCE_TEMPERATURE, key_ids=x["key_ids"]),
         ("query", "key"), lambda s: s["B"] * s["B"], gemm_operands=lambda x: (x["query"], x["key"]),
         path=_pair_path(False)),
    Case("mnrl", "mnrl_loss", ("B", "D"), "B", _mnrl_inputs,
         lambda fn, x: fn(x["query"], x["positive"], x["negatives"]),
         ("query", "positive", "negatives"), lambda s: 2 * s["B"] * s["B"],
         gemm_operands=lambda x: (x["query"], torch.cat([x["positive"], x["negatives"]]).detach()),
         path=_mnrl_path),
    Case("nt_xent", "nt_xent_loss", ("B", "D"), "B",
         lambda s, dtype, device, gen: {"hidden": _unit_rows((s["B"], s["D"]), dtype, device, gen)},
         lambda fn, x: fn(x["hidden"]), ("hidden",), lambda s: s["B"] * s["B"],
         gemm_operands=lambda x: (x["hidden"], x["hidden"]), path=_pair_path(False)),
    Case("clip", "clip_loss", ("B", "D"), "B", _clip_inputs,
         lambda fn, x: fn(x["image"], x["text"], x["logit_scale"]),
         ("image", "text"), lambda s: s["B"] * s["B"], logits_copies=5,
         gemm_operands=lambda x: (x["image"], x["text"]), path=_pair_path(True)),
    Case("siglip", "siglip_loss", ("B", "D"), "B", _siglip_inputs,
         lambda fn, x: fn(x["image"], x["text"], x["logit_scale"], x["logit_bias"]),
         ("image", "text", "logit_scale", "logit_bias"), lambda s: s["B"] * s["B"], logits_copies=6,
         gemm_operands=lambda x: (x["image"], x["text"]), path=lambda s, dtype, device: "single pass, column tiles"),
]}

ALIASES = {}
for _case in CASES.values():  # a function benchmarked twice (info_nce_ids) aliases its first case
    ALIASES.setdefault(_case.func, _case.op)
ALIASES.update({"linear_cross_entropy": "linear_ce", "sampled": "sampled_softmax", "infonce": "info_nce",
                "ntxent": "nt_xent"})


def resolve_op(name):
    name = name.strip()
    op = ALIASES.get(name, name)
    if op not in CASES:
        raise ValueError(f"unknown op {name!r}; choose from {', '.join(CASES)}")
    return op


def make_inputs(case, shape, dtype, device, seed=0):
    """Deterministic inputs (same seed -> same tensors in every process), with
    requires_grad set on the differentiated ones."""
    device = torch.device(device)
    gen = None
    if device.type != "meta":
        gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
        gen.manual_seed(seed)
    inputs = case.make_inputs(shape, dtype, device, gen)
    for name in case.grad_names:
        inputs[name].requires_grad_(True)
    return inputs


def input_bytes(inputs):
    total = 0
    for v in inputs.values():
        for t in (v if isinstance(v, tuple) else (v,)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
