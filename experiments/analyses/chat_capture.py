"""Terminal capture of a real interactive chat: `python -m cwic_exp.chat` inside tmux, rendered to PNG.

    python experiments/analyses/chat_capture.py --checkpoint runs/<run>/hf/final --threads 1

Starts the interactive chat in a detached tmux session of --cols × --lines, types the prompts as a user
would (waiting for each reply), captures the pane with its colours (`tmux capture-pane -e`), and writes
chat_tmux.ansi (the raw capture: `cat` it in a truecolor terminal) and chat_tmux.png (the capture drawn
with matplotlib on a dark terminal background).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

from common import ROOT, add_common_args, log, setup

PROMPTS = ["What is the distance between the points (5,8) and (9,9)?",
           "Write a haiku about the sea."]


def tmux(*a, check=True) -> str:
    return subprocess.run(["tmux", *a], check=check, capture_output=True, text=True).stdout


def main(argv=None):
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--cols", type=int, default=120)
    p.add_argument("--lines", type=int, default=60)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--backend", default=None, choices=["hf", "cpu", "engine"],
                   help="the chat's decoding backend (default: cpu, the C++ sparse kernels with bf16 weights, on a "
                        "CPU where they build; else hf)")
    args = p.parse_args(argv)
    out = setup(args)
    if args.backend is None:
        args.backend = "hf"
        if args.device == "cpu":
            from cwic_kernels import cpu as C
            args.backend = "cpu" if C.load() is not None else "hf"
    if shutil.which("tmux") is None:
        log("tmux not found: skipping the terminal capture (token_compute.py draws chat_capture.png)")
        return None
    session = f"cwic_capture_{os.getpid()}"
    cmd = [sys.executable, "-m", "cwic_exp.chat", "--model", str(args.checkpoint), "--device", args.device,
           "--backend", args.backend, "--max-new-tokens", str(args.max_new_tokens)] \
        + (["--dtype", "bfloat16"] if args.backend in ("cpu", "engine") else []) \
        + (["--threads", str(args.threads)] if args.threads else [])
    shell = f"cd {shlex.quote(str(ROOT))} && COLORTERM=truecolor {shlex.join(cmd)}; sleep 600"
    tmux("new-session", "-d", "-s", session, "-x", str(args.cols), "-y", str(args.lines), shell)
    try:
        def wait_prompts(n):
            t0 = time.time()
            while time.time() - t0 < args.timeout:
                pane = tmux("capture-pane", "-p", "-t", session, "-S", "-")
                if pane.count("you>") >= n:
                    return pane
                time.sleep(1.0)
            raise TimeoutError(f"the chat did not come back within {args.timeout}s:\n{pane}")
        wait_prompts(1)
        for i, prompt in enumerate(args.prompt or PROMPTS):
            tmux("send-keys", "-t", session, "-l", prompt)
            tmux("send-keys", "-t", session, "Enter")
            wait_prompts(i + 2)
            log(f"turn {i + 1} done")
        ansi = tmux("capture-pane", "-p", "-e", "-t", session, "-S", "-")
    finally:
        tmux("kill-session", "-t", session, check=False)
    ansi = "\n".join(ansi.rstrip("\n").splitlines()).rstrip() + "\n"
    (out / "chat_tmux.ansi").write_text(ansi)
    from render import ansi_segments, render_png
    render_png(ansi_segments(ansi), out / "chat_tmux.png", width=args.cols,
               title=f"tmux capture: python -m cwic_exp.chat --model {args.checkpoint} --backend {args.backend}",
               page_bg="#1e1e1e", page_fg="#dddddd")
    log(f"wrote {out / 'chat_tmux.png'}")
    return str(out / "chat_tmux.png")


if __name__ == "__main__":
    main()
