"""Subprocess entry of the CPU memory measurement: ``python -m
fusedloss.bench.worker SPEC.json`` measures one variant in a fresh process and
prints its result as the last line of stdout (JSON)."""
import json
import sys

from .measure import run_worker_spec


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    print(json.dumps(run_worker_spec(spec)), flush=True)


if __name__ == "__main__":
    main()
