"""Runs every (op, shape, dtype) row: each variant's times and peak memory, and
the max abs difference of its loss and gradients against the reference."""
import dataclasses
import os
import sys
import tempfile
import time
from typing import List, Optional

import torch

from . import cases as cases_mod
from .measure import OutOfMemory, measure_in_process, measure_in_subprocess, measure_paired, worker_spec
from .variants import build_variants

# Relative tolerance (max |a - b| / max |reference|) above which a variant's loss
# or gradients are flagged as WRONG.  Low precision is loose because the
# reference itself rounds its logits to bf16/fp16 while the fused op keeps fp32.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass
class Config:
    shapes: List[tuple]                 # (op, shape dict, dtype or None)
    device: str = "cpu"
    dtype: Optional[torch.dtype] = None  # overrides every shape's dtype
    repeat: int = 3
    warmup: int = 1
    seed: int = 0
    compile_reference: bool = False
    isolate: bool = True                # CPU: one fresh subprocess per variant
    ram_budget: Optional[int] = None    # CPU: bytes a variant may need before it is called OOM
    progress: bool = True
    subprocess_timeout: Optional[float] = None


def available_ram():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_ram_budget(fraction=0.8):
    ram = available_ram()
    return int(ram * fraction) if ram else None


def max_abs_diff(a, b):
    # fp32 is exact for bf16/fp16 operands and halves the temporaries of fp64 on large GPU gradients
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return float((a.to(acc) - b.to(acc)).abs().max()) if a.numel() else 0.0


def compare(outputs, ref_outputs, dtype):
    """Max abs difference of loss and grads vs the reference, and whether it is
    within the dtype's tolerance (relative to the largest reference value)."""
    loss, grads = outputs
    rloss, rgrads = ref_outputs
    tol = TOLERANCE.get(dtype, 1e-4)
    diffs = {"loss_diff": max_abs_diff(loss, rloss)}
    ok = diffs["loss_diff"] <= tol * max(1.0, float(rloss.abs().max()))
    grad_diff = 0.0
    for g, rg in zip(grads, rgrads):
        d = max_abs_diff(g, rg)
        grad_diff = max(grad_diff, d)
        ok &= d <= tol * max(float(rg.abs().max()), 1e-30)
    diffs["grad_diff"] = grad_diff
    diffs["within_tolerance"] = bool(ok)
    diffs["tolerance"] = tol
    return diffs


class _Progress:
    def __init__(self, total, enabled):
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, text):
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        line = f"[{self.done}/{self.total} {int(elapsed) // 60}:{int(elapsed) % 60:02d}] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:150])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _oom_reason(case, kind, shape, dtype, device):
    need = case.estimate_bytes(kind, shape, dtype, device)
    return f"OOM (needs ~{need / cases_mod.GiB:.1f} GiB)"


def _run_row_subprocess(case, shape, dtype, variants, cfg, progress, label):
    """CPU: each variant in its own process; outputs come back through files."""
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory(prefix="fusedloss-bench-") as tmp:
        for v in variants:
            progress.step(f"{label} · {v.name}")
            if v.skip:
                results[v.name] = {"status": "skipped", "reason": v.skip}
                continue
            need = case.estimate_bytes(v.kind, shape, dtype, cfg.device)
            if cfg.ram_budget is not None and need > cfg.ram_budget:
                results[v.name] = {"status": "oom", "reason": _oom_reason(case, v.kind, shape, dtype, cfg.device),
                                   "estimated_bytes": need}
                continue
            path = os.path.join(tmp, f"{len(results)}.pt") if v.compare else None
            spec = worker_spec(case.op, shape, dtype, cfg.device, v.name, cfg.repeat, cfg.warmup, cfg.seed,
                               cfg.compile_reference, path)
            res = measure_in_subprocess(spec, cfg.subprocess_timeout)
            if res["status"] == "oom":
                res["reason"] = f"{_oom_reason(case, v.kind, shape, dtype, cfg.device)}: {res.get('reason', '')}"
            results[v.name] = res
            if res["status"] == "ok" and path:
                outputs[v.name] = _load_outputs(path)
    return results, outputs


def _load_outputs(path):
    saved = torch.load(path)
    return saved["loss"], tuple(saved["grads"])


def _run_row_in_process(case, shape, dtype, variants, cfg, progress, label):
    """CUDA (or CPU with isolate=False): inputs built once, variants one after
    another; the reference runs first so others are compared as they finish."""
    results, outputs = {}, {}
    inputs = cases_mod.make_inputs(case, shape, dtype, cfg.device, cfg.seed)
    leaves = [inputs[n] for n in case.grad_names]
    order = sorted(variants, key=lambda v: v.kind != "reference")
    for v in order:
        progress.step(f"{label} · {v.name}")
        if v.skip:
            results[v.name] = {"status": "skipped", "reason": v.skip}
            continue
        try:
            res, out = measure_in_process(v, inputs, leaves, cfg.device, cfg.repeat, cfg.warmup)
        except OutOfMemory as e:
            res, out = {"status": "oom", "reason": f"{_oom_reason(case, v.kind, shape, dtype, cfg.device)}: {e}"}, None
        except Exception as e:  # one broken variant must not stop the bench
            res, out = {"status": "error", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}, None
        results[v.name] = res
        if out is not None and v.compare:
            outputs[v.name] = out if v.kind == "reference" else _compare_now(out, outputs.get("reference"), res, dtype)
        out = None  # free this variant's gradients before the next one runs
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.empty_cache()
    return {v.name: results[v.name] for v in variants}, outputs


def _paired_ratios(case, shape, dtype, results, cfg, isolate, progress, label):
    """The reference's and the bare GEMMs' times over the fused step's, from
    rounds of alternating steps in one process (measure_paired), for those of
    them that ran; {} when the fused op did not."""
    progress.step(f"{label} · fused, reference and bare GEMMs, alternating")  # counted once per row
    if results.get("fused", {}).get("status") != "ok":
        return {}
    names, need = ["fused"], case.estimate_bytes("fused", shape, dtype, cfg.device)
    for name, kind in (("bare GEMMs", "baseline"), ("reference", "reference")):
        if results.get(name, {}).get("status") != "ok":
            continue
        need += case.estimate_bytes(kind, shape, dtype, cfg.device)
        if cfg.ram_budget is None or need <= cfg.ram_budget:  # all of them live in one process
            names.append(name)
    if len(names) == 1:
        return {}
    if isolate:
        spec = worker_spec(case.op, shape, dtype, cfg.device, None, cfg.repeat, cfg.warmup, cfg.seed,
                           cfg.compile_reference, None, paired=names)
        res = measure_in_subprocess(spec, cfg.subprocess_timeout)
    else:
        variants = {v.name: v for v in build_variants(case, cfg.device, cfg.compile_reference)}
        inputs = cases_mod.make_inputs(case, shape, dtype, cfg.device, cfg.seed)
        res = measure_paired([variants[n] for n in names], inputs, [inputs[n] for n in case.grad_names],
                             cfg.device, cfg.repeat, cfg.warmup)
    return res.get("ratios", {}) if res.get("status") == "ok" else {}


def _compare_now(out, ref_out, res, dtype):
    """Compare right away so large GPU gradients are not kept for every variant."""
    if ref_out is not None:
        res.update(compare(out, ref_out, dtype))
    return None


def _finish_row(row, case, shape, outputs, dtype):
    res = row["variants"]
    ref_out = outputs.get("reference")
    if ref_out is not None:
        for name, out in outputs.items():
            if name != "reference" and out is not None:
                res[name].update(compare(out, ref_out, dtype))
    flops = case.flops(shape) if case.flops else None
    for r in res.values():
        if r.get("status") == "ok" and flops:
            r["tflops"] = flops / (r["full_ms"] * 1e-3) / 1e12
    fused, ref = res.get("fused", {}), res.get("reference", {})
    if fused.get("status") == "ok" and ref.get("status") == "ok":
        row["speedup_separate"] = ref["full_ms"] / fused["full_ms"]
        row["speedup"] = row.get("speedup_paired", row["speedup_separate"])
        if fused["peak_extra_bytes"] > 0:  # a tiny fused step can stay within already-mapped memory
            row["memory_ratio"] = ref["peak_extra_bytes"] / fused["peak_extra_bytes"]
    gemm = res.get("bare GEMMs", {})
    if fused.get("status") == "ok" and gemm.get("status") == "ok":
        row["fused_over_gemm_separate"] = fused["full_ms"] / gemm["full_ms"]
        row["fused_over_gemm"] = row.get("fused_over_gemm_paired", row["fused_over_gemm_separate"])
    row["flagged"] = any(r.get("within_tolerance") is False for r in res.values()) or fused.get("status") == "error"


def row_dtype(cfg, entry_dtype):
    return cfg.dtype or entry_dtype or torch.float32


def run(cfg):
    """Runs every row of ``cfg``; returns the list of row dicts (JSON-able)."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events are recorded on the current device's stream
    isolate = cfg.isolate and device.type == "cpu"
    plan = []
    for op, shape, entry_dtype in cfg.shapes:
        case = cases_mod.CASES[op]
        plan.append((case, shape, row_dtype(cfg, entry_dtype), build_variants(case, cfg.device, cfg.compile_reference)))
    progress = _Progress(sum(len(p[3]) + 1 for p in plan), cfg.progress)
    rows = []
    for case, shape, dtype, variants in plan:
        label = f"{case.op} {case.shape_str(shape)} {str(dtype).replace('torch.', '')}"
        row = {"op": case.op, "function": f"fusedloss.{case.func}", "shape": dict(shape),
               "shape_str": case.shape_str(shape), "size_dim": case.size_dim, "size": shape[case.size_dim],
               "dtype": str(dtype).replace("torch.", ""), "device": str(device),
               "flop_convention": "6NDV (fwd 2NDV + bwd 4NDV)" if case.flops else None,
               "fused_path": case.path(shape, dtype, cfg.device) if case.path else None}
        row["inputs_bytes"] = cases_mod.input_bytes(cases_mod.make_inputs(case, shape, dtype, "meta"))
        runner = _run_row_subprocess if isolate else _run_row_in_process
        results, outputs = runner(case, shape, dtype, variants, cfg, progress, label)
        paired = _paired_ratios(case, shape, dtype, results, cfg, isolate, progress, label)
        if "reference" in paired:
            row["speedup_paired"] = paired["reference"]
        if "bare GEMMs" in paired:
            row["fused_over_gemm_paired"] = 1.0 / paired["bare GEMMs"]
        row["status"] = "ok"
        row["variants"] = results
        _finish_row(row, case, shape, outputs, dtype)
        rows.append(row)
    progress.close()
    return rows
