"""Every compute-allocation analysis of one checkpoint, in one command.

    python experiments/analyses/run_all.py                                  # runs/LATEST
    python experiments/analyses/run_all.py --checkpoint runs/<run>/hf/final --threads 2
    python experiments/analyses/run_all.py --checkpoint ... --arc-limit 100 --skip tmux   # quicker

Runs, in order: activation_frequency (Fig. 4, 7, 8; Fig. 7 also at the run's first APR milestone when it
exists), token_compute (Fig. 5/9 and chat_capture.png), arc_compute (Fig. 6), kl_vs_apr (over the run's
milestones) and chat_capture (a tmux capture of the interactive chat). Everything lands in --out
(default runs/analyses/) with run_all.json: the checkpoint, each step's wall time and
the headline numbers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import activation_frequency  # noqa: E402
import arc_compute  # noqa: E402
import chat_capture  # noqa: E402
import kl_vs_apr  # noqa: E402
import token_compute  # noqa: E402
from common import add_common_args, describe, log, positive_int, setup  # noqa: E402

STEPS = ["frequency", "tokens", "arc", "kl", "tmux"]


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    p.add_argument("--rows", type=positive_int, default=8, help="held-out rows for frequencies and KL")
    p.add_argument("--arc-limit", type=positive_int, default=None, help="questions per ARC set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args(argv)
    out = setup(args)
    ckpt = str(Path(args.checkpoint))
    common = ["--checkpoint", ckpt, "--out", str(out), "--device", args.device]
    if args.threads:
        common += ["--threads", str(args.threads)]
    ms = [str(m) for m in kl_vs_apr.milestones(ckpt)[:-1]]
    steps = {
        "frequency": lambda: activation_frequency.main(common + ["--rows", str(args.rows)]
                                                       + (["--compare", ms[0]] if ms else [])),
        "tokens": lambda: token_compute.main(common + ["--max-new-tokens", str(args.max_new_tokens)]),
        "arc": lambda: arc_compute.main(common + (["--limit", str(args.arc_limit)] if args.arc_limit else [])),
        "kl": lambda: kl_vs_apr.main(common + ["--rows", str(args.rows)]),
        "tmux": lambda: chat_capture.main(common + ["--max-new-tokens", str(min(args.max_new_tokens, 80))]),
    }
    report = {"checkpoint": ckpt, "label": describe(ckpt), "milestones": ms, "steps": {}}
    from cwic_exp.files import dumps   # strict JSON: a NaN figure is null
    for name in STEPS:
        if name in args.skip:
            continue
        t0 = time.time()
        log(f"== {name}")
        res = steps[name]()
        report["steps"][name] = {"wall_s": round(time.time() - t0, 1), "result": res}
        (out / "run_all.json").write_text(dumps(report, indent=1, default=str))
    log(f"done: {out}")
    return report


if __name__ == "__main__":
    main()
