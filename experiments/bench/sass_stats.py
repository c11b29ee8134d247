"""What a Triton kernel costs in instructions, without a GPU: compile it for sm_90 with Triton's own ptxas and count.

    python experiments/bench/sass_stats.py                               # the one-launch FFN, tuned tiles
    python experiments/bench/sass_stats.py num_warps=8 block_g=256       # other tiles (ffn_updown_config keys)
    CWIC_EVICT_FIRST=0 python experiments/bench/sass_stats.py            # environment switches of the kernels too

At batch 1 the decode kernels are bound by each warp's chain of instructions more than by bandwidth (ncu on the H200,
`experiments/results/gpu_h200/ffn_structure_2026-12-03/`: the one-launch FFN issues 5.3 M instructions, 0.36 a cycle
per scheduler, at two warps a scheduler because 245 registers a thread leave room for two programs an SM). The
registers and the instructions of each loop body decide much of its time, and both can be read off the compiled
code on any machine with Triton installed: no device time. The kernel is compiled with the arguments the decode
engine passes (Llama-3.2-1B shapes, bf16, fused norm, hand-offs on, PDL), the same specialisation (16-divisible sizes
and pointers) that Triton gives it at run time, so with the device's Triton version (3.6 on the H200 box) the
registers equal ncu's. Prints a table per kernel and, last, a JSON line.

It also prints how Triton laid out the weight tiles (the `evict_first` loads of the TTGIR): which dimension the
warps split decides whether a reduction over it crosses warps (shared memory and a barrier) or stays in one. The
layout depends on the Triton version: a tile that Triton 3.9 split by rows, Triton 3.6 split by columns
(`experiments/results/gpu_h200/warp_units_2026-12-03/`). To read what the H200 box compiles, run this with its
Triton: `pip install --no-deps --target /tmp/t36 triton==3.6.0`, then `PYTHONPATH=/tmp/t36 python
experiments/bench/sass_stats.py`.

Static counts: a loop body's instructions run once per step, the rest once per program. Not a timing: a change that
cuts instructions can still lose on the device (the evict_first policy costs 6 % of the FFN's loop instructions, yet
decode was 5 % slower without it), so a candidate goes to `gpu_tune_decode.py` next.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the one-launch FFN's pointer arguments and their element types in the decode engine (bf16 model)
FFN_PTRS = dict(X="*bf16", GWT="*bf16", GMEAN="*fp32", GTHR="*fp32", GBIAS="*fp32", UTHR="*fp32", UP="*bf16",
                DOWNT="*bf16", A="*fp32", RES="*bf16", Y="*bf16", GIDX="*i32", GVAL="*fp32", IDX="*i32",
                YACC="*fp32", ARR="*i32", NW="*bf16", XACC="*fp32", YOUT="*fp32", NREAD="*i64",
                TIMES="*i64")
FFN_SCALARS = dict(D="i32", F="i32", STRIPE="i32", stride_mk="i32", eps="fp32")


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"{name} not found at {path}: this Triton install has no NVIDIA tools")
    return path


def parse_value(v: str):
    if v in ("True", "False", "true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return v


def programs_per_sm(regs: int, warps: int) -> int:
    """Programs (CTAs) of `warps` warps that fit an sm_90 SM by registers: 4 sub-partitions of 16384 registers,
    allocated 256 at a time per warp; at most 64 warps and 32 programs an SM."""
    per_warp = -(-regs * 32 // 256) * 256
    return min((16384 // per_warp) * 4 // warps, 64 // warps, 32)


def compile_ffn(overrides: dict, d: int = 2048, F: int = 8192, arch: int = 90):
    """The engine's one-launch FFN (`ffn_fused._ffn_gate_updown_kernel`) for sm_<arch>: (compiled kernel, config)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cwic_kernels.gpu import ffn_fused as FF
    from cwic_kernels.gpu.gemv import act_code
    cfg = FF.ffn_updown_config(d, F, **{**FF.TUNED_UPDOWN.get((d, F), {}), **overrides})
    kern = FF._ffn_gate_updown_kernel
    names = list(kern.arg_names)
    const = dict(BLOCK_U=cfg["BLOCK_U"], BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"], BLOCK_G=cfg["BLOCK_G"],
                 COPIES=cfg["COPIES"], HAS_RES=True, EVEN_D=cfg["BLOCK_D"] == d, EVEN_U=F % cfg["BLOCK_U"] == 0,
                 NORM=True, PIPE=cfg["PIPE"], ACT=act_code("silu", torch.bfloat16), HAS_BIAS=True, USE_PDL=True,
                 X_ACC=True, Y_ACC=True, COUNT=False, TIMED=False)
    unknown = [n for n in names if n not in const and n not in FFN_PTRS and n not in FFN_SCALARS]
    if unknown:
        raise SystemExit(f"sass_stats does not know the FFN kernel's arguments {unknown}: add them above")
    sig = {n: "constexpr" if n in const else FFN_PTRS.get(n) or FFN_SCALARS[n] for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in FFN_PTRS or n in ("D", "F", "STRIPE", "stride_mk")}
    src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return k, cfg


def sass_stats(cubin: bytes) -> dict:
    """Registers, stack, and the instruction counts (total, per backward-branch loop body, by opcode) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    res = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = len(ins)
            pending = []
            ins.append((addr, m.group(2)))

    def opcode(text: str) -> str:
        parts = text.split()
        op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
        return op.split(".")[0]

    def mix(seg) -> dict:
        return dict(collections.Counter(opcode(t) for _, t in seg).most_common(8))

    loops = []
    for i, (_, text) in enumerate(ins):
        m = re.search(r"BRA.*\(\.(L_x_\d+)\)", text)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = ins[labels[m.group(1)]:i + 1]
            loops.append(dict(start=f"{body[0][0]:#x}", end=f"{body[-1][0]:#x}", instructions=len(body),
                              top=mix(body)))
    if res.get("reg") is None or not ins:
        raise SystemExit("sass_stats: could not read the registers or the instructions of the cubin (cuobjdump / "
                         "nvdisasm output changed?)")
    return dict(registers=res.get("reg"), stack=res.get("stack"), instructions=len(ins), top=mix(ins), loops=loops)


def weight_layouts(ttgir: str) -> list[dict]:
    """The distinct (tile shape, blocked layout) pairs of the kernel's weight loads (`evict_first`) in its TTGIR."""
    defs = {}
    for m in re.finditer(r"^(#blocked\d*) = #ttg\.blocked<\{(.*?)\}>", ttgir, re.M):
        defs[m.group(1)] = {k: [int(v) for v in vals.split(",")]
                            for k, vals in re.findall(r"(\w+) = \[([\d, ]+)\]", m.group(2))}
    seen, out = set(), []
    for line in ttgir.splitlines():
        if "tt.load" not in line or "evict_first" not in line:
            continue
        m = re.search(r"tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#blocked\d*)>", line)
        if m and (m.group(1), m.group(3)) not in seen:
            seen.add((m.group(1), m.group(3)))
            out.append(dict(shape=[int(v) for v in m.group(1).split("x")], dtype=m.group(2), **defs.get(m.group(3), {})))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tiles", nargs="*", help="key=value overrides of ffn_fused.ffn_updown_config (e.g. num_warps=8)")
    ap.add_argument("--arch", type=int, default=90, choices=[90], help="compute capability ×10 (90: H100/H200; "
                    "the programs-an-SM figure assumes sm_90's register file)")
    args = ap.parse_args(argv)
    over = {}
    for t in args.tiles:
        if "=" not in t:
            raise SystemExit(f"tile overrides are key=value, got {t!r}")
        k, v = t.split("=", 1)
        over[k] = parse_value(v)
    os.environ.pop("TRITON_INTERPRET", None)   # compile for the GPU, not the CPU interpreter
    from gpu_kernels import ensure_imports
    ensure_imports()
    import triton
    k, cfg = compile_ffn(over, arch=args.arch)
    st = sass_stats(k.asm["cubin"])
    warps = cfg["num_warps"]
    regs = st["registers"]
    per_sm = programs_per_sm(regs, warps)
    lines = [f"# SASS of the one-launch FFN (sm_{args.arch}, Triton {triton.__version__}, Llama-3.2-1B shapes, bf16)",
             f"tiles: {json.dumps({k_: v for k_, v in cfg.items() if k_ != 'grid'})}",
             "", "| registers | stack | programs an SM (registers) | warps a program | instructions |",
             "|---|---|---|---|---|",
             f"| {regs} | {st['stack']} | {per_sm} | {warps} | {st['instructions']} |", "",
             "| loop body | instructions a step | most frequent |", "|---|---|---|"]
    lines += [f"| {lp['start']}–{lp['end']} | {lp['instructions']} | "
              f"{', '.join(f'{o} {n}' for o, n in list(lp['top'].items())[:6])} |" for lp in st["loops"]]
    lay = weight_layouts(k.asm["ttgir"])
    lines += ["", "| weight tile | sizePerThread | threadsPerWarp | warpsPerCTA | order |", "|---|---|---|---|---|"]
    lines += [f"| {'×'.join(map(str, t['shape']))} {t['dtype']} | {t.get('sizePerThread')} | {t.get('threadsPerWarp')} | "
              f"{t.get('warpsPerCTA')} | {t.get('order')} |" for t in lay]
    print("\n".join(lines))
    print(json.dumps(dict(bench="sass_stats", kernel="_ffn_gate_updown_kernel", arch=args.arch,
                          triton=triton.__version__, overrides=over, programs_per_sm=per_sm, weight_layouts=lay,
                          **st)))
    return st


if __name__ == "__main__":
    main()
