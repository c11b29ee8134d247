"""CPU decode benchmark: greedy tokens/s of dense vs CWIC models through the same C++ decode step.

    python experiments/bench_decode.py --device cpu                       # SmolLM2-135M + Llama-1B-shaped
    python -m experiments.bench.cpu_decode --quick                        # SmolLM2 only, 3× APR
    python -m experiments.bench.cpu_decode --out experiments/results      # also write cpu_decode.{json,md}

Models: SmolLM2-135M-Instruct (the real weights, offline; stripe 192 as in conf/model/smollm2_135m.yaml)
and a Llama-3.2-1B-shaped model with random weights (16 layers, hidden 2048, FFN 8192, 32/8 heads,
vocab 128,256, tied head; stripe 512). Each is converted with `to_cwic` and its thresholds calibrated
(`cwic_exp.cpu_decode.calibrate_apr`: the running statistics, then θ and φ so every counted matrix keeps
1/APR of its weights on calibration tokens; chat text for SmolLM2, random tokens for the random model) to
2×, 3× and 4× APR: stand-ins for trained CWIC checkpoints, since only speed is measured here. As the GPU
benchmark does, the calibration is then corrected on what the decoder itself reads: while the APR of an
untimed decode of the prompt differs from the target by more than 0.5 %, the calibration target is moved (first
scaled by target / that APR, then secant steps in log space, interpolating inside a bracket once tries straddle it,
at most 4 corrections: `apr_correction.py`) and the decoder rebuilt; the try closest to the target is timed
(`--no-apr-correction`: calibration tokens only). One step was not enough: the greedy text, and with it the decode's
APR, changes with the thresholds (SmolLM2 at 3×: 3.43 on the first calibration, 2.66 after one proportional step;
in two runs on 2026-12-04, targets 2.66 / 2.75 / 2.88 / 3.0 read 2.87 / 2.61 / 3.23 / 3.38: no try within 2 %).
`--forced` removes that noise: every configuration decodes the same text, the dense model's greedy continuation fed
token by token (teacher forcing; each step is the same one-token decode step as in generation), and the correction
measures exactly the text that is timed. What remains is the calibration's own jumpiness: a sparse forward amplifies
tiny threshold changes (on 2026-12-05, SmolLM2 calibrated to 3.15 and to 3.1500154 within 0.5 % read 3.148 and 2.975
on 32 forced tokens, both 3.146 on the calibration tokens), so the correction keeps the closest of its tries.

Every configuration runs in `cwic_exp.cpu_decode.CpuDecoder` (one C++ call per token, bf16 weights and KV
cache, fp32 activations): three dense ones, our kernel with every (stripe, input) pair on ("dense-own", its FFN as
two GEMVs), the same with the FFN through the CWIC FFN kernel with every unit on ("dense-fused": a unit's up and
down rows one span, as CWIC reads them), ATen `at::linear` ("dense-torch": what F.linear runs); and CWIC. The
prompt is fed untimed; then --new-tokens greedy steps (or forced steps, `--forced`) are timed. The dense
configurations are timed together first; the fastest of them is then timed with each CWIC configuration, in
--rounds interleaved rounds (the order rotated each round), each run waiting for idle CPUs first (the machine is
shared). The speedup is the median over the rounds of CWIC / the fastest dense in the same round, with its range
(`speedup_phases`: the ratio of medians over all phases). APR is counted as the project does (q, k, v, o, FFN, head; not embeddings or attention):
`apr_calib` on the calibration tokens, `apr_decode` = dense weights / weights the kernels actually read
on the decoded tokens. The LAST line is one JSON object.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

try:   # as experiments.bench.cpu_decode (bench_decode.py) or as a top-level module with this folder on sys.path
    from .apr_correction import correct_calibration
except ImportError:
    from apr_correction import correct_calibration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CALIB_TEXTS = [
    ("Explain how a refrigerator keeps food cold.",
     "A refrigerator moves heat from the inside to the outside. A refrigerant is compressed, which heats it; "
     "it then releases that heat through the coils at the back, expands through a valve and becomes very "
     "cold, and absorbs heat from the food compartment before returning to the compressor."),
    ("Write a haiku about autumn rain.", "Grey rain on red leaves / the garden exhales slowly / puddles hold the sky"),
    ("What is 17 times 23?", "17 times 23 is 391: 17 × 20 = 340 and 17 × 3 = 51, and 340 + 51 = 391."),
    ("Give me three tips for a job interview.",
     "1. Research the company and the role. 2. Prepare short stories that show your skills, with results. "
     "3. Ask thoughtful questions at the end: it shows interest and helps you decide."),
    ("Translate 'good morning, how are you?' into French and Spanish.",
     "French: « Bonjour, comment allez-vous ? » Spanish: «Buenos días, ¿cómo estás?»"),
    ("Write a Python function that reverses a string.",
     "def reverse(s: str) -> str:\n    return s[::-1]\n\nThe slice walks the string backwards one step at a time."),
    ("Why is the sky blue?",
     "Sunlight scatters off the molecules of the air. Short wavelengths scatter much more than long ones "
     "(Rayleigh scattering), so blue light reaches our eyes from every direction of the sky."),
    ("Summarise the plot of Romeo and Juliet in two sentences.",
     "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings ends "
     "with both taking their own lives, which finally reconciles their families."),
]
PROMPT = "Write a short story about a robot who learns to paint."


def ensure_imports():
    for p in (ROOT, os.path.join(ROOT, "src")):
        if p not in sys.path:
            sys.path.insert(0, p)


def chat_ids(tok, user, assistant=None):
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=assistant is None)
    return tok(text, add_special_tokens=False)["input_ids"]


def calib_batch(tok):
    seqs = [chat_ids(tok, u, a) for u, a in CALIB_TEXTS]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


def llama1b_shaped(seed=0, layers=16):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                    "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g).mul_(0.02).to(p.dtype))
            else:
                p.fill_(1.0)
        for name, b in model.named_buffers():
            pass
    model.tie_weights()
    # rotary buffers were created on meta: rebuild them
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return model.eval()


def forced_setup(which: str, layers: int = 16):
    """cpu_ab's and cpu_cost_model's model and text: (fp32 model, prompt ids, calibration ids and mask, stripe,
    label). "smollm2": SmolLM2-135M-Instruct, the chat prompt, stripe 192; "llama1b": the 1B-shaped random model
    with `layers` layers, 24 random prompt tokens, stripe 512 (as this benchmark builds and calibrates them)."""
    import cwic_exp
    if which == "smollm2":
        model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
        ids, mask = calib_batch(tok)
        return model.float().eval(), chat_ids(tok, PROMPT), ids, mask, 192, "SmolLM2-135M-Instruct"
    model = llama1b_shaped(layers=layers)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128256, (24,), generator=g).tolist()
    ids, mask = torch.randint(0, 128256, (2, 64), generator=g), torch.ones(2, 64, dtype=torch.long)
    return model, prompt, ids, mask, 512, f"Llama-3.2-1B-shaped random ({layers} layers)"


def timed_forced(dec, prompt, forced) -> dict:
    """Prefill `prompt`, then feed the `forced` tokens one step each, timed: ms a token, in total and by part
    (the decoder's C++ clocks: glue, qkv, attention, o, ffn, head). The decoder's read counters cover the forced
    tokens only. Builds without batched prefill (cpu_ab's older revisions) take the prompt token by token."""
    dec.prefill(prompt, chunk=64 if hasattr(dec._dec, "prefill") else 1)
    dec._dec.reset_reads()
    t0 = time.perf_counter()
    for t in forced:
        dec.step(t)
    dt = time.perf_counter() - t0
    out = {p: v * 1e3 for p, v in dec.profile().items()}
    out["total"] = dt / len(forced) * 1e3
    return out


def forced_rounds(decs: dict, prompt, forced, rounds: int) -> tuple[dict, dict]:
    """`timed_forced` of every decoder, `rounds` times, the order rotated each round (cpu_cost_model and the stripe
    probe): ({name: {part: [ms a token, one a round]}}, {name: its last `part_reads()`}). Prints each round."""
    from experiments.bench.cpu_kernels import rotated
    names = list(decs)
    res = {k: {} for k in names}
    reads = {}
    for r in range(rounds):
        order = rotated(names, r)
        for k in order:
            for p, v in timed_forced(decs[k], prompt, forced).items():
                res[k].setdefault(p, []).append(v)
            reads[k] = decs[k]._dec.part_reads()
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {res[k]['total'][-1]:.2f}" for k in order) + " ms",
              flush=True)
    return res, reads


def run_rounds(configs: dict, prompt, new_tokens: int, rounds: int, quiet, log, forced=None) -> dict:
    """Interleaved timed runs: {name: {'tps': [...], 'stats': DecodeStats of the last run}}, the order rotated by one
    every round (each config takes each position equally often over len(configs) rounds; a config always timed right
    after another would carry any effect of that position). forced: the tokens every config is fed instead of its
    own greedy choices (`CpuDecoder.timed_decode`)."""
    from experiments.bench.cpu_kernels import involuntary_switches, rotated
    out = {k: {"tps": [], "quiet": 0, "preempted": [], "prefill_ms": []} for k in configs}
    for r in range(rounds):
        for name, dec in rotated(list(configs.items()), r):
            ok = quiet()
            dec.prefill(prompt[:4])          # wake the threads and caches up after the wait
            c0 = involuntary_switches()
            st = dec.timed_decode(prompt, new_tokens, forced=forced)
            out[name]["preempted"].append(involuntary_switches() - c0)
            out[name]["tps"].append((st.tokens_per_s, ok))
            out[name]["prefill_ms"].append(st.prefill_seconds * 1e3)
            out[name]["quiet"] += int(ok)
            out[name]["stats"] = st
            out[name]["profile"] = dec.profile()
        log(f"    round {r + 1}/{rounds}: " + ", ".join(f"{k} {v['tps'][-1][0]:.1f}" for k, v in out.items()))
    return out


def summarise(res: dict) -> dict:
    from experiments.bench.cpu_kernels import robust_median
    s = {}
    for k, v in res.items():
        tps, nq = robust_median(v["tps"], min_quiet=max(2, len(v["tps"]) // 2))
        st = v["stats"]
        s[k] = {"tokens_per_s": tps, "runs": [round(t, 2) for t, _ in v["tps"]], "quiet_runs": nq,
                "preemptions_per_run": v["preempted"], "apr_decode": st.apr,
                "reads_per_token": st.reads_per_token,
                "prefill_ms": statistics.median(v["prefill_ms"]) if v["prefill_ms"] else float("nan"),
                "ms_per_token_by_part": {p: round(t * 1e3, 4) for p, t in v["profile"].items()}}
    return s


DENSE_IMPLS = ("own", "fused", "torch")   # cwic_exp.cpu_decode.CpuDecoder(mode="dense", dense=...)


def paired(runs: dict, key: str, ref: str) -> dict:
    """CWIC over the dense reference round by round (both timed in the same round, next to each other): the median
    of the per-round ratios and their range. Host drift between phases cancels; a round's own noise does not."""
    r = [c / d for (c, _), (d, _) in zip(runs[key]["tps"], runs[ref]["tps"])]
    return {"speedup_paired": statistics.median(r), "speedup_paired_range": [min(r), max(r)],
            "speedup_paired_rounds": [round(x, 4) for x in r], "dense_same_rounds": ref}


def huge_mb(dec) -> float:
    """MiB of the decoder's weight copies on huge pages (0 without its arena)."""
    return round(dec.arena.huge_bytes() / 2**20, 1) if dec.arena is not None else 0.0


def bench_model(name, model, tok_or_none, stripe, aprs, new_tokens, rounds, dtype, threads, quiet, log,
                calib, prompt_ids, hf_check: bool, apr_correction: bool = True, forced: bool = False,
                trained: bool = False):
    """One model's rows. forced: every config decodes the dense model's greedy continuation (teacher-forced), so all
    time the same text and the APR correction measures the text that is timed (with generated text, each threshold
    setting generates other tokens, and the decode APR jumps by several % between close calibration targets).

    trained: `model` is a trained CWIC checkpoint. Its own thresholds give the row "cwic-trained"; then, unless `aprs`
    is empty, the same weights and running statistics with calibrated thresholds (θ = c × the ±30 % jitter, φ
    uniform: what the synthetic rows use) corrected to the decode APR the trained row read, so that the two rows
    differ only in where the active pairs fall."""
    import cwic_exp
    from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr, dense_counts
    res = {"model": name, "stripe": stripe, "new_tokens": new_tokens, "rounds": rounds,
           "text": ("forced (the dense model's greedy continuation)" if forced
                    else "generated (each config's own greedy)"),
           "prompt_tokens": len(prompt_ids), "dense_params_per_token": dense_counts(model)}
    max_len = len(prompt_ids) + new_tokens + 8
    if hf_check:   # the C++ dense path reproduces Hugging Face's greedy decoding
        with torch.no_grad():
            ids = torch.tensor([prompt_ids])
            hf = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0].tolist()
        d32 = CpuDecoder(model, mode="dense", dtype=torch.float32, max_len=max_len, nthreads=threads)
        ours = d32.generate(prompt_ids, max_new_tokens=16)
        res["hf_greedy_match_fp32"] = ours == hf
        log(f"  C++ dense decode (fp32) reproduces HF greedy tokens: {ours == hf}")
        del d32
    t0 = time.time()
    dense = {f"dense-{impl}": CpuDecoder(model, mode="dense", dense=impl, dtype=dtype, max_len=max_len,
                                         nthreads=threads) for impl in DENSE_IMPLS}
    log(f"  dense decoders built ({time.time() - t0:.0f} s)")
    dense_tokens = dense["dense-own"].generate(prompt_ids, new_tokens)[len(prompt_ids):]
    log("  timing " + " vs ".join(dense))
    text = dense_tokens if forced else None
    runs = run_rounds(dense, prompt_ids, new_tokens, rounds, quiet, log, forced=text)
    summary = summarise(runs)
    for k in ("dense-own", "dense-fused"):
        summary[k]["huge_page_mb"] = huge_mb(dense[k])
    ref = max(dense, key=lambda k: summary[k]["tokens_per_s"])   # the faster dense: every CWIC row is paired with it
    res["dense_best"] = ref
    for k in [k for k in dense if k != ref]:
        del dense[k]
    gc.collect()
    calib_ids, calib_mask = calib
    extra = {}   # the trained decoder, timed in the same rounds as the calibrated one (the host drifts)
    if trained:
        from cwic_exp import active_parameters
        own_dec = CpuDecoder(model, mode="cwic", dtype=dtype, max_len=max_len, nthreads=threads)
        own_toks = own_dec.generate(prompt_ids, new_tokens)[len(prompt_ids):]
        own_apr = own_dec.timed_decode(prompt_ids, new_tokens, forced=text).apr
        own_row = {"apr_target": None, "apr_calib": active_parameters(model, calib_ids, calib_mask)["apr"],
                   "huge_page_mb": huge_mb(own_dec),
                   "greedy_tokens_equal_to_dense": sum(a == b for a, b in zip(own_toks, dense_tokens))
                   / max(1, len(own_toks))}
        extra = {"cwic-trained": own_dec}
        aprs = [own_apr] if aprs else []
        log(f"  cwic-trained: decode APR {own_apr:.3f}")
    else:
        cwic_exp.to_cwic(model, stripe_size=stripe)

    def take_trained(sm, runs):
        summary["cwic-trained"] = {**sm["cwic-trained"], **own_row, **paired(runs, "cwic-trained", ref)}

    cache = {}
    for i, apr in enumerate(aprs):
        t0 = time.time()
        st = calibrate_apr(model, calib_ids, apr, attention_mask=calib_mask, stats=i == 0 and not trained,
                           cache=cache)
        dec = CpuDecoder(model, mode="cwic", dtype=dtype, max_len=max_len, nthreads=threads)
        key = "cwic-calibrated" if trained else f"cwic-{apr:g}x"
        log(f"  {key}: calibrated APR {st['apr']:.2f} on {st['tokens']} tokens ({time.time() - t0:.0f} s)")
        target, first, tries = apr, None, []

        def recalibrate(t):   # the decoder rebuilt on thresholds calibrated to target t (the old one freed first)
            nonlocal dec, st
            del dec
            gc.collect()
            st = calibrate_apr(model, calib_ids, t, attention_mask=calib_mask, stats=False, cache=cache)
            dec = CpuDecoder(model, mode="cwic", dtype=dtype, max_len=max_len, nthreads=threads)

        if apr_correction:   # on what the decoder reads while decoding the prompt (untimed)
            def report(tr):
                log(f"  {key}: decode APR {tr[-2][1]:.2f}; recalibrated to {tr[-1][0]:.2f} on the calibration "
                    f"tokens (APR {st['apr']:.2f} there): decode APR {tr[-1][1]:.2f} ({time.time() - t0:.0f} s)")

            tries, target = correct_calibration(
                apr, target, lambda: dec.timed_decode(prompt_ids, new_tokens, forced=text).apr, recalibrate,
                on_step=report)
            first = tries[0][1]
            if target != tries[-1][0]:   # an earlier try was closer: rebuilt on it
                log(f"  {key}: back to the closest try, calibration target {target:.2f}")
        toks = dec.generate(prompt_ids, new_tokens)[len(prompt_ids):]
        if forced:   # under forcing: how often each step's greedy choice is the dense model's next token
            dec.prefill(prompt_ids)
            agree = [dec.step(t) == n for t, n in zip(dense_tokens[:-1], dense_tokens[1:])]
        runs = run_rounds({ref: dense[ref], **extra, key: dec}, prompt_ids, new_tokens, rounds, quiet, log,
                          forced=text)
        sm = summarise(runs)
        if trained:
            take_trained(sm, runs)
        summary.setdefault("ref-repeats", []).append(sm[ref]["tokens_per_s"])
        summary[key] = sm[key]
        summary[key].update({"apr_target": apr, "apr_calib": st["apr"], "density_calib": st["density"],
                             "huge_page_mb": huge_mb(dec),
                             "calib_target": target, "apr_decode_first_calibration": first,
                             "apr_corrections": [[round(t, 4), round(a, 4)] for t, a in tries],
                             **paired(runs, key, ref),
                             "greedy_tokens_equal_to_dense": sum(a == b for a, b in zip(toks, dense_tokens))
                             / max(1, len(toks))})
        if forced:
            summary[key]["next_token_agreement_forced"] = sum(agree) / max(1, len(agree))
        del dec
        gc.collect()
    if trained and not aprs:
        runs = run_rounds({ref: dense[ref], **extra}, prompt_ids, new_tokens, rounds, quiet, log, forced=text)
        sm = summarise(runs)
        summary.setdefault("ref-repeats", []).append(sm[ref]["tokens_per_s"])
        take_trained(sm, runs)
    # the faster dense: median over its runs in every phase (the other dense rows ran in the first phase only)
    phases = [summary[ref]["tokens_per_s"]] + summary.pop("ref-repeats", [])
    summary[ref]["tokens_per_s_phases"] = phases
    summary[ref]["tokens_per_s"] = statistics.median(phases)
    for c in (v for k, v in summary.items() if k.startswith("cwic-")):
        c["speedup"] = c["speedup_paired"]   # the headline: CWIC over the faster dense in the same rounds
        c["speedup_phases"] = c["tokens_per_s"] / summary[ref]["tokens_per_s"]
        for impl in DENSE_IMPLS:
            c[f"speedup_vs_dense_{impl}"] = c["tokens_per_s"] / summary[f"dense-{impl}"]["tokens_per_s"]
    res["configs"] = summary
    return res


def table(res: dict) -> str:
    c = res["configs"]
    forced = res.get("text", "").startswith("forced")
    lines = [f"### {res['model']} (stripe {res['stripe']}, {res['prompt_tokens']}-token prompt, "
             f"{res['new_tokens']} timed tokens{' of the dense model’s text, forced' if forced else ''}, "
             f"{res['rounds']} rounds)", "",
             f"| config | tokens/s | APR (calib / decode) | speedup over {res['dense_best']}, same rounds: median "
             "(range) | vs dense-own | vs dense-fused | vs dense-torch | prefill ms |",
             "|---|---|---|---|---|---|---|---|"]
    for k in (f"dense-{impl}" for impl in DENSE_IMPLS):
        lines.append(f"| {k} | {c[k]['tokens_per_s']:.2f} | 1.00 / {c[k]['apr_decode']:.2f} | | | | | "
                     f"{c[k].get('prefill_ms', float('nan')):.1f} |")
    for k, v in c.items():
        if k.startswith("cwic"):
            lo, hi = v["speedup_paired_range"]
            lines.append(f"| {k} | {v['tokens_per_s']:.2f} | {v['apr_calib']:.2f} / {v['apr_decode']:.2f} | "
                         f"**{v['speedup']:.2f}×** ({lo:.2f}–{hi:.2f}) | {v['speedup_vs_dense_own']:.2f}× | "
                         f"{v['speedup_vs_dense_fused']:.2f}× | {v['speedup_vs_dense_torch']:.2f}× | "
                         f"{v.get('prefill_ms', float('nan')):.1f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ensure_imports()
    from experiments.cli import at_least
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma list of smollm2, llama1b (default both)")
    ap.add_argument("--aprs", default=None, help="comma list of APRs (default 2,3,4)")
    ap.add_argument("--new-tokens", type=at_least(1), default=None, help="timed tokens (default 64 SmolLM2, 24 1B)")
    ap.add_argument("--rounds", type=at_least(1), default=None, help="interleaved rounds (default 9)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=at_least(0), default=0, help="threads (0: torch's default)")
    ap.add_argument("--stripe-smollm2", type=int, default=192)
    ap.add_argument("--stripe-llama1b", type=int, default=512)
    ap.add_argument("--llama1b-layers", type=int, default=16, help="fewer: a quicker, smaller stand-in")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="max s to wait for idle CPUs before a run (the machine is shared; 0: never wait)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models' results already in --out/cpu_decode.json (re-run one model)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, 3× APR, 32 tokens, 3 rounds")
    ap.add_argument("--no-apr-correction", action="store_true",
                    help="thresholds from the calibration tokens only (no correction on the decoded tokens)")
    ap.add_argument("--forced", action="store_true",
                    help="every config decodes the dense model's greedy continuation (teacher-forced): the same text "
                         "for all, and the APR correction settles on the text that is timed")
    ap.add_argument("--checkpoint", default=None,
                    help="a trained CWIC checkpoint (HF folder) instead of --models: dense vs its own thresholds, and "
                         "vs calibrated thresholds at the decode APR its own read (--aprs '' skips that row); "
                         "implies --forced")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.checkpoint:
        if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            raise SystemExit(f"--checkpoint {args.checkpoint}: no config.json there (an HF export, e.g. "
                             f"runs/<run>/hf/final)")
        if args.merge:
            raise SystemExit("--checkpoint writes its own table: give it its own --out, without --merge")
        args.forced = True   # trained and calibrated rows must read the same text to differ only in their thresholds
    given = [f"--{k}" for k in ("models", "aprs") if getattr(args, k) is not None]
    if args.quick and given:   # --quick used to replace them without a word (it takes --new-tokens and --rounds)
        raise SystemExit(f"--quick times SmolLM2 at 3× APR: drop --quick or {' and '.join(given)}")
    args.models, args.aprs = args.models or "smollm2,llama1b", args.aprs or "2,3,4"
    models = ["smollm2"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("smollm2", "llama1b")]
    if bad or not models:      # before any work: a bad name used to end the run after the first model's timings
        raise SystemExit(f"--models: a comma-separated list of smollm2, llama1b; got {args.models!r}")
    try:
        aprs = [3.0] if args.quick else [float(a) for a in args.aprs.split(",") if a.strip()]
    except ValueError:
        raise SystemExit(f"--aprs: comma-separated APRs such as 2,3,4; got {args.aprs!r}") from None
    if (not aprs and not args.checkpoint) or not all(1 <= a < float("inf") for a in aprs):
        raise SystemExit(f"--aprs: every APR must be a finite number ≥ 1; got {args.aprs!r}")
    from experiments.bench.cpu_kernels import Quiet, machine
    from cwic_kernels import cpu as C
    if C.load() is None:
        raise SystemExit(f"C++ kernels unavailable: {C.error()}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.checkpoint:
        models = ["checkpoint"]
    quiet = Quiet(busy=0.2, max_wait=args.quiet_wait, enabled=args.quiet_wait > 0, budget=1200.0)
    info = machine()
    info.update({"isa": C.best_isa(), "decode_threads": threads})
    print(f"CPU decode: {info.get('cpu', '?')}, {info['cpus']} CPUs, {threads} threads, ISA {info['isa']}, "
          f"weights {args.dtype}, load {info.get('loadavg_start')}")
    results = {}
    md = ["# CPU decode benchmark (batch 1, KV cache, one C++ call per token; each table says whether its text was "
          "each configuration's own greedy text or the dense model's, forced)", "",
          f"Machine: {info.get('cpu', '?')}, {info['cpus']} CPUs, {threads} threads, ISA {info['isa']}, "
          f"torch {torch.__version__}; weights and KV cache {args.dtype}, activations fp32. APR counts q, k, v, "
          "o, FFN and head (not embeddings or attention scores); "
          + ("thresholds: the checkpoint's own, then calibrated on its weights and statistics to the decode APR its "
             "own read" if args.checkpoint else "thresholds calibrated, not trained")
          + ("." if args.no_apr_correction else ", then corrected (at most 4 steps) so that the decode reads 1/APR "
             "(the calib column is the APR on the calibration tokens)."), ""]
    import cwic_exp
    for name in models:
        t0 = time.time()
        if name == "smollm2":
            model, tok = cwic_exp.load_teacher("smollm2-135m-instruct")
            model = model.float().eval()
            prompt = chat_ids(tok, PROMPT)
            calib = calib_batch(tok)
            new_tokens = args.new_tokens or (32 if args.quick else 64)
            rounds = args.rounds or (3 if args.quick else 9)
            stripe, label, hf_check = args.stripe_smollm2, "SmolLM2-135M-Instruct", True
        elif name == "llama1b":
            model = llama1b_shaped(layers=args.llama1b_layers)
            g = torch.Generator().manual_seed(1)
            prompt = torch.randint(0, 128256, (24,), generator=g).tolist()
            calib = (torch.randint(0, 128256, (2, 64), generator=g), torch.ones(2, 64, dtype=torch.long))
            new_tokens = args.new_tokens or 24
            rounds = args.rounds or 9
            stripe, label, hf_check = args.stripe_llama1b, f"Llama-3.2-1B-shaped random ({args.llama1b_layers} layers)", False
        elif name == "checkpoint":
            from transformers import AutoModelForCausalLM, AutoTokenizer
            model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
            if not any(True for _ in cwic_exp.iter_cwic_modules(model)):
                raise SystemExit(f"--checkpoint {args.checkpoint}: not a CWIC model (no CWIC layers)")
            tok = AutoTokenizer.from_pretrained(args.checkpoint)
            prompt = chat_ids(tok, PROMPT)
            calib = calib_batch(tok)
            new_tokens = args.new_tokens or 64
            rounds = args.rounds or 9
            stripe = model.config.cwic.get("stripe_size")
            label, hf_check = f"trained CWIC checkpoint {os.path.normpath(args.checkpoint)}", False
        else:
            raise SystemExit(f"unknown model {name!r}")
        print(f"{label}: loaded ({time.time() - t0:.0f} s)")
        res = bench_model(label, model, None, stripe, aprs, new_tokens, rounds, dtype, threads, quiet, print,
                          calib, prompt, hf_check, apr_correction=not args.no_apr_correction, forced=args.forced,
                          trained=name == "checkpoint")
        res["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        res["loadavg_after"] = os.getloadavg()
        results[name] = res
        t = table(res)
        print(t)
        md.append(t)
        del model
        gc.collect()
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    prev_md = {}
    if args.merge and args.out and os.path.exists(os.path.join(args.out, "cpu_decode.json")):
        with open(os.path.join(args.out, "cpu_decode.json")) as f:
            prev = json.load(f)
        for name, r in prev.get("models", {}).items():
            if name not in results:
                if "dense-fused" not in r.get("configs", {}):
                    raise SystemExit(f"--merge: {name} in {args.out} was measured before the paired speedups "
                                     f"(2026-12-04): run both models again, or write to another --out")
                results[name] = r
                prev_md[name] = table(r) + f"\n(measured in an earlier run: {r.get('measured_at', '?')})\n"
        order = [m for m in ("smollm2", "llama1b") if m in results]
        results = {m: results[m] for m in order}
        md = md[:4] + [prev_md.get(m) or table(results[m]) for m in order]
    head = "smollm2" if "smollm2" in results else models[0]
    summary = {"bench": "cpu_decode", "device": "cpu", "machine": info, "dtype": args.dtype, "forced": args.forced,
               "quiet_runs": quiet.quiet_calls, "timed_runs": quiet.calls, "models": results}
    for name, r in results.items():
        cw = {k.split("-")[1]: v for k, v in r["configs"].items() if k.startswith("cwic")}
        summary[f"speedup_{name}"] = {a: round(v["speedup"], 3) for a, v in cw.items()}
        summary[f"speedup_vs_dense_torch_{name}"] = {a: round(v["speedup_vs_dense_torch"], 3) for a, v in cw.items()}
        summary[f"apr_decode_{name}"] = {a: round(v["apr_decode"], 3) for a, v in cw.items()}
    summary["speedup"] = summary[f"speedup_{head}"]
    summary["speedup_vs_dense_torch"] = summary[f"speedup_vs_dense_torch_{head}"]
    summary["note"] = ("speedup: CWIC over the fastest dense configuration, the median of the per-round ratios of "
                       "runs timed in the same rounds (speedup_paired_range: their range; speedup_phases: the ratio "
                       "of medians over all phases). Dense: dense-own (our GEMV with every pair on, the FFN as two "
                       "GEMVs), dense-fused (the same, the FFN through the CWIC FFN kernel with every unit on), "
                       "dense-torch (at::linear = F.linear). APR: project accounting (q,k,v,o,FFN,head); apr_decode "
                       "measured on the decoded tokens. "
                       + ("cwic-trained: the checkpoint's own thresholds; cwic-calibrated: calibrated thresholds on "
                          "the same weights and statistics at the decode APR cwic-trained read."
                          if args.checkpoint else "Thresholds calibrated, not trained."))
    for name, r in results.items():
        summary[f"speedup_vs_dense_own_{name}"] = {k.split("-")[1]: round(v["speedup_vs_dense_own"], 3)
                                                   for k, v in r["configs"].items() if k.startswith("cwic-")}
    if "trained" in summary["speedup"]:
        c = results["checkpoint"]["configs"]
        line = (f"trained thresholds: {c['cwic-trained']['speedup']:.2f}× over the fastest dense at decode APR "
                f"{c['cwic-trained']['apr_decode']:.2f}")
        if "cwic-calibrated" in c:
            line += (f"; calibrated thresholds on the same weights: {c['cwic-calibrated']['speedup']:.2f}× at "
                     f"{c['cwic-calibrated']['apr_decode']:.2f}")
        print(line)
        md += [line, ""]
    if "3x" in summary["speedup"]:
        for name, r in results.items():
            c3 = r["configs"]["cwic-3x"]   # (unrounded: the table's cells and this line agree)
            lo, hi = c3["speedup_paired_range"]
            line = (f"3× APR, {r['model']}: {c3['speedup']:.2f}× over the fastest dense ({r['dense_best']}; median "
                    f"of {len(c3['speedup_paired_rounds'])} rounds, {lo:.2f}–{hi:.2f}); "
                    f"{c3['speedup_vs_dense_torch']:.2f}× over dense F.linear "
                    f"(decode-time APR {c3['apr_decode']:.2f}); target ≥ 2.5×")
            print(line)
            md += [line, ""]
    from cwic_exp.files import dumps   # strict JSON: a missing figure (NaN) is null
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_decode.json"), "w") as f:
            f.write(dumps(summary, indent=1))
        with open(os.path.join(args.out, "cpu_decode.md"), "w") as f:
            f.write("\n".join(md))
    print(dumps(summary, separators=(",", ":")))
    return summary


if __name__ == "__main__":
    main()
