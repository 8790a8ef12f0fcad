#!/usr/bin/env python3
"""Run every fusedloss CUDA kernel once, forward and backward, on small shapes.

The driver that scripts/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck, synccheck, initcheck): each case below reaches a different kernel
or a different path through one (chunk boundaries, several row blocks,
half-precision dlogits written over the fp32 tile, per-row candidates,
sparse gradients, self-masked columns, extra negatives).  It runs on the CPU
too (``--device cpu``), so it is known to work before GPU time is spent on it.

  python scripts/gpu_check_kernels.py --small               # CUDA if available
  python scripts/gpu_check_kernels.py --small --device cpu --check
  python scripts/gpu_check_kernels.py --list

``--check`` also compares every loss and gradient with the plain-PyTorch
reference (fusedloss.reference) evaluated in fp64 on the same device; without
it a case fails only when it raises or returns non-finite values.  Exit
status: 0 when every case passed, 1 otherwise.
"""
import argparse
import os
import sys
import time
import traceback

# This checkout's fusedloss (built in place by gpu_check.sh), also when run as
# scripts/gpu_check_kernels.py from elsewhere.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(ROOT, "fusedloss")) and ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# name -> what it exercises.  Kept importable without torch so that --help and
# --list work (and are tested) on machines where torch is not importable.
CASES = {
    "lce_recompute_fp32": "linear CE recompute pair (chunked forward + backward), fp32, bias, ignore_index, "
                          "label smoothing, z-loss, softcap, a partial last chunk",
    "lce_recompute_bf16": "the same in bf16 (half-precision dlogits workspace)",
    "lce_recompute_fp16": "the same in fp16",
    "lce_recompute_none": "linear CE reduction='none' with an upstream gradient (recompute pair, fp32)",
    "lce_single_fp32": "linear CE single pass (FUSEDLOSS_CUDA_SINGLE_PASS=1), one row block, fp32",
    "lce_single_bf16": "single pass, one row block, bf16: half dlogits written over the fp32 tile",
    "lce_single_bf16_blocks": "single pass, three row blocks (memory_budget), bf16: fp32 dW accumulator",
    "lce_single_fp32_blocks": "single pass, three row blocks, fp32, with bias and ignored rows",
    "sampled_shared_fp32": "sampled softmax, shared [K] candidates with accidental hits and duplicates, "
                           "label smoothing, several chunks",
    "sampled_shared_bf16": "the same in bf16",
    "sampled_per_row_fp32": "sampled softmax, per-row [N, K] candidates",
    "sampled_per_row_bf16": "the same in bf16",
    "nce_shared_fp32": "NCE, shared candidates",
    "nce_per_row_bf16": "NCE, per-row candidates, accidental hits removed, bf16",
    "sampled_sparse_grad": "sampled softmax with sparse_grad=True (sparse weight and bias gradients)",
    "nce_sparse_grad_bf16": "NCE with sparse_grad=True, bf16",
    "info_nce_symmetric_fp32": "InfoNCE symmetric with extra negatives, learnable temperature, several tiles "
                               "(column log-sum-exp partials and merge)",
    "info_nce_symmetric_bf16": "the same in bf16",
    "nt_xent_fp32": "NT-Xent (self-similarity masked), several tiles",
    "nt_xent_bf16": "the same in bf16",
    "clip_fp32": "CLIP symmetric loss, learnable logit scale",
    "info_nce_ids_fp32": "InfoNCE with false negatives masked by query, key and negative ids (duplicates), "
                         "several tiles",
    "mnrl_all_directions_fp32": "MultipleNegativesRankingLoss: four directions in one joint softmax, a hard-"
                                "negative block, in-batch hardness penalty (ids and self masks in the op)",
    "sampled_single_bf16": "sampled softmax single pass (FUSEDLOSS_CUDA_SINGLE_PASS=1), shared candidates, "
                           "hits and duplicates, bf16",
    "nce_single_fp32": "NCE single pass, shared candidates, fp32",
    "info_nce_single_bf16": "InfoNCE single pass, extra negatives, learnable temperature, bf16 dlogits over the "
                            "fp32 tile",
    "nt_xent_single_fp32_blocks": "NT-Xent single pass, three row blocks (self mask shifted per block), fp32",
    "clip_single_bf16": "CLIP single pass (one whole-tile block: column LSEs first), learnable scale, bf16",
    "siglip_fp32": "SigLIP sigmoid loss, learnable scale and bias, several tiles: loss and dlogits in one pass",
    "siglip_bf16": "the same in bf16 (half-precision dlogits workspace)",
    "siglip_none_fp32": "SigLIP reduction='none' with an upstream gradient: loss-only forward, recomputing backward",
}

# Relative tolerance (of the largest oracle magnitude) per input dtype for --check.
TOLERANCE = {"float32": 2e-4, "float64": 1e-9, "bfloat16": 3e-2, "float16": 1e-2}

SHAPES = {
    # --small: seconds under compute-sanitizer.  The single pass needs at least
    # 1024 rows per block on CUDA before it splits rows, hence N=2304 there.
    "small": {"lce": (96, 40, 300, 128), "lce_blocks": (2304, 32, 160), "sampled": (48, 24, 500, 40, 16),
              "pairs": (40, 24, 12, 16)},
    # default: larger grids (more blocks per kernel, longer rows) for a plain GPU run.
    "default": {"lce": (1000, 256, 20000, 4096), "lce_blocks": (4096, 128, 8000),
                "sampled": (512, 128, 100000, 1024, 256), "pairs": (1024, 256, 512, 256)},
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="cases: " + ", ".join(CASES))
    p.add_argument("--device", help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--small", action="store_true", help="small shapes (for compute-sanitizer); = --shapes small")
    p.add_argument("--shapes", choices=("small", "default", "all"),
                   help="shape set: small, default (larger grids) or all (both, in one process)")
    p.add_argument("--check", action="store_true", help="compare every loss and gradient with the fp64 reference")
    p.add_argument("--only", help="comma-separated case names (prefixes allowed, e.g. lce_single,nt_xent)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def select(only):
    if not only:
        return list(CASES)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [name for name in CASES if any(name.startswith(w) for w in wanted)]
    unknown = [w for w in wanted if not any(name.startswith(w) for name in CASES)]
    if unknown:
        raise SystemExit(f"gpu_check_kernels: unknown case(s) {', '.join(unknown)}; see --list")
    return chosen


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for name, what in CASES.items():
            print(f"{name:26s} {what}")
        return 0
    names = select(args.only)

    import torch  # after argument parsing: --help/--list need no torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check_kernels: --device cuda requested but CUDA is not available")
    import fusedloss

    shape_sets = {"small": ["small"], "default": ["default"], "all": ["small", "default"]}[
        args.shapes or ("small" if args.small else "default")]
    print(f"gpu_check_kernels: device={device} torch={torch.__version__} cuda={torch.version.cuda} "
          f"built_with_cuda={fusedloss.built_with_cuda()} shapes={','.join(shape_sets)} check={args.check}",
          flush=True)
    if torch.device(device).type == "cuda" and not fusedloss.built_with_cuda():
        print("gpu_check_kernels: FAIL the extension has no CUDA kernels", flush=True)
        return 1
    failed, total = [], 0
    for shape_set in shape_sets:
        runner = Runner(torch, fusedloss, device, SHAPES[shape_set], args.check, args.seed)
        for name in names:
            label = name if len(shape_sets) == 1 else f"{name}[{shape_set}]"
            total += 1
            t0 = time.perf_counter()
            try:
                note = getattr(runner, name)()
                status = "ok"
            except Exception as e:  # report every case, then fail at the end
                status, note = "FAIL", f"{type(e).__name__}: {e}"
                traceback.print_exc()
                failed.append(label)
            print(f"{status:4s} {label:35s} {time.perf_counter() - t0:7.2f}s  {note}", flush=True)
    print(f"gpu_check_kernels: {total - len(failed)}/{total} cases passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


class CheckError(AssertionError):
    pass


class Runner:
    """One method per case; each returns a short note (max error when checking)."""

    def __init__(self, torch, fusedloss, device, shapes, check, seed):
        self.torch, self.fl, self.device, self.shapes, self.check, self.seed = torch, fusedloss, device, shapes, check, seed
        self.dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    # ------------------------------------------------------------------ helpers

    def _gen(self, salt=0):
        return self.torch.Generator().manual_seed(self.seed * 1000 + salt)

    def _leaf(self, t, dtype):
        """A leaf on the device in ``dtype`` requiring grad (built on the CPU for reproducibility)."""
        return t.to(self.device, dtype).requires_grad_()

    def _sync(self):
        if self.torch.device(self.device).type == "cuda":
            # Surface an asynchronous kernel error inside the case that caused it.
            self.torch.cuda.synchronize()

    def _run(self, fused, leaves, upstream=None):
        """loss and gradients of ``fused(*leaves)`` (non-leaf entries: None)."""
        torch = self.torch
        loss = fused(*leaves)
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(loss, wrt, grad_outputs=upstream)
        self._sync()
        for i, g in enumerate((loss,) + tuple(grads)):
            dense = g.to_dense() if g.is_sparse else g
            if not bool(torch.isfinite(dense).all()):
                raise CheckError(f"output {i} is not finite")
        return loss, grads

    def _case(self, fused, reference, leaves, dtype, upstream=None):
        """Run the fused op; with --check compare it with ``reference`` on fp64 copies."""
        torch = self.torch
        loss, grads = self._run(fused, leaves, upstream)
        if not self.check:
            return f"loss={float(loss.detach().float().sum()):.6g}"
        oracle_leaves = [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                         and t.is_floating_point() else t for t in leaves]
        ref_loss = reference(*oracle_leaves)
        wrt = [t for t in oracle_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        ref_grads = torch.autograd.grad(ref_loss, wrt, grad_outputs=None if upstream is None else upstream.double())
        tol = TOLERANCE[str(dtype).replace("torch.", "")]
        worst = 0.0
        for i, (a, e) in enumerate(zip((loss,) + tuple(grads), (ref_loss,) + tuple(ref_grads))):
            a = (a.to_dense() if a.is_sparse else a).double()
            e = (e.to_dense() if e.is_sparse else e).double()
            if a.shape != e.shape:
                raise CheckError(f"output {i}: shape {tuple(a.shape)} vs reference {tuple(e.shape)}")
            err = (a - e).abs().max().item() / max(1.0, e.abs().max().item())
            worst = max(worst, err)
            if not err <= tol:
                raise CheckError(f"output {i}: relative error {err:.3g} > {tol:g}")
        return f"max rel err {worst:.2e} (tol {tol:g})"

    def _single_pass(self, fn):
        """Run ``fn`` with the CUDA single pass of linear CE enabled (the CPU uses it anyway)."""
        old = os.environ.get("FUSEDLOSS_CUDA_SINGLE_PASS")
        os.environ["FUSEDLOSS_CUDA_SINGLE_PASS"] = "1"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["FUSEDLOSS_CUDA_SINGLE_PASS"]
            else:
                os.environ["FUSEDLOSS_CUDA_SINGLE_PASS"] = old

    # --------------------------------------------------------------- linear CE

    def _lce_problem(self, n, d, v, dtype, bias=True, ignore_every=7, salt=0):
        torch, g = self.torch, self._gen(salt)
        x = self._leaf(torch.randn(n, d, generator=g), dtype)
        w = self._leaf(torch.randn(v, d, generator=g) / d**0.5, dtype)
        b = self._leaf(torch.randn(v, generator=g) * 0.1, dtype) if bias else None
        y = torch.randint(0, v, (n,), generator=g)
        if ignore_every:
            y[::ignore_every] = -100
        return x, w, b, y.to(self.device)

    def _lce_recompute(self, dtype_name, reduction="mean"):
        fl, dtype = self.fl, self.dtypes[dtype_name]
        n, d, v, chunk = self.shapes["lce"]
        x, w, b, y = self._lce_problem(n, d, v, dtype)
        opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=15.0, reduction=reduction)
        upstream = None
        if reduction == "none":
            upstream = self.torch.rand(n, generator=self._gen(9)).to(self.device, self.torch.float32)
        return self._case(
            lambda x, w, b: fl.linear_cross_entropy(x, w, y, b, chunk_size=chunk, **opts),
            lambda x, w, b: fl.reference.linear_cross_entropy(x, w, y, b, **opts),
            [x, w, b], dtype, upstream)

    def lce_recompute_fp32(self):
        return self._lce_recompute("fp32")

    def lce_recompute_bf16(self):
        return self._lce_recompute("bf16")

    def lce_recompute_fp16(self):
        return self._lce_recompute("fp16")

    def lce_recompute_none(self):
        return self._lce_recompute("fp32", reduction="none")

    def _lce_single(self, dtype_name, blocks):
        fl, dtype = self.fl, self.dtypes[dtype_name]
        if blocks:
            n, d, v = self.shapes["lce_blocks"]
            # Three row blocks (the last one partial at the small shape): a budget
            # of the [R, V] fp32 tile plus, for a half-precision weight, the
            # 4·V·D fp32 dW accumulator.
            rows = max(1024, -(-n // 3))  # CUDA splits rows only into blocks of >= 1024
            budget = 4 * rows * v + (4 * v * d if dtype != self.torch.float32 else 0)
            x, w, b, y = self._lce_problem(n, d, v, dtype, bias=dtype_name == "fp32", ignore_every=5, salt=1)
        else:
            n, d, v, _ = self.shapes["lce"]
            budget = None
            x, w, b, y = self._lce_problem(n, d, v, dtype, bias=True, ignore_every=0, salt=2)
        opts = dict(label_smoothing=0.05, z_loss=1e-4)
        note = ""
        wants = getattr(getattr(fl, "_common", None), "wants_single_pass", None)
        if wants is not None:
            # What the Python layer will choose (the op may still fall back to
            # the recompute pair when no block fits the budget).
            taken = self._single_pass(lambda: wants("mean", x.device, x, w, b))
            if not taken:
                raise CheckError("the single pass was not selected")
            note = "single pass; "
        result = self._single_pass(lambda: self._case(
            lambda x, w, b: fl.linear_cross_entropy(x, w, y, b, memory_budget=budget, **opts),
            lambda x, w, b: fl.reference.linear_cross_entropy(x, w, y, b, **opts),
            [x, w, b], dtype))
        return note + (f"budget {budget} B; " if budget else "") + result

    def lce_single_fp32(self):
        return self._lce_single("fp32", blocks=False)

    def lce_single_bf16(self):
        return self._lce_single("bf16", blocks=False)

    def lce_single_bf16_blocks(self):
        return self._lce_single("bf16", blocks=True)

    def lce_single_fp32_blocks(self):
        return self._lce_single("fp32", blocks=True)

    # ---------------------------------------------------------- sampled / NCE

    def _sampled_problem(self, dtype, per_row, salt):
        torch, g = self.torch, self._gen(salt)
        n, d, c, k, chunk = self.shapes["sampled"]
        x = self._leaf(torch.randn(n, d, generator=g), dtype)
        w = self._leaf(torch.randn(c, d, generator=g) * 0.5, dtype)
        b = self._leaf(torch.randn(c, generator=g) * 0.3, dtype)
        y = torch.randint(0, c, (n, 2), generator=g)  # num_true = 2
        shape = (n, k) if per_row else (k,)
        sampled = torch.randint(0, c, shape, generator=g)
        if per_row:
            sampled[:, 0] = y[:, 0]              # accidental hits
            sampled[:, 5] = sampled[:, 1]        # duplicates
        else:
            sampled[1] = y[0, 0]
            sampled[4] = y[2, 1]
            sampled[k - 2] = sampled[2]
        true_count = torch.rand(n, 2, generator=g) + 0.1
        sampled_count = torch.rand(shape, generator=g) * 2 + 0.05
        sv = tuple(t.to(self.device) for t in (sampled, true_count, sampled_count))
        return x, w, b, y.to(self.device), sv, k, chunk

    def _sampled(self, kind, dtype_name, per_row, salt, sparse_grad=False, single_pass=False, **opts):
        fl, dtype = self.fl, self.dtypes[dtype_name]
        x, w, b, y, sv, k, chunk = self._sampled_problem(dtype, per_row, salt)
        fused_fn = fl.sampled_softmax_loss if kind == "softmax" else fl.nce_loss
        ref_fn = fl.reference.sampled_softmax_loss if kind == "softmax" else fl.reference.nce_loss
        chunk = None if single_pass else chunk  # chunk_size= forces the recompute pair
        note = self._case(
            lambda x, w, b: fused_fn(x, w, y, k, b, sampled_values=sv, chunk_size=chunk, sparse_grad=sparse_grad,
                                     **opts),
            lambda x, w, b: ref_fn(x, w, y, sv, b, **opts),
            [x, w, b], dtype)
        if sparse_grad:
            # The gradients must really be sparse (and coalesced): only touched rows.
            gw = self.torch.autograd.grad(fused_fn(x, w, y, k, b, sampled_values=sv, chunk_size=chunk,
                                                   sparse_grad=True, **opts), [w])[0]
            self._sync()
            if not (gw.is_sparse and gw.is_coalesced()):
                raise CheckError(f"sparse_grad=True gave a {'sparse' if gw.is_sparse else 'dense'} weight gradient "
                                 f"(coalesced={gw.is_sparse and gw.is_coalesced()})")
            note = f"{gw._nnz()} rows touched; " + note
        return note

    def sampled_shared_fp32(self):
        return self._sampled("softmax", "fp32", False, 10, label_smoothing=0.1)

    def sampled_shared_bf16(self):
        return self._sampled("softmax", "bf16", False, 11, label_smoothing=0.1)

    def sampled_per_row_fp32(self):
        return self._sampled("softmax", "fp32", True, 12)

    def sampled_per_row_bf16(self):
        return self._sampled("softmax", "bf16", True, 13, label_smoothing=0.05)

    def nce_shared_fp32(self):
        return self._sampled("nce", "fp32", False, 14)

    def nce_per_row_bf16(self):
        return self._sampled("nce", "bf16", True, 15, remove_accidental_hits=True)

    def sampled_sparse_grad(self):
        return self._sampled("softmax", "fp32", False, 16, sparse_grad=True)

    def nce_sparse_grad_bf16(self):
        return self._sampled("nce", "bf16", True, 17, sparse_grad=True)

    # ------------------------------------------------------------- contrastive

    def _features(self, rows, d, dtype, g):
        return self._leaf(self.torch.randn(rows, d, generator=g), dtype)

    def _info_nce(self, dtype_name):
        torch, fl, dtype = self.torch, self.fl, self.dtypes[dtype_name]
        b, d, m, tile = self.shapes["pairs"]
        g = self._gen(20)
        q, k, neg = (self._features(r, d, dtype, g) for r in (b, b, m))
        temp = torch.tensor(0.3, device=self.device, requires_grad=True)
        opts = dict(normalize=True, symmetric=True)
        return self._case(
            lambda q, k, neg, t: fl.info_nce_loss(q, k, negatives=neg, temperature=t, tile_size=tile, **opts),
            lambda q, k, neg, t: fl.reference.info_nce_loss(q, k, negatives=neg, temperature=t, **opts),
            [q, k, neg, temp], dtype)

    def info_nce_symmetric_fp32(self):
        return self._info_nce("fp32")

    def info_nce_symmetric_bf16(self):
        return self._info_nce("bf16")

    def _nt_xent(self, dtype_name):
        fl, dtype = self.fl, self.dtypes[dtype_name]
        b, d, _, tile = self.shapes["pairs"]
        h = self._features(2 * b, d, dtype, self._gen(21))
        return self._case(lambda h: fl.nt_xent_loss(h, temperature=0.5, tile_size=tile),
                          lambda h: fl.reference.nt_xent_loss(h, temperature=0.5), [h], dtype)

    def nt_xent_fp32(self):
        return self._nt_xent("fp32")

    def nt_xent_bf16(self):
        return self._nt_xent("bf16")

    def clip_fp32(self):
        torch, fl = self.torch, self.fl
        b, d, _, tile = self.shapes["pairs"]
        g = self._gen(22)
        img, txt = (self._leaf(torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1),
                               torch.float32) for _ in range(2))
        scale = torch.tensor(20.0, device=self.device, requires_grad=True)
        return self._case(lambda i, t, s: fl.clip_loss(i, t, s, tile_size=tile),
                          lambda i, t, s: fl.reference.clip_loss(i, t, s), [img, txt, scale], torch.float32)

    def info_nce_ids_fp32(self):
        torch, fl = self.torch, self.fl
        b, d, m, tile = self.shapes["pairs"]
        g = self._gen(24)
        q, k, neg = (self._features(r, d, torch.float32, g) for r in (b, b, m))
        ids = {name: torch.randint(0, max(b // 3, 1), (rows,), generator=g).to(self.device)
               for name, rows in (("query_ids", b), ("key_ids", b), ("negative_ids", m))}
        return self._case(lambda q, k, neg: fl.info_nce_loss(q, k, negatives=neg, tile_size=tile, **ids),
                          lambda q, k, neg: fl.reference.info_nce_loss(q, k, negatives=neg, **ids), [q, k, neg],
                          torch.float32)

    def mnrl_all_directions_fp32(self):
        torch, fl = self.torch, self.fl
        b, d, _, tile = self.shapes["pairs"]
        g = self._gen(25)
        q, pos, hard = (self._features(b, d, torch.float32, g) for _ in range(3))
        opts = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                    hardness_mode="in_batch_negatives", hardness_strength=5.0)
        return self._case(lambda q, p, n: fl.mnrl_loss(q, p, n, tile_size=tile, **opts),
                          lambda q, p, n: fl.reference.mnrl_loss(q, p, n, **opts), [q, pos, hard], torch.float32)

    def _siglip(self, dtype_name, reduction="mean"):
        torch, fl, dtype = self.torch, self.fl, self.dtypes[dtype_name]
        b, d, _, tile = self.shapes["pairs"]
        g = self._gen(23)
        img, txt = (self._leaf(torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1), dtype)
                    for _ in range(2))
        scale = torch.tensor(10.0, device=self.device, requires_grad=True)
        bias = torch.tensor(-10.0, device=self.device, requires_grad=True)
        upstream = torch.rand(b, generator=g).to(self.device) if reduction == "none" else None
        return self._case(lambda i, t, s, c: fl.siglip_loss(i, t, s, c, reduction=reduction, tile_size=tile),
                          lambda i, t, s, c: fl.reference.siglip_loss(i, t, s, c, reduction=reduction),
                          [img, txt, scale, bias], dtype, upstream)

    def siglip_fp32(self):
        return self._siglip("fp32")

    def siglip_bf16(self):
        return self._siglip("bf16")

    def siglip_none_fp32(self):
        return self._siglip("fp32", "none")


    # ------------------------------------------------------- other single passes

    def sampled_single_bf16(self):
        return self._single_pass(lambda: self._sampled("softmax", "bf16", False, 30, single_pass=True,
                                                       label_smoothing=0.1))

    def nce_single_fp32(self):
        return self._single_pass(lambda: self._sampled("nce", "fp32", False, 31, single_pass=True))

    def info_nce_single_bf16(self):
        torch, fl, dtype = self.torch, self.fl, self.dtypes["bf16"]
        b, d, m, _ = self.shapes["pairs"]
        g = self._gen(32)
        q, k, neg = (self._features(r, d, dtype, g) for r in (b, b, m))
        temp = torch.tensor(0.3, device=self.device, requires_grad=True)
        return self._single_pass(lambda: self._case(
            lambda q, k, neg, t: fl.info_nce_loss(q, k, negatives=neg, temperature=t, normalize=True),
            lambda q, k, neg, t: fl.reference.info_nce_loss(q, k, negatives=neg, temperature=t, normalize=True),
            [q, k, neg, temp], dtype))

    def nt_xent_single_fp32_blocks(self):
        fl = self.fl
        b, d, _, _ = self.shapes["pairs"]
        rows = max(2 * b, 3 * 1024)  # three blocks of >= 1024 rows
        h = self._features(rows, d, self.torch.float32, self._gen(33))
        budget = 4 * 1024 * rows
        return self._single_pass(lambda: self._case(
            lambda h: fl.nt_xent_loss(h, temperature=0.5, memory_budget=budget),
            lambda h: fl.reference.nt_xent_loss(h, temperature=0.5), [h], self.torch.float32))

    def clip_single_bf16(self):
        torch, fl, dtype = self.torch, self.fl, self.dtypes["bf16"]
        b, d, _, _ = self.shapes["pairs"]
        g = self._gen(34)
        img, txt = (self._leaf(torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1), dtype)
                    for _ in range(2))
        scale = torch.tensor(20.0, device=self.device, requires_grad=True)
        return self._single_pass(lambda: self._case(lambda i, t, s: fl.clip_loss(i, t, s),
                                                    lambda i, t, s: fl.reference.clip_loss(i, t, s),
                                                    [img, txt, scale], dtype))


if __name__ == "__main__":
    sys.exit(main())
