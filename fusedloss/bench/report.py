"""The printed tables and the machine-readable JSON."""
import datetime
import os
import platform
import subprocess

import torch

import fusedloss

SCHEMA = "fusedloss-bench/1"
SUMMARY_COLUMNS = ("op", "shape", "dtype", "fused ms", "ref ms", "speedup", "vs GEMMs", "fused path", "fused MiB",
                   "ref MiB", "mem ratio", "loss diff", "grad diff", "check")
DETAIL_COLUMNS = ("op", "shape", "dtype", "variant", "fwd ms", "bwd ms", "full ms", "TFLOP/s", "extra MiB",
                  "vs fused", "diff vs ref", "note")


def _ms(r):
    return f"{r['full_ms']:.2f}" if r.get("status") == "ok" else _status(r)


def _status(r):
    if not r:
        return "-"
    if r.get("status") == "oom":
        return r.get("reason", "OOM").split(":")[0]
    return r.get("status", "-")


def _mib(r):
    return f"{r['peak_extra_bytes'] / 2**20:.1f}" if r.get("status") == "ok" else _status(r)


def _ratio(x):
    return f"{x:.2f}x" if x is not None else "-"


def _sci(x):
    return "-" if x is None else f"{x:.1e}"


def _check(row, fused):
    if row.get("flagged"):
        return "WRONG" if fused.get("within_tolerance") is False else "CHECK"
    if fused.get("within_tolerance"):
        return "ok"
    return "n/a (no reference)" if row["variants"].get("reference", {}).get("status") != "ok" else "-"


def summary_rows(rows):
    """One line per (op, shape, dtype): fused vs reference."""
    out = []
    for row in rows:
        if row.get("status") == "skipped":
            out.append((row["op"], row["shape_str"], row["dtype"]) + ("-",) * 10 + (f"skipped: {row['reason']}",))
            continue
        f, r = row["variants"].get("fused", {}), row["variants"].get("reference", {})
        # "speedup" (the reference's time over the fused step's) and "vs GEMMs"
        # (the fused step's over its bare GEMMs', the floor): from alternating
        # steps in one process (runner._paired_ratios).
        out.append((row["op"], row["shape_str"], row["dtype"], _ms(f), _ms(r), _ratio(row.get("speedup")),
                    _ratio(row.get("fused_over_gemm")), row.get("fused_path") or "-", _mib(f), _mib(r),
                    _ratio(row.get("memory_ratio")), _sci(f.get("loss_diff")), _sci(f.get("grad_diff")),
                    _check(row, f)))
    return out


def detail_rows(rows):
    """One line per variant: fwd/bwd/full split, throughput, memory, its own check."""
    out = []
    for row in rows:
        if row.get("status") == "skipped":
            continue
        fused = row["variants"].get("fused", {})
        for name, r in row["variants"].items():
            ok = r.get("status") == "ok"
            vs = (f"{r['full_ms'] / fused['full_ms']:.2f}x" if ok and fused.get("status") == "ok" and name != "fused"
                  else "-")
            if "within_tolerance" in r:
                diff = f"{max(r['loss_diff'], r['grad_diff']):.1e}" + ("" if r["within_tolerance"] else " WRONG")
            else:
                diff = "-"
            note = "" if ok else r.get("reason", "")
            out.append((row["op"], row["shape_str"], row["dtype"], name,
                        f"{r['fwd_ms']:.2f}" if ok else _status(r), f"{r['bwd_ms']:.2f}" if ok else "-",
                        f"{r['full_ms']:.2f}" if ok else "-", f"{r['tflops']:.3g}" if "tflops" in r else "-",
                        f"{r['peak_extra_bytes'] / 2**20:.1f}" if ok else "-", vs, diff, note))
    return out


def format_table(columns, rows):
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in rows if i < len(r)]) for i, c in enumerate(columns)]
    # a long trailing note (skip reason) should not widen the whole table
    widths[-1] = min(widths[-1], 60)

    def fmt(r):
        return "  ".join(c.ljust(w) if i in (0, 1, 2, 3) or i == len(r) - 1 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    lines = [fmt(columns), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def render(rows, meta):
    parts = [f"fusedloss-bench on {meta['device']['name']} (torch {meta['torch']}, "
             f"{'CUDA ' + meta['cuda'] if meta['device']['type'] == 'cuda' else 'CPU'}, "
             f"{meta['config'].get('repeat')} repeats, median)", "",
             "Fused vs reference: fwd+bwd time, peak memory above the inputs, max abs diff of loss / grads",
             format_table(SUMMARY_COLUMNS, summary_rows(rows)), "",
             "All variants (TFLOP/s: linear CE counts 6NDV; 'vs fused' = variant time / fused time)",
             format_table(DETAIL_COLUMNS, detail_rows(rows))]
    flagged = [r for r in rows if r.get("flagged")]
    if flagged:
        parts += ["", f"WARNING: {len(flagged)} row(s) exceed the tolerance or failed: "
                      + ", ".join(f"{r['op']} {r['shape_str']}" for r in flagged)]
    return "\n".join(parts)


def git_revision():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        # "-dirty" when the code differs from HEAD (results being rewritten do not count)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_info(device):
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}"}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"type": "cpu", "name": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_bytes": mem}


def metadata(cfg):
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(cfg.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fusedloss": fusedloss.__version__,
        "fusedloss_built_with_cuda": fusedloss.built_with_cuda(),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "config": {"device": cfg.device, "dtype": str(cfg.dtype).replace("torch.", "") if cfg.dtype else None,
                   "repeat": cfg.repeat, "warmup": cfg.warmup, "seed": cfg.seed,
                   "compile_reference": cfg.compile_reference, "isolate_cpu_variants": cfg.isolate,
                   "ram_budget_bytes": cfg.ram_budget},
        "memory_method": ("torch.cuda.max_memory_allocated after reset, minus memory allocated before the step"
                          if torch.device(cfg.device).type == "cuda" else
                          "peak RSS growth (VmHWM after /proc/self/clear_refs reset) of one fwd+bwd after a "
                          "warm-up" + (", each variant in a fresh subprocess" if cfg.isolate else "")),
    }


def to_json(rows, meta):
    return dict(meta, rows=rows)
