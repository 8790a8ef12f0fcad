"""Combine several fusedloss-bench JSON files of the same rows into one
markdown table: per variant the fastest repeat over every run (the steady
state: on the 2-core CI VM some processes run 1.5-2x slow throughout, and a
process's first steps pay for fresh memory), the median peak memory, and
the two ratios (the reference's time over the fused op's, the fused op's
over its bare GEMMs'): the median over the runs of each run's paired ratio
(alternating steps in one process), with the runs' range of the GEMM ratio
in the last column.

    python benchmarks/combine_runs.py benchmarks/results/cpu-default*.json
"""
import json
import statistics
import sys

NAMES = {"linear_ce": "linear CE", "sampled_softmax": "sampled softmax", "nce": "NCE", "info_nce": "InfoNCE",
         "nt_xent": "NT-Xent", "clip": "CLIP", "siglip": "SigLIP"}


def _ms(ms):
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def main(paths):
    rows = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                rows.setdefault((row["op"], row["shape_str"]), []).append(row)
    print("| op | shape | fused | reference | bare GEMMs | vs GEMMs | vs reference | fused memory | reference memory "
          "| fused path | runs' vs GEMMs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for (op, shape), runs in rows.items():
        def best(variant):
            return min(min(r["variants"][variant]["full_ms_all"]) for r in runs)

        def memory(variant):
            return statistics.median(r["variants"][variant]["peak_extra_bytes"] for r in runs) / 2**20

        fused, reference, gemm = best("fused"), best("reference"), best("bare GEMMs")
        ratios = sorted(r["fused_over_gemm"] for r in runs)
        speedup = statistics.median(r["speedup"] for r in runs)
        print(f"| {NAMES.get(op, op)} | {shape} | {_ms(fused)} | {_ms(reference)} | {_ms(gemm)} "
              f"| {statistics.median(ratios):.2f}× "
              f"| {speedup:.2f}× | {memory('fused'):.0f} MiB | {memory('reference'):.0f} MiB "
              f"| {runs[0]['fused_path']} | {ratios[0]:.2f}–{ratios[-1]:.2f}× |")


if __name__ == "__main__":
    main(sys.argv[1:])
