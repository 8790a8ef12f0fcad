#!/usr/bin/env python
"""Communication of the vocabulary-sharded sampled softmax / NCE
(``fusedloss.distributed``): bytes each rank sends per training step
(forward + backward), with W gloo ranks on the CPU, at C classes and K shared
log-uniform candidates.

    python benchmarks/distributed_sampled_comm.py --json benchmarks/results/cpu-distributed-sampled-comm.json

Each rank holds C / W rows of the [C, D] weight; input and targets are
replicated. The collectives fusedloss calls are counted with
``fusedloss.bench.comm.count_collectives`` (payload per call, then the bytes a
rank sends under ring all-reduce / all-gather / reduce-scatter; rank 0 is the
broadcast root). The cross-rank argument checks (an all-gather of a few
integers) are counted too.

``--package DIR`` imports fusedloss from DIR instead of this checkout: the
"before" numbers came from the commit before owner-only scoring, extracted
with ``git archive 0dfac39 fusedloss | tar -x -C DIR``, plus this checkout's
built extension (``fusedloss/_C*.so``) and ``fusedloss/bench/comm.py`` copied in.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--num-sampled", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--label", default="after")
    p.add_argument("--package", default=ROOT, help="directory to import fusedloss from")
    p.add_argument("--json", help="append the results to this JSON file (a list of runs)")
    return p.parse_args(argv)


def _rank_main(rank, world, args, init_file, out):
    sys.path.insert(0, args.package)
    import fusedloss
    from fusedloss.bench.comm import count_collectives

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    C, K, N, D = args.classes, args.num_sampled, args.batch, args.dim
    shard = C // world
    start = rank * shard
    gen = torch.Generator().manual_seed(0)  # replicated input / targets
    x = torch.randn(N, D, generator=gen, requires_grad=True)
    target = fusedloss.samplers.LogUniformSampler(C).sample(torch.zeros(1, 1, dtype=torch.long), N,
                                                            unique=False, generator=gen)[0]
    weight = (torch.randn(shard, D, generator=torch.Generator().manual_seed(1 + rank)) * 0.05).requires_grad_()
    results = {}
    for name in ("sampled_softmax_loss", "nce_loss"):
        loss_fn = getattr(fusedloss.distributed, name)

        def step(gen_seed):
            loss = loss_fn(x, weight, target, K, vocab_start=start, num_classes=C,
                           generator=torch.Generator().manual_seed(gen_seed))
            loss.backward()
            return loss

        step(0)  # warm-up
        with count_collectives() as log:
            step(1)
        times = []
        for i in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step(2 + i)
            times.append(time.perf_counter() - t0)
        results[name] = {
            "bytes_sent_per_rank": sum(c.ring_bytes_sent(rank_is_root=rank == 0) for c in log),
            "payload_bytes": sum(c.nbytes for c in log),
            "collectives": [{"op": c.op, "function": c.function, "numel": c.numel, "bytes": c.nbytes}
                            for c in log],
            "step_seconds_median": sorted(times)[len(times) // 2],
        }
    out[rank] = results
    dist.destroy_process_group()


def run(args, world):
    init_file = os.path.join("/tmp", f"fusedloss_comm_{os.getpid()}_{world}")
    if os.path.exists(init_file):
        os.remove(init_file)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(world, args, init_file, out), nprocs=world, join=True)
        return dict(out)


def main(argv=None):
    args = parse_args(argv)
    runs = []
    for world in args.worlds:
        per_rank = run(args, world)
        entry = {
            "label": args.label, "world": world, "classes": args.classes, "num_sampled": args.num_sampled,
            "batch": args.batch, "dim": args.dim, "dtype": "float32", "num_true": 1,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, gloo over loopback",
            "torch": torch.__version__, "ranks": per_rank,
        }
        runs.append(entry)
        for name in ("sampled_softmax_loss", "nce_loss"):
            sent = [per_rank[r][name]["bytes_sent_per_rank"] for r in sorted(per_rank)]
            secs = [per_rank[r][name]["step_seconds_median"] for r in sorted(per_rank)]
            ops = [(c["op"], c["numel"]) for c in per_rank[0][name]["collectives"]]
            print(f"[{args.label}] W={world} {name}: bytes sent per rank {sent} (max {max(sent) / 2**20:.2f} MiB), "
                  f"step {max(secs):.3f} s; collectives of rank 0: {ops}")
    if args.json:
        existing = []
        if os.path.exists(args.json):
            with open(args.json) as f:
                existing = json.load(f)
        with open(args.json, "w") as f:
            json.dump(existing + runs, f, indent=1)


if __name__ == "__main__":
    main()
