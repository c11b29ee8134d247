"""Writes that a kill cannot leave half done (no heavy imports: the GPU box's scripts use them too)."""
from __future__ import annotations

import glob
import hashlib
import json
import math
import numbers
import os
import shutil
import socket
from pathlib import Path

import torch

# temporary files are named by host and process: ranks of several nodes may share a file system (and PIDs)
_HOST = socket.gethostname().replace("/", "_") or "host"


def tmp_path(path: Path) -> Path:
    """`.NAME.tmp-HOST-PID` beside `path`: this process's temporary file (or folder) for it."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


_FINGERPRINTS: dict = {}


def fingerprint(path) -> str:
    """What cache keys read of a source file: "SIZE-sha" + 16 hex digits of its SHA-256. An edited or replaced file
    gets another; the same bytes installed again (a new venv: a new time) the same, so caches survive reinstalls.
    Hashed once a process for a given (path, size, time): 98 MB take about 0.07 s here."""
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if memo not in _FINGERPRINTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FINGERPRINTS[memo] = f"{st.st_size}-sha{h.hexdigest()[:16]}"
    return _FINGERPRINTS[memo]


def replace_folder(tmp: Path, folder: Path) -> Path:
    """Put the finished folder `tmp` in place of `folder`: its files fsynced, the old one moved aside first, then
    removed, so a kill or a power loss leaves either folder whole (the old one as `.NAME.old-HOST-PID` at worst),
    never a half-written one. The aside name is this process's own: a sibling `NAME.old` of the user's is not
    touched."""
    old = folder.with_name(f".{folder.name}.old-{_HOST}-{os.getpid()}")
    fsync_tree(tmp)                 # its files on disk before its name is: the old folder goes after the rename
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable: without it a power loss can bring back the old name (or none) even after
    the file's own fsync. Skipped where directories cannot be opened or synced (Windows, some file systems); an
    I/O error is raised."""
    import errno
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder) -> None:
    """fsync every file under `folder`, then every folder (deepest first): written by others (save_pretrained), then
    renamed into place."""
    for root, dirs, names in os.walk(folder, topdown=False):
        for name in names:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def save_atomic(obj, path) -> Path:
    """`torch.save` to a temporary file beside `path`, fsynced, then renamed over it, and the rename fsynced: a kill
    or a power loss during the write leaves the previous file whole (and a `.NAME.tmp-HOST-PID` that the next
    successful write on that host removes once PID is gone; a concurrent writer's file, or another host's, is left
    to it)."""
    path = _write_then_rename(path, "wb", lambda f: torch.save(obj, f))
    # left by a write that was killed (not a live one's); the name matched literally (it may hold [ or *)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        rest = stale.name[len(f".{path.name}.tmp-"):]
        host, _, pid = rest.rpartition("-")
        if host in (_HOST, "") and not _alive(pid):          # "": the PID-only names written before 2026-12-04
            stale.unlink(missing_ok=True)
    return path


def write_text_atomic(path, text: str) -> Path:
    """`path.write_text(text, encoding="utf-8")` through a `.NAME.tmp-HOST-PID` beside it and one rename: a reader (another rank, a
    later command), or the file after a power loss, holds the old text or the new, never a part."""
    return _write_then_rename(path, "w", lambda f: f.write(text))


def json_safe(obj):
    """obj with every non-finite number as None (null), through dicts, lists and tuples; numpy's float scalars become
    floats. JSON has no NaN or infinity: json.dumps would write tokens that strict parsers (JSON.parse, jq) refuse."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):
        obj = float(obj)
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """json.dumps(json_safe(obj), **kw), strict: a missing figure (a NaN) is written as null. `default=` still
    converts other objects; one that converts to a non-finite float raises ValueError instead of writing NaN."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def _write_then_rename(path, mode: str, write) -> Path:
    """write(f) into this process's temporary file beside `path`, fsynced, renamed over `path`, the rename fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:       # another user's process
        return True
    return True
