"""Timing and peak memory of one variant: warm-up, then repeats, median times of
forward, backward and both; peak memory above the inputs.

CUDA: CUDA events for time, ``torch.cuda.max_memory_allocated`` after a reset
for memory.  CPU: wall clock, and peak RSS growth: the kernel's high-water mark
(VmHWM) is reset through /proc/self/clear_refs after the inputs exist and the
timed runs finished, so the reading is the growth caused by one more fwd+bwd.
On the CPU the runner calls this in a fresh subprocess per variant (see
``worker.py``) so one variant's allocations cannot hide another's.
"""
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from . import cases as cases_mod
from .variants import build_variants
from ..memory import empty_cache


def return_heap_to_os():
    """Make RSS track allocations: glibc keeps freed blocks in its heap (and its
    dynamic mmap threshold grows to 32 MiB as big blocks are freed), so a step
    that reuses them would show no growth.  Trim the heap, then fix the mmap
    threshold so every block >= 128 KiB is mapped fresh and returned on free.
    Called after the timed runs, which keep the allocator's normal behaviour."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class OutOfMemory(Exception):
    """A variant does not fit: raised on a CUDA OOM or a failed CPU allocation."""


def _proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssPeak:
    """Peak resident-set growth of the current process over a ``with`` block."""

    def __enter__(self):
        gc.collect()
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.reset = True
        except OSError:
            pass
        self.base = (_proc_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        hwm = _proc_status_kib("VmHWM") if self.reset else None
        if hwm is None:  # lifetime peak: exact only in a fresh process whose peak so far is ~its RSS
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak = max(0, hwm * 1024 - self.base)
        return False


class CudaPeak:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        return False


class _Clock:
    """Marks on the host (CPU) or CUDA events recorded on the stream (GPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def run_step(variant, inputs, leaves, clock=None):
    """One forward + backward; returns (output, grads, marks)."""
    marks = [clock.mark()] if clock else []
    out = variant.fn(inputs)
    if clock:
        marks.append(clock.mark())
    grad_out = variant.grad_output(inputs) if variant.grad_output else None
    # The sampled losses' floor multiplies the gathered candidates, not the weight itself.
    grads = torch.autograd.grad(out, leaves, grad_outputs=grad_out, allow_unused=variant.kind == "baseline")
    if clock:
        marks.append(clock.mark())
    return out, grads, marks


def measure_in_process(variant, inputs, leaves, device, repeat, warmup):
    """Times and peak memory of ``variant`` on ``inputs`` in this process.

    Returns (result dict, (loss, grads) of the measured step)."""
    device = torch.device(device)
    clock = _Clock(device)
    try:
        for _ in range(warmup):
            run_step(variant, inputs, leaves)
        all_marks = [run_step(variant, inputs, leaves, clock)[2] for _ in range(repeat)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            probe = CudaPeak(device)
        else:
            # Freed large buffers (tiles, gradients) stay in fusedloss's CPU
            # pool: unmap them so that the probed step maps its own again and
            # its peak counts them.
            empty_cache()
            return_heap_to_os()
            probe = RssPeak()
        # one more untimed step for the memory peak (and the outputs to compare)
        with probe:
            out, grads, _ = run_step(variant, inputs, leaves)
    except torch.OutOfMemoryError as e:
        raise OutOfMemory(str(e).splitlines()[0]) from None
    except RuntimeError as e:  # the CPU allocator reports a failed malloc as RuntimeError
        if "not enough memory" in str(e) or "DefaultCPUAllocator" in str(e):
            raise OutOfMemory(str(e).splitlines()[0]) from None
        raise
    fwd = [clock.elapsed_ms(m[0], m[1]) for m in all_marks]
    bwd = [clock.elapsed_ms(m[1], m[2]) for m in all_marks]
    full = [clock.elapsed_ms(m[0], m[2]) for m in all_marks]
    result = {
        "status": "ok",
        "fwd_ms": statistics.median(fwd),
        "bwd_ms": statistics.median(bwd),
        "full_ms": statistics.median(full),
        "full_ms_all": full,
        "peak_extra_bytes": int(probe.peak),
    }
    return result, (out.detach(), tuple(None if g is None else g.detach() for g in grads))


def measure_paired(variants, inputs, leaves, device, repeat, warmup):
    """Each later variant's time over the first's, from rounds of one step of
    each in one process: per variant the median of its per-round ratios
    (``{"ratios": {name: ratio}}``). Variants timed in separate processes can
    differ by 1.5x on a shared VM (each process runs at its own speed); steps
    taken side by side see the same machine."""
    device = torch.device(device)
    clock = _Clock(device)
    for _ in range(warmup):
        for v in variants:
            run_step(v, inputs, leaves)
    rounds = [[run_step(v, inputs, leaves, clock)[2] for v in variants] for _ in range(repeat)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = [[clock.elapsed_ms(m[0], m[2]) for m in r] for r in rounds]
    return {"status": "ok", "ratios": {v.name: statistics.median(t[i] / t[0] for t in times)
                                       for i, v in enumerate(variants) if i > 0}}


def worker_spec(op, shape, dtype, device, variant, repeat, warmup, seed, compile_reference, outputs_path,
                paired=None):
    return {"op": op, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "variant": variant, "repeat": repeat, "warmup": warmup, "seed": seed,
            "compile_reference": compile_reference, "outputs_path": outputs_path, "paired": paired}


def run_worker_spec(spec):
    """Body of the subprocess: build inputs, measure one variant (saving its
    outputs) or, with ``paired`` names, their time ratios (measure_paired)."""
    case = cases_mod.CASES[spec["op"]]
    dtype = getattr(torch, spec["dtype"])
    variants = {v.name: v for v in build_variants(case, spec["device"], spec["compile_reference"])}
    inputs = cases_mod.make_inputs(case, spec["shape"], dtype, spec["device"], spec["seed"])
    leaves = [inputs[n] for n in case.grad_names]
    if spec.get("paired"):
        return measure_paired([variants[n] for n in spec["paired"]], inputs, leaves, spec["device"], spec["repeat"],
                              spec["warmup"])
    variant = variants[spec["variant"]]
    try:
        result, (loss, grads) = measure_in_process(variant, inputs, leaves, spec["device"], spec["repeat"],
                                                   spec["warmup"])
    except OutOfMemory as e:
        return {"status": "oom", "reason": str(e)}
    if spec.get("outputs_path"):
        torch.save({"loss": loss.cpu(), "grads": [g.cpu() for g in grads]}, spec["outputs_path"])
    return result


def measure_in_subprocess(spec, timeout=None):
    """Runs ``run_worker_spec`` in a fresh interpreter; a killed child (the
    kernel's OOM killer) is reported as OOM."""
    env = dict(os.environ)
    # The child must import this same fusedloss (e.g. a source checkout).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH")] if p)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    try:
        proc = subprocess.run([sys.executable, "-m", "fusedloss.bench.worker", spec_path], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout} s"}
    finally:
        os.unlink(spec_path)
    if proc.returncode in (-9, 137):
        return {"status": "oom", "reason": "killed by the OS (out of memory)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "reason": f"worker exited {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])
