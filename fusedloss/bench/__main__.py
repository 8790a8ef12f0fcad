"""``python -m fusedloss.bench`` / ``fusedloss-bench``: race every fusedloss op
against its reference (and public peers on a GPU); see ``--help``."""
import argparse
import json
import sys

import torch

from . import cases, presets, report, runner

DESCRIPTION = """Time forward, backward and both, and the peak memory above the inputs, of every
fusedloss op against its plain-PyTorch reference (fusedloss.reference), torch.compile
of it and public peers, and check the loss and gradients against the reference.
Exit status 1 when a row exceeds its dtype's tolerance or the fused op failed."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

EPILOG = """shapes: OP:AxBxC[:DTYPE] with the op's dimensions in order (k/M suffixes allowed):
  linear_ce N x D x V     sampled_softmax, nce N x D x K x C     info_nce, nt_xent, clip, siglip B x D
  e.g. --shapes linear_ce:4096x512x128k  nce:8192x256x8192x1M:float32  2048x256
  (a shape without OP applies to every op selected by --ops with that many dimensions)
presets: """ + ", ".join(f"{k} ({len(v)} rows)" for k, v in presets.PRESETS.items())


def _count(text):
    text = text.strip()
    mult = {"k": 1000, "K": 1000, "m": 1_000_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def parse_dtype(name):
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


def parse_shape(text, ops):
    """'op:AxB..[:dtype]' or 'AxB..' -> list of (op, shape dict, dtype or None)."""
    parts = text.split(":")
    op = None
    if parts and not parts[0][:1].isdigit():
        op = cases.resolve_op(parts.pop(0))
    if not parts:
        raise argparse.ArgumentTypeError(f"shape {text!r} has no dimensions")
    dims = [_count(x) for x in parts[0].lower().split("x")]
    dtype = parse_dtype(parts[1]) if len(parts) > 1 else None
    targets = [op] if op else [o for o in ops if len(cases.CASES[o].dims) == len(dims)]
    if not targets:
        raise argparse.ArgumentTypeError(f"shape {text!r}: no selected op has {len(dims)} dimensions")
    out = []
    for o in targets:
        names = cases.CASES[o].dims
        if len(names) != len(dims):
            raise argparse.ArgumentTypeError(f"{o} takes {'x'.join(names)}, got {text!r}")
        out.append((o, dict(zip(names, dims)), dtype))
    return out


def build_parser():
    p = argparse.ArgumentParser(prog="fusedloss-bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", help=f"comma-separated ops (default: all): {', '.join(cases.CASES)}")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE", help="explicit shapes (see below); overrides --preset")
    p.add_argument("--preset", choices=sorted(presets.PRESETS), help="named shape set (default: cpu or gpu)")
    p.add_argument("--dtype", type=parse_dtype, help="override every row's dtype (default float32 / preset's)")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--repeat", type=int, help="timed repeats per variant, median reported (default 3 CPU, 10 GPU)")
    p.add_argument("--warmup", type=int, help="untimed warm-up runs (default 1 CPU, 3 GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="also time torch.compile(reference) (auto: on for CUDA, off on the CPU)")
    p.add_argument("--no-isolate", action="store_true",
                   help="CPU: run all variants in this process (faster; memory less reliable)")
    p.add_argument("--ram-fraction", type=float, default=0.8,
                   help="CPU: a variant estimated to need more than this fraction of available RAM is reported "
                        "as OOM instead of run (default 0.8)")
    p.add_argument("--max-ram-gib", type=float, help="CPU: absolute RAM budget per variant instead of --ram-fraction")
    p.add_argument("--timeout", type=float, help="CPU: seconds per variant subprocess before it is abandoned")
    p.add_argument("--json", metavar="PATH", help="write machine-readable results")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory vs size (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def config_from_args(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedloss-bench: --device cuda requested but CUDA is not available")
    ops = [cases.resolve_op(o) for o in args.ops.split(",")] if args.ops else list(cases.CASES)
    if args.shapes:
        shapes = [s for text in args.shapes for s in parse_shape(text, ops)]
    else:
        preset = args.preset or presets.default_preset(dev)
        shapes = list(presets.PRESETS[preset])
    shapes = [s for s in shapes if s[0] in ops]
    if not shapes:
        raise SystemExit("fusedloss-bench: no shapes selected (check --ops / --shapes / --preset)")
    gpu = dev.type == "cuda"
    ram_budget = None
    if not gpu:
        ram_budget = (int(args.max_ram_gib * cases.GiB) if args.max_ram_gib is not None
                      else runner.default_ram_budget(args.ram_fraction))
    return runner.Config(
        shapes=shapes, device=device, dtype=args.dtype,
        repeat=max(1, args.repeat if args.repeat is not None else (10 if gpu else 3)),
        warmup=max(0, args.warmup if args.warmup is not None else (3 if gpu else 1)),
        seed=args.seed, compile_reference=args.compile == "on" or (args.compile == "auto" and gpu),
        isolate=not args.no_isolate, ram_budget=ram_budget, progress=not args.quiet,
        subprocess_timeout=args.timeout,
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"fusedloss-bench: {e}") from None
    meta = report.metadata(cfg)
    rows = runner.run(cfg)
    print(report.render(rows, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_json(rows, meta), f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        from . import plot
        try:
            plot.plot(rows, args.plot, title=f"fusedloss-bench · {meta['device']['name']}")
            print(f"wrote {args.plot}")
        except plot.PlotUnavailable as e:
            print(f"fusedloss-bench: {e}", file=sys.stderr)
            return 2
    return 1 if any(r.get("flagged") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
