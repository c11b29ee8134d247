"""Dispatcher: `python experiments/bench_kernels.py --device cuda|cpu [options]`.

cuda → experiments/bench/gpu_kernels.py, cpu → experiments/bench/cpu_kernels.py (imported only when asked for);
the remaining arguments go to that script's `main(argv)`. `--help` after the device shows its options.
`--device cuda --compact [--help]` → experiments/bench/gpu_compact.py: the compacted batch-1 GEMV
(kernels/gpu/gemv_compact.py) next to the masked-load kernel and cuBLAS.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--compact", action="store_true")
    args, rest = ap.parse_known_args(argv)
    for p in (ROOT, os.path.join(ROOT, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    if args.compact and args.device != "cuda":
        raise SystemExit("--compact is a GPU benchmark (--device cuda)")
    name = "gpu_compact" if args.compact else f"{'gpu' if args.device == 'cuda' else 'cpu'}_kernels"
    if {"-h", "--help"} & set(rest):   # the script's help alone never named --device
        print(f"bench_kernels.py --device cuda|cpu (default cuda) [--compact, cuda]: --device {args.device} runs "
              f"experiments/bench/{name}.py, whose options follow\n")
    mod = importlib.import_module(f"experiments.bench.{name}")
    return mod.main(rest)


if __name__ == "__main__":
    main()
