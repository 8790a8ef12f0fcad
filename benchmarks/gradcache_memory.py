"""GradCache vs backpropagating the whole batch: peak memory and time of one
training step (forward + backward) of two MLP towers with dropout under the
fused SigLIP loss, each variant in a fresh process (peak RSS growth above the
model and the inputs, as fusedloss.bench measures it on the CPU).

  PYTHONPATH=. python benchmarks/gradcache_memory.py [--batch 16384] [--mini-batch 1024]
"""
import argparse
import json
import subprocess
import sys
import time

import torch

import fusedloss
from fusedloss.bench.measure import RssPeak, return_heap_to_os

DIM_IN, HIDDEN, DIM_OUT = 256, 2048, 256


def tower(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, HIDDEN), torch.nn.GELU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(HIDDEN, DIM_OUT))


def step(variant, towers, batches, scale, bias, mini_batch):
    def loss_fn(image, text):
        return fusedloss.siglip_loss(torch.nn.functional.normalize(image, dim=-1),
                                     torch.nn.functional.normalize(text, dim=-1), scale, bias)

    if variant == "cached":
        loss = fusedloss.gradcache.cached_loss(loss_fn, list(zip(towers, batches)), mini_batch_size=mini_batch)
    else:
        loss = loss_fn(*(enc(x) for enc, x in zip(towers, batches)))
    loss.backward()
    return loss.item()


def child(variant, batch, mini_batch):
    towers = [tower(1), tower(2)]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, DIM_IN, generator=g) for _ in range(2)]
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    step(variant, towers, batches, scale, bias, mini_batch)  # warm-up (allocates the parameter gradients)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step(variant, towers, batches, scale, bias, mini_batch)
        times.append(time.perf_counter() - start)
    return_heap_to_os()
    with RssPeak() as peak:
        loss = step(variant, towers, batches, scale, bias, mini_batch)
    print(json.dumps({"variant": variant, "peak_mib": peak.peak / 2**20, "seconds": min(times), "loss": loss}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--mini-batch", type=int, default=1024)
    p.add_argument("--child", choices=("plain", "cached"))
    args = p.parse_args()
    if args.child:
        return child(args.child, args.batch, args.mini_batch)
    print(f"two MLP towers {DIM_IN}-{HIDDEN}-{HIDDEN}-{DIM_OUT} (dropout 0.1), fused SigLIP, B={args.batch}, "
          f"fp32, {torch.get_num_threads()} threads")
    for variant in ("plain", "cached"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                              "--mini-batch", str(args.mini_batch)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        what = "whole batch with autograd" if variant == "plain" else f"GradCache, mini_batch_size={args.mini_batch}"
        print(f"{what:40s} peak +{r['peak_mib']:7.0f} MiB  step {r['seconds']:6.2f} s  loss {r['loss']:.6f}")
    print("(the losses differ by dropout: one mask draw for the whole batch against one per mini-batch)")


if __name__ == "__main__":
    main()
