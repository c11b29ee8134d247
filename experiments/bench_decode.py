"""Dispatcher: `python experiments/bench_decode.py --device cuda|cpu [options]`.

cuda → experiments/bench/gpu_decode.py, cpu → experiments/bench/cpu_decode.py (imported only when asked for);
the remaining arguments go to that script's `main(argv)`. `--help` after the device shows its options.
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
    args, rest = ap.parse_known_args(argv)
    for p in (ROOT, os.path.join(ROOT, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    name = f"{'gpu' if args.device == 'cuda' else 'cpu'}_decode"
    if {"-h", "--help"} & set(rest):   # the script's help alone never named --device
        print(f"bench_decode.py --device cuda|cpu (default cuda): --device {args.device} runs "
              f"experiments/bench/{name}.py, whose options follow\n")
    mod = importlib.import_module(f"experiments.bench.{name}")
    return mod.main(rest)


if __name__ == "__main__":
    main()
