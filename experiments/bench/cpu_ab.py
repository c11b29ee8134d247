"""A/B of two builds of the CPU kernels in one process: decode time per token, old build vs this tree.

    python -m experiments.bench.cpu_ab --old 2e070bf                 # SmolLM2, 3× APR, 8 rounds
    python -m experiments.bench.cpu_ab --old HEAD~1 --apr 4 --rounds 12 --tokens 48
    python -m experiments.bench.cpu_ab --huge-pages                  # this tree: 4 KiB pages (old) vs huge (new)
    python -m experiments.bench.cpu_ab --old HEAD --model llama1b --tokens 12 --rounds 6
    python -m experiments.bench.cpu_ab --old HEAD --context 1024 --tokens 16   # a long chat's attention

Why: on a shared 2-core host the speed of separate benchmark runs swings by ±15 %, more than most kernel
changes. Here both builds run in the same process, interleaved run by run (the four decoders' order rotates by one
each round; `--fixed-order`: dense-old, dense-new, cwic-old, cwic-new), so slow phases of the host hit both alike; per-round ratios cancel them further.

`--old` is a git revision: its kernels/cpu is extracted to a temporary folder and built there (a separate
extension module; the build is cached by content like the tree's). `--huge-pages` instead compares this tree's
decoder without (old side) and with (new side) its huge-page weight arena (`CpuDecoder(huge_pages=...)`). Every configuration decodes the SAME
text: the prompt, then the dense model's greedy continuation fed token by token (teacher forcing), so the
two builds do the same work even where rounding differences would make them generate different tokens (a
calibrated, not trained, model is sensitive to that, and its decode-time APR depends on the text). Dense is
our kernel with every pair on; CWIC is SmolLM2-135M-Instruct converted with stripe 192 (or, with --model llama1b,
the Llama-3.2-1B-shaped random model with stripe 512) and calibrated to --apr (as bench_decode.py --device cpu
does). Prints a table of ms/token by part (medians) and a last-line JSON.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ("glue", "qkv", "attention", "o", "ffn", "head")


def import_old(rev: str, dest: str):
    """The CPU kernel package of git revision `rev`, extracted to dest and imported under a name of its own (not
    built yet): kernels/cpu as the subpackage `cpu` of a package that also holds the revision's kernels/reference.py
    (since 72294d9 the CPU package imports ACT_KINDS from `..reference`; loaded alone, that import failed)."""
    import importlib
    import uuid

    def git(*a, **kw):
        return subprocess.run(["git", "-C", ROOT, *a], check=True, capture_output=True, **kw).stdout

    pkg = f"cwic_kernels_ab_{uuid.uuid4().hex[:12]}"
    root = os.path.join(dest, pkg)
    os.makedirs(os.path.join(root, "cpu"), exist_ok=True)
    open(os.path.join(root, "__init__.py"), "w").close()
    if "reference.py" in git("ls-tree", "--name-only", f"{rev}:kernels", text=True).split():
        with open(os.path.join(root, "reference.py"), "wb") as fh:
            fh.write(git("show", f"{rev}:kernels/reference.py"))
    for f in git("ls-tree", "--name-only", f"{rev}:kernels/cpu", text=True).split():
        with open(os.path.join(root, "cpu", f), "wb") as fh:
            fh.write(git("show", f"{rev}:kernels/cpu/{f}"))
    sys.path.insert(0, dest)
    try:
        return importlib.import_module(f"{pkg}.cpu")
    finally:
        sys.path.remove(dest)


def load_old(rev: str, dest: str):
    """`import_old`, then its extension built (cached by content like the tree's) and loaded."""
    mod = import_old(rev, dest)
    ext = mod.load()
    if ext is None:
        raise SystemExit(f"the kernels of {rev} do not build: {mod.error()}")
    return ext


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default=None, help="git revision whose kernels/cpu is the A side")
    ap.add_argument("--huge-pages", action="store_true",
                    help="instead of two builds: this tree with 4 KiB pages (old) vs the huge-page arena (new)")
    ap.add_argument("--apr", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="forced tokens timed per run")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--model", choices=("smollm2", "llama1b"), default="smollm2",
                    help="llama1b: bench_decode.py's Llama-3.2-1B-shaped random model (stripe 512)")
    ap.add_argument("--layers", type=int, default=16, help="llama1b: layers (fewer: a quicker, smaller stand-in)")
    ap.add_argument("--context", type=int, default=0,
                    help="the prompt repeated to this many tokens (a long chat: the attention reads more cache)")
    ap.add_argument("--fixed-order", action="store_true",
                    help="every round in the order dense-old, dense-new, cwic-old, cwic-new (the default "
                         "rotates the order by one each round)")
    args = ap.parse_args(argv)
    if args.huge_pages == (args.old is not None):
        ap.error("give either --old REV or --huge-pages")
    if args.context < 0:
        ap.error(f"--context: a number of tokens ≥ 0, got {args.context}")
    for p in (ROOT, os.path.join(ROOT, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import torch

    import cwic_exp
    import cwic_exp.cpu_decode as CD
    from experiments.bench.cpu_decode import forced_setup, huge_mb, timed_forced
    from experiments.bench.cpu_kernels import machine, rotated
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="cwic_ab_")
    new_ext = CD._ext()
    old_ext = new_ext if args.huge_pages else load_old(args.old, tmp)
    okw, nkw = (dict(huge_pages=False), dict(huge_pages=True)) if args.huge_pages else ({}, {})
    label = "this tree, 4 KiB pages" if args.huge_pages else args.old
    model, prompt, ids, mask, stripe, name = forced_setup(args.model, args.layers)
    if args.context > len(prompt):
        prompt = (prompt * (args.context // len(prompt) + 1))[:args.context]
    max_len = len(prompt) + args.tokens + 8

    def build(ext, **kw):   # CpuDecoder takes its extension from CD._ext()
        saved = CD._ext
        CD._ext = lambda: ext
        try:
            return CD.CpuDecoder(model, dtype=torch.bfloat16, max_len=max_len, **kw)
        finally:
            CD._ext = saved

    decs = {"dense-old": build(old_ext, mode="dense", dense="own", **okw),
            "dense-new": build(new_ext, mode="dense", dense="own", **nkw)}
    forced = decs["dense-new"].generate(prompt, args.tokens)[len(prompt):]
    cwic_exp.to_cwic(model, stripe_size=stripe)
    st = CD.calibrate_apr(model, ids, args.apr, attention_mask=mask, stats=True, cache={})
    decs["cwic-old"] = build(old_ext, mode="cwic", **okw)
    decs["cwic-new"] = build(new_ext, mode="cwic", **nkw)
    huge = {k: huge_mb(d) for k, d in decs.items()}
    print("weights on huge pages: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in huge.items()))
    print(f"A/B {label} (old) vs this tree (new): {name}, CWIC calibrated to APR {st['apr']:.2f}, "
          f"{len(prompt)}-token prompt + {len(forced)} forced tokens, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads", flush=True)

    res = {k: {p: [] for p in PARTS + ("total", "reads")} for k in decs}
    for r in range(args.rounds):
        # the order rotates each round: over 4 rounds every decoder takes every place once (it used to swap new
        # and old only, so dense always ran before CWIC)
        order = list(decs) if args.fixed_order else rotated(list(decs), r)
        for k in order:
            for p, v in timed_forced(decs[k], prompt, forced).items():
                res[k][p].append(v)
            a, f, h, n = decs[k]._dec.reads()
            res[k]["reads"].append((a + f + h) / n / 1e6)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {res[k]['total'][-1]:.2f} ms" for k in order),
              flush=True)
    med = {k: {p: statistics.median(v) for p, v in res[k].items()} for k in decs}
    cols = PARTS + ("total", "reads")
    print("\n| config | " + " | ".join(f"{c} ms" if c != "reads" else "M weights read" for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for k in decs:
        print(f"| {k} | " + " | ".join(f"{med[k][c]:.3f}" for c in cols) + " |")
    out = {"bench": "cpu_ab", "old": label, "model": name, "stripe": stripe,
           "huge_pages_new": decs["cwic-new"].arena is not None and decs["cwic-new"].arena.bytes_advised > 0,
           "huge_page_mb": huge,
           "apr_calib": st["apr"], "prompt_tokens": len(prompt), "rounds": args.rounds, "forced_tokens": len(forced),
           "machine": machine(), "ms_per_token": med}
    for side in ("old", "new"):
        d, c = res[f"dense-{side}"]["total"], res[f"cwic-{side}"]["total"]
        out[f"speedup_{side}"] = statistics.median(d) / statistics.median(c)
        out[f"speedup_{side}_paired"] = statistics.median([a / b for a, b in zip(d, c)])
        print(f"{side}: CWIC over dense {out[f'speedup_{side}']:.3f}× (medians), "
              f"{out[f'speedup_{side}_paired']:.3f}× (median of per-round ratios)")
    for k in ("dense", "cwic"):
        o, n = res[f"{k}-old"]["total"], res[f"{k}-new"]["total"]
        out[f"{k}_new_over_old"] = statistics.median([a / b for a, b in zip(o, n)])
        print(f"{k}: new build {out[f'{k}_new_over_old']:.3f}× the speed of the old (median of per-round ratios)")
    from cwic_exp.files import dumps   # strict JSON: a missing figure (NaN) is null
    print(dumps(out))
    return out


if __name__ == "__main__":
    main()
