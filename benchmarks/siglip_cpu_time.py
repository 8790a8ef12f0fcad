"""SigLIP fused vs reference, forward + backward at B=8192 D=256 fp32 on one
thread, in paired runs (fused, then reference, three times), reporting CPU time
(robust to other processes on a shared machine) and wall time.

  PYTHONPATH=. python benchmarks/siglip_cpu_time.py
"""
import time

import torch

import fusedloss
from fusedloss import reference as ref

B, D = 8192, 256


def main():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
                   for _ in range(2))
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    leaves = (image, text, scale, bias)

    def step(fn):
        for t in leaves:
            t.grad = None
        cpu, wall = time.process_time(), time.perf_counter()
        fn(*leaves).backward()
        return time.process_time() - cpu, time.perf_counter() - wall

    step(fusedloss.siglip_loss)
    step(ref.siglip_loss)
    for k in range(3):
        (fc, fw), (rc, rw) = step(fusedloss.siglip_loss), step(ref.siglip_loss)
        print(f"pair {k}: fused cpu {fc:.2f} s wall {fw:.2f} s | reference cpu {rc:.2f} s wall {rw:.2f} s | "
              f"reference / fused cpu {rc / fc:.2f}")
    a, b = image.detach(), text.detach()
    cpu = time.process_time()
    for _ in range(3):
        a @ b.T
    print(f"one B x B x D GEMM: {(time.process_time() - cpu) / 3:.2f} s cpu (the step needs three)")


if __name__ == "__main__":
    main()
