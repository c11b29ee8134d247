"""GPU chat backends: tokens/s of one token at a time with per-token figures, on a Llama-3.2-1B-shaped CWIC model.

    python experiments/bench/gpu_chat_engine.py                       # APR 3, 64 tokens a way
    python experiments/bench/gpu_chat_engine.py --apr 3 --tokens 128 --out experiments/results/gpu_h200/chat_...

Random weights (bf16), stripe 512, thresholds calibrated to the APR as in `gpu_decode.py`. The same token sequence
(the CWIC engine's own greedy continuation of a random prompt) is fed four ways, one token a step:

- `engine, graph, no count`: `DecodeEngine.decode` (the decode benchmark's path, nothing counted, no host sync);
- `engine backend`: `cwic_exp.chat.EngineBackend.forward`, the chat's `--backend engine`: one CUDA-graph replay a
  token with the kernels counting what they read, the counter read back after each token (a host sync), the
  logits copied;
- `engine feed, count off` (a control): the same loop through `DecodeEngine.feed` without counting, with the same
  wait for the step after each token (the difference to the row above: the counting atomics, the counter's
  read-back and the logits copy);
- `hf backend`: `cwic_exp.chat.HFBackend.forward`, the Hugging Face incremental decoder with masked dense
  products and the accounting hooks (the chat's default).

The figures of the engine backend are compared with the HF backend's on the same tokens (bf16: a threshold can flip
where two sums differ in the last bit, so the share of equal figures and the relative difference of their sums are
reported). Prints a table; LAST line JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernels import dumps, ensure_imports, save_outputs  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--apr", type=float, default=3.0)
    ap.add_argument("--tokens", type=int, default=64, help="tokens fed a way (after the prompt)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)  # tiny model on the CPU
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.prompt_len < 1:
        ap.error("--tokens must be at least 2 and --prompt-len at least 1")
    ensure_imports()
    import gpu_decode as GD
    import cwic_exp
    from cwic_exp.chat import EngineBackend, HFBackend
    from cwic_exp.engine import DecodeEngine
    size, stripe = ("tiny", 32) if args.dry_run else ("1B", 512)
    if args.dry_run:
        args.tokens, args.prompt_len = min(args.tokens, 6), min(args.prompt_len, 6)
    else:
        assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cpu" if args.dry_run else "cuda")
    gpu = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(dev)
    model = GD.build_model(size, dev)
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, V, (args.prompt_len,), generator=g).to(dev)
    calib = torch.randint(0, V, (1, 256), generator=g).to(dev)
    cwic_exp.to_cwic(model, stripe_size=stripe)
    z = GD.collect_calibration(model, calib)
    GD.calibrate_density(model, z, calib, args.apr)
    n_all = args.prompt_len + args.tokens
    eng = DecodeEngine(model, max_len=n_all + 8)
    seq = eng.generate(prompt, args.tokens + 1)[:n_all].tolist()   # the sequence every way feeds
    apr = GD.measure_apr(model, torch.tensor([seq], device=dev))["apr"]
    rows = []

    def timed(name, feed_prompt, feed_one):
        feed_prompt(seq[:args.prompt_len])
        _sync()
        t0 = time.perf_counter()
        out = [feed_one(t) for t in seq[args.prompt_len:]]
        _sync()
        dt = time.perf_counter() - t0
        rows.append(dict(way=name, tokens_per_s=args.tokens / dt, ms_per_token=dt / args.tokens * 1e3))
        print(f"[{name}] {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
        return out

    # 1) the benchmark's path: graph replays, nothing counted (decode() feeds back its own argmax = seq)
    eng.generate(prompt, 4)                       # warm
    eng.prefill(torch.tensor(seq[:args.prompt_len], device=dev))
    _sync()
    t0 = time.perf_counter()
    eng.decode(args.tokens)
    _sync()
    dt = time.perf_counter() - t0
    rows.append(dict(way="engine, graph, no count", tokens_per_s=args.tokens / dt, ms_per_token=dt / args.tokens * 1e3))
    print(f"[graph] {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    del eng

    def chat_way(name, backend):
        """A chat backend fed the sequence (after a warm-up, which compiles and captures): its figures."""
        figs = []
        backend.forward(seq[:4])

        def prompt_(ids):
            backend.reset()
            figs.extend(backend.forward(ids)[1])

        timed(name, prompt_, lambda t: figs.extend(backend.forward([t])[1]))
        return figs

    # 2) the chat's engine backend (counting)
    be = EngineBackend(model, max_len=n_all + 8)
    figs_engine = chat_way("engine backend (counts)", be)

    # 3) control: the same loop without counting
    eng2 = be.engine
    eng2.count_reads = False
    eng2.graph = None                             # re-captured without the counting kernels
    pos = [0]

    def c_prompt(ids):
        pos[0] = 0
        for t in ids:
            eng2.feed(t, pos[0])
            pos[0] += 1

    def c_one(t):
        lg = eng2.feed(t, pos[0])
        _sync()                                   # the backend waits for each step too
        pos[0] += 1
        return lg

    c_prompt(seq[:4])
    timed("engine feed, count off", c_prompt, c_one)
    del be, eng2
    if not args.dry_run:
        torch.cuda.empty_cache()

    # 4) the Hugging Face backend
    hf = HFBackend(model, dev)
    figs_hf = chat_way("hf backend", hf)

    same = sum(a == b for a, b in zip(figs_engine, figs_hf)) / max(len(figs_hf), 1)
    sum_rel = abs(sum(figs_engine) - sum(figs_hf)) / max(sum(figs_hf), 1.0)
    dense = float(hf.dense)
    by = {r["way"]: r["tokens_per_s"] for r in rows}
    result = dict(bench="gpu_chat_engine", gpu=gpu, torch=torch.__version__, model=f"Llama-3.2-{size}-shaped (random, bf16)",
                  apr_target=args.apr, apr=apr, prompt_len=args.prompt_len, tokens=args.tokens, rows=rows,
                  figures_equal_share=same, figures_sum_rel_diff=sum_rel, mean_figure_engine=sum(figs_engine) / len(figs_engine),
                  dense_per_token=dense,
                  engine_backend_over_hf=by["engine backend (counts)"] / by["hf backend"],
                  engine_backend_over_graph=by["engine backend (counts)"] / by["engine, graph, no count"])
    lines = [f"# GPU chat backends ({gpu}, {result['model']}, APR {apr:.2f} measured, {args.tokens} tokens one at a "
             f"time after a prompt of {args.prompt_len})", "",
             "| way | tokens/s | ms a token |", "|---|---|---|"]
    lines += [f"| {r['way']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.3f} |" for r in rows]
    lines += ["", f"Figures (engine backend vs HF backend, same {len(figs_hf)} tokens): {same:.1%} equal, sums differ "
              f"by {sum_rel:.2e} (relative); mean figure {result['mean_figure_engine']:.4g} of {dense:.4g} dense."]
    md = "\n".join(lines)
    print(md)
    save_outputs(args.out, "gpu_chat_engine", md, result)
    print(dumps(result))
    return result


if __name__ == "__main__":
    main()
