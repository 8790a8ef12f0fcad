#!/usr/bin/env python
"""Million-class training demo: a small skip-gram model over 1,000,000 classes.

Synthetic Zipf-distributed data (item ids drawn from the log-uniform law, the
way word frequencies fall off; the label is one of the next two ids), an
embedding tower, and a 1M x D output layer trained with
``fusedloss.sampled_softmax_loss``.  Prints the loss falling, steps/s and the
resident memory, which stays flat; then measures the same step with the
reference ops (``fusedloss.reference``), whose full-softmax version needs the
[batch, 1M] logits and does not fit.

    python benchmarks/train_million_class.py                   # CPU, a few minutes
    python benchmarks/train_million_class.py --device cuda --batch 8192 --dim 256 --num-sampled 8192
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout
import fusedloss  # noqa: E402
from fusedloss.bench.cases import CASES, GiB, MiB, log_uniform_sampled_values  # noqa: E402
from fusedloss.bench.measure import CudaPeak, RssPeak, return_heap_to_os  # noqa: E402
from fusedloss.bench.runner import available_ram  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--num-sampled", type=int, default=2048)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--loss", choices=("sampled_softmax", "nce"), default="sampled_softmax")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--ram-fraction", type=float, default=0.5,
                   help="CPU: a reference step estimated above this fraction of available RAM is reported as OOM")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class SkipGram(torch.nn.Module):
    def __init__(self, classes, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(classes, dim, sparse=True)
        torch.nn.init.normal_(self.embed.weight, std=0.1)
        self.tower = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Parameter(torch.randn(classes, dim) * 0.01)  # the classifier / output embeddings

    def forward(self, ids):
        return torch.tanh(self.tower(self.embed(ids)))


def zipf_batch(batch, classes, gen, device):
    """Context ids ~ log-uniform (Zipf-like); the label is one of the next two ids."""
    u = torch.rand(batch, generator=gen, dtype=torch.float64)
    ctx = (torch.exp(u * math.log(classes + 1)).floor().long() - 1).clamp_(0, classes - 1)
    label = (ctx + 1 + torch.randint(0, 2, (batch,), generator=gen)) % classes
    return ctx.to(device), label.to(device)


def memory_now(device):
    """Allocated CUDA memory, or this process's resident set (0 where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:  # sizes in pages: total, resident, ...
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def op_inputs(args, h, w, label, sampled_values=None):
    """The bench adapters' input dict (sampled_values=None: the fused op samples itself)."""
    return {"input": h, "weight": w, "target": label, "num_sampled": args.num_sampled,
            "num_classes": w.shape[0], "sampled_values": sampled_values}


def train(args, case, classes, device):
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = SkipGram(classes, args.dim).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    print(f"{'step':>6} {'loss':>8} {'steps/s':>8} {'memory MiB':>11}")
    t0, last, mem_log = time.perf_counter(), time.perf_counter(), []
    first_loss = final_loss = None
    running = 0.0
    for step in range(1, args.steps + 1):
        ctx, label = zipf_batch(args.batch, classes, gen, device)
        loss = case.call(case.fused_fn(), op_inputs(args, model(ctx), model.out, label))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        if step % args.log_every == 0 or step == args.steps:
            n = args.log_every if step % args.log_every == 0 else step % args.log_every
            avg = running / n
            first_loss = avg if first_loss is None else first_loss
            final_loss, running = avg, 0.0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            mem = memory_now(device)
            mem_log.append(mem)
            print(f"{step:>6} {avg:>8.4f} {n / (now - last):>8.2f} {mem / MiB:>11.1f}", flush=True)
            last = now
    total = time.perf_counter() - t0
    print(f"\n{args.steps} steps in {total:.1f} s ({args.steps / total:.2f} steps/s); loss {first_loss:.3f} -> "
          f"{final_loss:.3f}; memory {min(mem_log) / MiB:.0f}..{max(mem_log) / MiB:.0f} MiB (flat: the "
          f"{classes:,}-class logits are never materialised)")
    return model, gen


def step_memory(device, fn):
    """Peak memory above the current footprint of one fwd+bwd, or the OOM error."""
    probe = CudaPeak(device) if device.type == "cuda" else RssPeak()
    try:
        with probe:
            fn()
    except torch.OutOfMemoryError:
        return None
    return probe.peak


def compare_reference(args, model, case, classes, device, gen):
    ctx, label = zipf_batch(args.batch, classes, gen, device)
    h = model(ctx).detach().requires_grad_(True)
    w = model.out.detach().requires_grad_(True)
    # Fused and reference see the same candidates.
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(args.seed + 1)
    x = op_inputs(args, h, w, label, log_uniform_sampled_values(label, args.num_sampled, classes, g))

    def step(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(), (h, w))

    full_ref = step(lambda: CASES["linear_ce"].call_reference(fusedloss.reference.linear_cross_entropy, x))
    print("\nOne training step's extra memory (above the model and optimizer):")
    rows = [(f"fused {args.loss}", step(lambda: case.call(case.fused_fn(), x))),
            (f"reference {args.loss}", step(lambda: case.call_reference(case.reference_fn(), x)))]
    for name, fn in rows:
        peak = step_memory(device, fn)
        print(f"  {name:<44} {'OOM' if peak is None else f'{peak / MiB:.1f} MiB'}")
    # The same step with a plain full softmax over every class: [batch, classes] fp32
    # logits, their softmax and gradient (x3), plus the dense weight gradient.
    need = 3 * 4 * args.batch * classes + w.numel() * w.element_size()
    budget = None if device.type == "cuda" else int((available_ram() or 0) * args.ram_fraction)
    label_full = f"reference full softmax ({classes:,} classes)"
    if budget is not None and need > budget:
        print(f"  {label_full:<44} OOM (needs ~{need / GiB:.1f} GiB; budget {budget / GiB:.1f} GiB = "
              f"{args.ram_fraction:g} x available RAM)")
    else:
        peak = step_memory(device, full_ref)
        print(f"  {label_full:<44} {f'OOM (needs ~{need / GiB:.1f} GiB)' if peak is None else f'{peak / MiB:.1f} MiB'}")


def main(argv=None):
    args = parse_args(argv)
    return_heap_to_os()  # so the RSS readings show real usage
    device = torch.device(args.device)
    case, classes = CASES[args.loss], args.classes
    print(f"skip-gram over {classes:,} classes, dim {args.dim}, batch {args.batch}, "
          f"fusedloss.{case.func} (K={args.num_sampled}), on {device} "
          f"({torch.get_num_threads()} threads)\n")
    model, gen = train(args, case, classes, device)
    compare_reference(args, model, case, classes, device, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
