#!/usr/bin/env python
"""Bring a trained checkpoint back from a GPU box whose commands return only a few small files.

    python experiments/ckpt_transport.py pack  runs/x/hf/final /root/stash/pack   # on the box
    python experiments/ckpt_transport.py take  /root/stash/pack "$OUT" 0 4         # parts 0-3 into $OUT
    python experiments/ckpt_transport.py unpack parts_dir/ runs/x/hf/final        # here, every part gathered

`pack` writes a copy of the folder (an HF export: config, tokenizer, model.safetensors) as numbered parts of at
most --part-mib MiB and a `manifest.json`. The 2-D floating `*.weight` tensors are stored in bf16 (--weights
bf16, the default; `keep` stores every tensor as it is): the decoders here run bf16 weights anyway, and fp32
master weights would double the bytes. Every other tensor (θ, running statistics, folded biases) keeps its
dtype. The folder is put in one tar, its bytes split into even and odd planes (a bf16 value's high byte, sign
and exponent, compresses well; its low byte barely), compressed in chunks with zlib in parallel, and the
concatenated chunks cut into parts. `unpack` checks every part's and the tar's SHA-256 and refuses a partial
or corrupted set with the list of what is missing, then writes the folder atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CHUNK = 24 << 20          # input bytes compressed as one zlib stream
MANIFEST = "manifest.json"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _convert_safetensors(src: Path, dst: Path, weights: str) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    state = load_file(str(src))
    cast = 0
    if weights == "bf16":
        for k, t in state.items():
            if k.endswith("weight") and t.dim() == 2 and t.is_floating_point() and t.dtype != torch.bfloat16:
                state[k] = t.to(torch.bfloat16)
                cast += 1
    save_file(state, str(dst), metadata={"format": "pt"})
    return {"tensors": len(state), "cast_to_bf16": cast}


def _tar_folder(src: Path, weights: str) -> tuple[bytes, dict]:
    info = {}
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "ckpt"
        shutil.copytree(src, staged, ignore=shutil.ignore_patterns("*.safetensors"))
        for f in sorted(src.rglob("*.safetensors")):
            rel = f.relative_to(src)
            info[str(rel)] = _convert_safetensors(f, staged / rel, weights)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for p in sorted(staged.rglob("*")):
                tar.add(p, arcname=str(p.relative_to(staged)), recursive=False)
        return buf.getvalue(), info


def _planes(b: bytes) -> bytes:
    import numpy as np
    a = np.frombuffer(b + (b"\0" if len(b) % 2 else b""), dtype=np.uint8)
    return np.concatenate([a[0::2], a[1::2]]).tobytes()


def _unplanes(b: bytes, n: int) -> bytes:
    import numpy as np
    a = np.frombuffer(b, dtype=np.uint8)
    half = len(a) // 2
    out = np.empty(len(a), dtype=np.uint8)
    out[0::2], out[1::2] = a[:half], a[half:]
    return out.tobytes()[:n]


def pack(src: str | Path, out: str | Path, part_mib: float = 15.5, weights: str = "bf16", jobs: int = 0) -> dict:
    src, out = Path(src), Path(out)
    if not part_mib > 0 or not math.isfinite(part_mib):
        raise SystemExit(f"pack: --part-mib must be a positive size in MiB, got {part_mib}")
    if not (src / "config.json").exists():
        raise SystemExit(f"pack: {src} is not a checkpoint folder (no config.json)")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise SystemExit(f"pack: the parts folder {out} must lie outside the checkpoint {src} (it is replaced)")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise SystemExit(f"pack: {out} holds files but no {MANIFEST}: not replacing it")
    tar, info = _tar_folder(src, weights)
    planes = _planes(tar)
    chunks = [planes[i:i + CHUNK] for i in range(0, len(planes), CHUNK)]
    workers = jobs or min(len(chunks), os.cpu_count() or 1)
    if workers <= 1:
        comp = [zlib.compress(c, 6) for c in chunks]
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            comp = list(ex.map(zlib.compress, chunks, [6] * len(chunks)))
    stream = b"".join(comp)
    part = int(part_mib * (1 << 20))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    parts = []
    for j, i in enumerate(range(0, len(stream), part)):
        name = f"part{j:03d}.bin"
        body = stream[i:i + part]
        (out / name).write_bytes(body)
        parts.append({"name": name, "bytes": len(body), "sha256": _sha(body)})
    man = {"source": str(src), "weights": weights, "tar_bytes": len(tar), "tar_sha256": _sha(tar),
           "chunks": [len(c) for c in comp], "parts": parts, "safetensors": info,
           "compressed_bytes": len(stream), "ratio": round(len(stream) / max(len(tar), 1), 4)}
    (out / MANIFEST).write_text(json.dumps(man, indent=1))
    return man


def take(pack_dir: str | Path, out: str | Path, first: int, count: int) -> list[str]:
    """Copy parts [first, first + count) and the manifest into `out` (a box command's return folder)."""
    pack_dir, out = Path(pack_dir), Path(out)
    man = json.loads((pack_dir / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(pack_dir / MANIFEST, out / MANIFEST)
    names = [p["name"] for p in man["parts"][first:first + count]]
    for n in names:
        shutil.copy(pack_dir / n, out / n)
    return names


def unpack(parts_dirs: list[str | Path], dest: str | Path) -> Path:
    dirs = [Path(d) for d in parts_dirs]
    mans = [d / MANIFEST for d in dirs if (d / MANIFEST).exists()]
    if not mans:
        raise SystemExit(f"unpack: no {MANIFEST} in {', '.join(map(str, dirs))}")
    man = json.loads(mans[0].read_text())
    found, missing, bad = {}, [], []
    for p in man["parts"]:
        where = [d / p["name"] for d in dirs if (d / p["name"]).exists()]
        if not where:
            missing.append(p["name"])
            continue
        body = where[0].read_bytes()
        if len(body) != p["bytes"] or _sha(body) != p["sha256"]:
            bad.append(p["name"])
        found[p["name"]] = body
    if missing or bad:
        raise SystemExit(f"unpack: {len(man['parts'])} parts expected; missing {missing or 'none'}, "
                         f"corrupted {bad or 'none'}")
    stream = b"".join(found[p["name"]] for p in man["parts"])
    if len(stream) != sum(man["chunks"]):
        raise SystemExit(f"unpack: the parts hold {len(stream):,} bytes, the manifest's chunks {sum(man['chunks']):,}: "
                         f"an incomplete pack")
    comp, at = [], 0
    for n in man["chunks"]:
        comp.append(stream[at:at + n])
        at += n
    planes = b"".join(zlib.decompress(c) for c in comp)
    tar = _unplanes(planes, man["tar_bytes"])
    if _sha(tar) != man["tar_sha256"]:
        raise SystemExit("unpack: the reassembled archive does not match its checksum")
    dest = Path(dest).resolve()
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / "config.json").exists())):
        raise SystemExit(f"unpack: {dest} exists and is not a checkpoint folder: not replacing it")
    from cwic_exp.files import replace_folder, tmp_path
    tmp = tmp_path(dest)     # this process's own staging name: a folder of someone else's beside dest is left alone
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r") as t:
            t.extractall(tmp, filter="data")
        return replace_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="checkpoint folder -> parts + manifest")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--part-mib", type=float, default=15.5)
    p.add_argument("--weights", choices=["bf16", "keep"], default="bf16")
    t = sub.add_parser("take", help="copy parts [first, first + count) and the manifest to a folder")
    t.add_argument("pack_dir")
    t.add_argument("out")
    t.add_argument("first", type=int)
    t.add_argument("count", type=int)
    u = sub.add_parser("unpack", help="parts (from one or more folders) -> checkpoint folder")
    u.add_argument("parts", nargs="+", help="folders holding the parts; the last argument is the destination")
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        man = pack(a.src, a.out, a.part_mib, a.weights)
        print(f"packed {a.src}: {man['tar_bytes'] / 2**20:.1f} MiB -> {man['compressed_bytes'] / 2**20:.1f} MiB "
              f"in {len(man['parts'])} parts (ratio {man['ratio']})")
        print(json.dumps({"parts": len(man["parts"]), "ratio": man["ratio"], "tar_sha256": man["tar_sha256"]}))
    elif a.cmd == "take":
        print(" ".join(take(a.pack_dir, a.out, a.first, a.count)) or "(no parts in that range)")
    else:
        if len(a.parts) < 2:
            ap.error("unpack needs at least one parts folder and the destination")
        dest = unpack(a.parts[:-1], a.parts[-1])
        print(f"unpacked into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
