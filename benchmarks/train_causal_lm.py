#!/usr/bin/env python
"""Train a small random-weight Llama-like causal LM with a 128k vocabulary,
unpatched (Hugging Face's loss on the [B, T, V] logits) vs patched with
``fusedloss.integrations.transformers.patch`` (no logits), and report the
training step time and peak memory of each.

Each variant runs in its own process on identical weights and batches: a
warm-up step (it allocates the AdamW state; with ``--compile`` it also
compiles), ``--steps`` timed steps (forward, backward, AdamW step; median
reported), then one probed forward+backward whose peak resident-set growth is
measured above the steady state (model and AdamW state; the gradients were
freed, so they count in the growth; the allocator returns freed memory to the
OS first, and fusedloss's kept CPU tile is released so it is counted too).  Needs ``transformers``; downloads nothing.

    python benchmarks/train_causal_lm.py                    # CPU, fp32, ~5 minutes on 2 cores
    python benchmarks/train_causal_lm.py --compile          # adds torch.compile'd variants
    python benchmarks/train_causal_lm.py --device cuda --dtype bf16 --batch 8 --seq 2048 --hidden 2048
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout
import fusedloss  # noqa: E402
from fusedloss.bench.measure import CudaPeak, RssPeak, return_heap_to_os  # noqa: E402

MiB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("unpatched", "fusedloss")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--pad-fraction", type=float, default=0.1, help="trailing fraction of each row that is padding")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also run both variants under torch.compile (inductor)")
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ", ".join(
        VARIANTS + tuple(v + "+compile" for v in VARIANTS)))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=DTYPES[args.dtype])
    model = model.to(args.device).train()
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    pad = int(args.seq * args.pad_fraction)
    if pad:
        mask[:, args.seq - pad:] = 0
        ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), labels=labels.to(args.device))
    return model, batch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(args, variant):
    model, batch = build(args)
    if variant.startswith("fusedloss"):
        from fusedloss.integrations.transformers import patch
        patch(model)
    step_model = torch.compile(model) if variant.endswith("+compile") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)

    def forward_backward():
        loss = step_model(**batch).loss
        loss.backward()
        return loss.item()

    def step():
        loss = forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    losses = [step()]
    sync(args.device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync(args.device)
        times.append(time.perf_counter() - t0)

    if torch.device(args.device).type == "cuda":
        peak = CudaPeak(args.device)
    else:
        return_heap_to_os()
        fusedloss.empty_cache()
        peak = RssPeak()
    with peak:
        losses.append(forward_backward())
    return dict(variant=variant, step_s=statistics.median(times), step_times_s=times, warmup_s=warmup_s,
                peak_growth_mib=peak.peak / MiB, losses=losses)


def machine(args):
    import transformers

    info = dict(device=args.device, torch=torch.__version__, transformers=transformers.__version__,
                threads=torch.get_num_threads(), python=platform.python_version())
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(args.device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
        info["cores"] = os.cpu_count()
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_variant(args, args.worker)), flush=True)
        return 0
    if args.variants:
        variants = args.variants.split(",")
    else:
        variants = list(VARIANTS) + ([v + "+compile" for v in VARIANTS] if args.compile else [])
    argv = list(sys.argv[1:] if argv is None else argv)
    n_tokens = args.batch * args.seq
    n_labels = args.batch * (args.seq - int(args.seq * args.pad_fraction) - 1)
    params = (2 * args.vocab * args.hidden + args.layers * (
        2 * args.hidden * args.hidden + 2 * args.hidden * args.hidden * args.kv_heads // args.heads
        + 3 * args.hidden * args.intermediate))
    info = machine(args)
    print(f"Llama-like causal LM, random weights: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads ({args.kv_heads} kv), intermediate {args.intermediate}, untied lm_head, "
          f"~{params / 1e6:.0f}M parameters, {args.dtype}, AdamW")
    print(f"batch {args.batch} x seq {args.seq} = {n_tokens} tokens ({n_labels} labelled, the rest padding); "
          f"logits would be [{args.batch}, {args.seq}, {args.vocab}] = "
          f"{n_tokens * args.vocab * 4 / MiB:.0f} MiB in fp32; the gradients alone take "
          f"{params * torch.finfo(DTYPES[args.dtype]).bits / 8 / MiB:.0f} MiB")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    results = []
    for variant in variants:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{variant}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append(dict(variant=variant, error=proc.stderr[-3000:]))
            continue
        results.append(json.loads(line[len("RESULT "):]))

    memory = "fwd+bwd peak growth" if torch.device(args.device).type == "cuda" else "fwd+bwd RSS growth"
    print(f"\n{'variant':<20} {'step (median)':>14} {'first step':>11} {memory:>18}  losses")
    base = next((r for r in results if r["variant"] == "unpatched" and "error" not in r), None)
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<20} failed")
            continue
        losses = " ".join(f"{x:.4f}" for x in r["losses"])
        print(f"{r['variant']:<20} {r['step_s']:>12.2f} s {r['warmup_s']:>9.2f} s {r['peak_growth_mib']:>14.0f} MiB  "
              f"{losses}")
    fused = next((r for r in results if r["variant"] == "fusedloss" and "error" not in r), None)
    if base and fused:
        diff = max(abs(a - b) for a, b in zip(base["losses"], fused["losses"]))
        print(f"\nfusedloss vs unpatched: {base['step_s'] / fused['step_s']:.2f}x step speed, "
              f"{base['peak_growth_mib'] / max(fused['peak_growth_mib'], 1e-9):.1f}x less forward+backward memory growth, "
              f"max loss difference over the steps {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != "worker"}, machine=info,
                           fusedloss=fusedloss.__version__, results=results), f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
