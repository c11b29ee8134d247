"""Chat with a CWIC model; every token is coloured by the active parameters it used.

    python -m cwic_exp.chat                                   # the latest training export (runs/LATEST)
    python -m cwic_exp.chat --model runs/main/hf/final --device cuda
    python -m cwic_exp.chat --prompt "Why is the sky blue?" --no-color --max-new-tokens 64
    python -m cwic_exp.chat --prompt "Hi" --html chat.html --json chat.json   # one turn, for scripts

The figure of a token is the number of parameters active in the forward pass that processed it (the
token was that pass's input), the same convention as `active_parameters(..., per_token=True)`, so prompt
tokens and generated tokens share one scale. It comes from the generation itself: the KV cache is kept
across steps and turns (a new turn prefills only what the cache does not already hold), and nothing is
re-run to colour the text. Counted: q, k, v, o, gate, up+down and the LM head; not embeddings or
attention scores.

Colours run from light yellow (little compute) to dark blue (much compute); the scale is fixed for the
session from a short calibration pass (2nd-98th percentile of the per-token counts on a stock exchange),
so colours compare across turns. In the interactive loop: Ctrl-C stops a generation (the partial reply
is kept), empty input is ignored, /reset starts over, /exit or Ctrl-D quits. A conversation longer than
the context is trimmed from its oldest turns, with a notice.

Decoding backends plug in through `DecodeBackend` (see `register_backend`): the plain Hugging Face
incremental decoder with a `DynamicCache` is the reference and the default; `--backend cpu` runs the C++
sparse kernels (`cwic_exp.cpu_decode`), so the reply comes at the sparse model's real CPU speed and each
figure is what the kernels read for that token:

    python -m cwic_exp.chat --backend cpu --dtype bfloat16

`--backend engine` does the same on a GPU: the decode engine (`cwic_exp.engine`: static KV cache, one CUDA graph
a step, the Triton sparse kernels), whose kernels count what they read for each token:

    python -m cwic_exp.chat --backend engine --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import html
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from .files import dumps as json_dumps, write_text_atomic

# ----------------------------------------------------------------------------- decoding backends


class NaNLogits(ArithmeticError):
    """The model's next-token logits hold a NaN (sampling: or infinities, which softmax turns into NaN)."""


class DecodeBackend(Protocol):
    """What the chat needs from a decoder: feed tokens, get the next-token logits and the per-token
    active parameters of exactly the tokens fed. The backend owns the KV cache."""

    dense: float        # dense parameters per token (counted matrices only)
    max_context: int    # longest sequence the backend can hold

    def forward(self, ids: list[int]) -> tuple[torch.Tensor, list[float]]:
        """Append `ids` to the cache; return (logits of the last position (vocab,), fp32 on any
        device; active parameters of each of `ids`)."""
        ...

    def truncate(self, length: int) -> None:
        """Keep the first `length` cached positions (after Ctrl-C, or to reuse a common prefix)."""
        ...

    def reset(self) -> None:
        ...


def _require_cwic(model) -> None:
    from . import is_cwic
    if not is_cwic(model):
        raise ValueError("not a CWIC model: load a CWIC checkpoint (AutoModelForCausalLM after "
                         "`import cwic_exp`), or convert with cwic_exp.to_cwic")


def _cache_positions_and_dense(model, max_len: int | None) -> tuple[int, float]:
    """A kernel backend's KV-cache length (min(model positions, max_len or 4096): it is allocated up front) and the
    dense weights a step reads (the figures' scale)."""
    from .cpu_decode import dense_counts
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    positions = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
    return min(positions, int(max_len or 4096)), float(dense_counts(model)["total"])


class HFBackend:
    """Plain Hugging Face incremental decoding (`past_key_values`) under `cwic_context(track_ap=True)`."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        from . import gather_active
        _require_cwic(model)
        self.model, self.device, self._gather = model, torch.device(device), gather_active
        cfg = model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.cache = None
        self.dense = float("nan")

    def reset(self) -> None:
        self.cache = None

    def cached(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def truncate(self, length: int) -> None:
        # after an interrupt some layers may hold one more step than others: slice them all
        if self.cache is None:
            return
        layers = getattr(self.cache, "layers", None)
        if length == 0 or not layers or not all(hasattr(l, "keys") for l in layers):
            self.cache = None  # empty, or an unknown cache layout: start over (the chat re-prefills)
            return
        for layer in layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    def _cache_kw(self) -> str:
        """The forward's name for the KV cache: `cache` from transformers 5.2x on (`past_key_values` there warns
        that it is deprecated, into the chat's terminal), `past_key_values` before."""
        import inspect
        return "cache" if "cache" in inspect.signature(type(self.model).forward).parameters else "past_key_values"

    @torch.no_grad()
    def forward(self, ids: list[int]) -> tuple[torch.Tensor, list[float]]:
        from transformers import DynamicCache
        from . import cwic_context
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        with cwic_context(self.model, track_ap=True):
            # full logits, not logits_to_keep=1: the head's compute of every fed token is counted
            out = self.model(input_ids=x, **{self._cache_kw(): self.cache}, use_cache=True)
        stats = self._gather(self.model)
        self.dense = stats.dense
        return out.logits[0, -1].float(), stats.per_token.float().cpu().tolist()


class CpuBackend:
    """The C++ CPU decoder (`cwic_exp.cpu_decode.CpuDecoder`, mode="cwic"): the sparse kernels skip the (stripe,
    input) pairs and FFN units that are off, so the chat runs at the sparse model's real speed. A token's figure
    is what the kernels read for it (their per-step counters: the same convention as `active_parameters`), so
    prompt tokens go one decode step each (a batched prefill would count the union of its tokens).

    Weights in the model's dtype: float32 (the figures equal the Hugging Face recount up to fp32 summation
    order at a threshold) or bfloat16 (the fast path: `--dtype bfloat16`)."""

    def __init__(self, model, device: str | torch.device = "cpu", max_len: int | None = None, nthreads: int = 0):
        from .cpu_decode import CpuDecoder
        if torch.device(device).type != "cpu":
            raise ValueError(f"the cpu backend runs on the CPU, not {device!r}: use --device cpu "
                             "(or --backend hf for another device)")
        _require_cwic(model)
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the cpu backend keeps float32 or bfloat16 weights, not {dtype}: "
                             "use --dtype float32 or --dtype bfloat16")
        self.max_context, self.dense = _cache_positions_and_dense(model, max_len)
        self.model = model
        self.dec = CpuDecoder(model, mode="cwic", dtype=dtype, max_len=self.max_context, nthreads=nthreads)

    def reset(self) -> None:
        self.dec.reset()

    def cached(self) -> int:
        return self.dec.pos

    def truncate(self, length: int) -> None:
        # positions past `length` are overwritten by the next steps and never attended to before that
        self.dec.pos = max(0, min(int(length), self.dec.pos))

    def forward(self, ids: list[int]) -> tuple[torch.Tensor, list[float]]:
        if self.dec.pos + len(ids) > self.max_context:
            raise RuntimeError(f"KV cache full: {self.dec.pos} + {len(ids)} tokens, {self.max_context} positions")
        aps = []
        for t in ids:
            before = self.dec.weights_read()
            self.dec.step(int(t))
            aps.append(float(self.dec.weights_read() - before))
        return self.dec.logits().float(), aps


class EngineBackend:
    """The decode engine (`cwic_exp.engine.DecodeEngine`, count_reads=True): on a GPU one CUDA-graph replay a token
    through the Triton sparse kernels, so the chat runs at the sparse model's real GPU speed. A token's figure is
    what the kernels read for it: each kernel program adds its share to a device counter (one atomic), read after
    the step, the same convention as `active_parameters` and the cpu backend; prompt tokens go one step each.
    Elsewhere (the CPU) the engine runs the kernels' PyTorch twins, which count the same way: slow, for tests."""

    def __init__(self, model, device: str | torch.device | None = None, max_len: int | None = None,
                 triton: bool | None = None):   # (device: where the model is; the engine runs there)
        from .engine import DecodeEngine
        _require_cwic(model)
        self.max_context, self.dense = _cache_positions_and_dense(model, max_len)
        self.model = model
        self.engine = DecodeEngine(model, max_len=self.max_context, triton=triton, count_reads=True)
        self.pos = 0
        self._total = 0

    def reset(self) -> None:
        self.truncate(0)

    def cached(self) -> int:
        return self.pos

    def truncate(self, length: int) -> None:
        # positions past `length` are overwritten by the next steps and never attended to before that. After a
        # Ctrl-C: a step may have counted without its figure being taken (the interrupt lands while the host waits
        # for it), and an eager step (no CUDA graph) may have stopped half-way with a hand-off buffer non-zero
        self.pos = max(0, min(int(length), self.pos))
        self.engine._clear_acc()
        self._total = int(self.engine.reads.sum())

    def forward(self, ids: list[int]) -> tuple[torch.Tensor, list[float]]:
        if self.pos + len(ids) > self.max_context:
            raise RuntimeError(f"KV cache full: {self.pos} + {len(ids)} tokens, {self.max_context} positions")
        eng, aps, logits = self.engine, [], None
        for t in ids:
            logits = eng.feed(int(t), self.pos)
            self.pos += 1
            total = int(eng.reads.sum())     # (waits for the step)
            aps.append(float(total - self._total))
            self._total = total
        return logits[-1].float().clone(), aps   # (a copy: the graph's buffer changes at the next step)


BACKENDS: dict[str, Callable] = {"hf": HFBackend, "cpu": CpuBackend, "engine": EngineBackend}


def register_backend(name: str, factory: Callable) -> None:
    """`factory(model, device) -> DecodeBackend`; e.g. a CPU sparse-GEMV or CUDA-graph decoder."""
    BACKENDS[name] = factory


# ----------------------------------------------------------------------------- text and colours


class IncrementalDecoder:
    """Token ids -> text pieces, one per token, that never split a multi-byte character.

    A token that ends inside a UTF-8 sequence gets an empty piece; the token completing the
    character carries the text (decoded over a short window of earlier tokens, so tokenizers whose
    pieces depend on their left context, e.g. SentencePiece spaces, are handled too)."""

    def __init__(self, tokenizer, skip_special: bool = True):
        self.tok, self.skip = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _dec(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, tid: int) -> str:
        self.ids.append(int(tid))
        prev = self._dec(self.ids[self.prefix:self.read])
        new = self._dec(self.ids[self.prefix:])
        if len(new) <= len(prev) or new.endswith("\ufffd"):
            return ""   # an incomplete character (or nothing visible yet): wait for the next token
        piece = new[len(prev):]
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is still pending (an incomplete character at the end), with replacement marks."""
        if self.read == len(self.ids):
            return ""
        prev = self._dec(self.ids[self.prefix:self.read])
        piece = self._dec(self.ids[self.prefix:])[len(prev):]
        self.prefix = self.read = len(self.ids)
        return piece


# ColorBrewer YlGnBu: light yellow (little compute) -> dark blue (much compute)
_YLGNBU = ["#ffffd9", "#edf8b1", "#c7e9b4", "#7fcdbb", "#41b6c4", "#1d91c0", "#225ea8", "#253494", "#081d58"]


def _hex(c: str) -> tuple[int, int, int]:
    return int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)


@dataclass
class ComputeScale:
    lo: float
    hi: float
    dense: float

    def frac(self, ap: float) -> float:
        return min(1.0, max(0.0, (ap - self.lo) / max(self.hi - self.lo, 1e-9)))

    def rgb(self, ap: float) -> tuple[int, int, int]:
        f = self.frac(ap) * (len(_YLGNBU) - 1)
        i = min(int(f), len(_YLGNBU) - 2)
        a, b = _hex(_YLGNBU[i]), _hex(_YLGNBU[i + 1])
        t = f - i
        return tuple(round(x + (y - x) * t) for x, y in zip(a, b))

    def colours(self, ap: float) -> tuple[str, str]:
        """(background, foreground) hex colours for a token."""
        r, g, b = self.rgb(ap)
        fg = "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"
        return f"#{r:02x}{g:02x}{b:02x}", fg


def fmt_params(x: float) -> str:
    for unit, v in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= v:
            return f"{x / v:.2f}{unit}"
    return f"{x:.0f}"


# ----------------------------------------------------------------------------- the conversation

@dataclass
class Tok:
    id: int
    text: str
    ap: float


@dataclass
class Turn:
    user: str
    prompt: list[Tok] = field(default_factory=list)   # tokens prefilled for this turn (template included)
    reply: list[Tok] = field(default_factory=list)
    stop: str = ""            # "eos" | "max_new_tokens" | "context" | "interrupted" | "nan"
    summary: dict = field(default_factory=dict)

    @property
    def reply_text(self) -> str:
        return "".join(t.text for t in self.reply)


CALIBRATION = [
    {"role": "user", "content": "Hello! In two sentences, why is the sky blue?"},
    {"role": "assistant", "content": "Sunlight is scattered by the molecules of the air, and blue light "
     "is scattered much more than red light because its wavelength is shorter. Away from the Sun we "
     "therefore see mostly scattered blue light."},
]


class ChatSession:
    """Multi-turn chat over a `DecodeBackend`; emits (piece, [ap, ...]) as tokens are generated."""

    def __init__(self, backend, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, max_context: int | None = None,
                 ignore_eos: bool = False, notice: Callable[[str], None] = print):
        self.backend, self.tok = backend, tokenizer
        self.system, self.max_new_tokens = system, max_new_tokens
        self.temperature, self.top_p, self.ignore_eos = temperature, top_p, ignore_eos
        self.max_context = min(backend.max_context, max_context or backend.max_context)
        self.gen = torch.Generator().manual_seed(seed)
        self.notice = notice
        self.messages: list[dict] = []
        self.turns: list[Turn] = []
        self.cached_ids: list[int] = []
        self.stop_ids = self._stop_ids()
        self.scale: ComputeScale | None = None

    def _stop_ids(self) -> set[int]:
        ids = set()
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        gc = getattr(getattr(self.backend, "model", None), "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
        return ids

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def calibrate(self) -> ComputeScale:
        """Fix the colour scale from one pass over a stock exchange (no effect on the conversation)."""
        ids = self._render(CALIBRATION, False)[:self.max_context]   # within the backend's positions
        self.backend.reset()
        _, aps = self.backend.forward(ids)
        self.backend.reset()
        self.cached_ids = []
        a = torch.tensor(aps)
        lo, hi = float(a.quantile(0.02)), float(a.quantile(0.98))
        if hi - lo < 1e-6 * max(hi, 1.0):   # a dense (θ = 0) model: every token costs the same
            lo = hi * 0.9
        self.scale = ComputeScale(lo, hi, float(self.backend.dense))
        return self.scale

    def reset(self) -> None:
        self.messages, self.cached_ids = [], []
        self.backend.reset()

    def _sample(self, logits: torch.Tensor) -> int:
        """The next token; NaNLogits where the logits hold a NaN (greedy: the max is NaN exactly then)."""
        if self.temperature <= 0:
            best = logits.reshape(-1).max(0)
            if math.isnan(best.values.item()):
                raise NaNLogits
            return int(best.indices)
        probs = torch.softmax(logits.float().cpu().reshape(-1) / self.temperature, -1)
        if not torch.isfinite(probs).all():      # a NaN logit, or +inf ones (inf - inf)
            raise NaNLogits
        if self.top_p < 1.0:
            p, idx = probs.sort(descending=True)
            keep = p.cumsum(0) - p < self.top_p
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def _prepare(self, user: str) -> list[int] | None:
        """Prompt ids for the conversation plus `user`, trimmed from the oldest turns to fit."""
        msgs = self.messages + [{"role": "user", "content": user}]
        ids = self._render(msgs, True)
        dropped = 0
        while len(ids) + min(self.max_new_tokens, 16) > self.max_context and len(msgs) > 1:
            msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]   # the oldest user turn and its reply
            dropped += 1
            ids = self._render(msgs, True)
        if len(ids) >= self.max_context:
            self.notice(f"message too long: {len(ids)} tokens, the context holds {self.max_context}")
            return None
        if dropped:
            self.notice(f"conversation longer than the context ({self.max_context} tokens): dropped the "
                        f"{dropped} oldest turn(s)")
        self.messages = msgs[:-1]
        return ids

    def turn(self, user: str, on_piece: Callable[[str, list[float]], None] = lambda p, a: None,
             on_prompt: Callable[[list[Tok]], None] | None = None) -> Turn | None:
        ids = self._prepare(user)
        if ids is None:
            return None
        if self.scale is None:
            self.calibrate()
        turn = Turn(user)
        # reuse the cache for the longest common prefix; prefill only the rest
        n = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)   # at least one token to feed, for the next-token logits
        self.backend.truncate(n)
        self.cached_ids = self.cached_ids[:n]
        new = ids[n:]
        t0 = time.perf_counter()
        try:
            logits, aps = self.backend.forward(new)
        except KeyboardInterrupt:
            self.backend.truncate(n)
            self.notice("interrupted during the prompt")
            return None
        t_prefill = time.perf_counter() - t0
        self.cached_ids += new
        pdec = IncrementalDecoder(self.tok, skip_special=False)
        turn.prompt = [Tok(i, pdec.push(i), a) for i, a in zip(new, aps)]
        if on_prompt is not None:
            on_prompt(turn.prompt)
        dec = IncrementalDecoder(self.tok)
        pending: list[Tok] = []
        budget = min(self.max_new_tokens, self.max_context - len(self.cached_ids))
        turn.stop = "context" if budget < self.max_new_tokens else "max_new_tokens"
        t1 = time.perf_counter()
        try:
            for _ in range(budget):
                tid = self._sample(logits)
                if tid in self.stop_ids and not self.ignore_eos:
                    turn.stop = "eos"
                    break
                logits, ap = self.backend.forward([tid])
                self.cached_ids.append(tid)
                piece = dec.push(tid)
                pending.append(Tok(tid, piece, ap[0]))
                if piece:   # a whole character: show it with every token that built it
                    turn.reply += pending
                    on_piece(piece, [t.ap for t in pending])
                    pending = []
        except KeyboardInterrupt:
            turn.stop = "interrupted"
            self.backend.truncate(len(self.cached_ids))   # drop a half-done step
        except NaNLogits:
            turn.stop = "nan"
            self.notice(f"the model's next-token logits are not finite (NaN) after {len(pending) + len(turn.reply)} "
                        "token(s): the reply stops here (an overflow? try --dtype float32)")
        tail = dec.flush()
        if pending:
            pending[-1].text = tail
            turn.reply += pending
            on_piece(tail, [t.ap for t in pending])
        dt = time.perf_counter() - t1
        gen = [t.ap for t in turn.reply]
        dense = float(self.backend.dense)
        mean = sum(gen) / len(gen) if gen else float("nan")
        turn.summary = {"tokens": len(gen), "mean_active": mean, "apr": dense / mean if gen else float("nan"),
                        "dense": dense, "tokens_per_s": len(gen) / dt if gen and dt > 0 else float("nan"),
                        "prompt_tokens": len(new), "prompt_cached": n, "prefill_s": t_prefill,
                        "prompt_mean_active": sum(aps) / len(aps), "stop": turn.stop}
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": turn.reply_text}]
        self.turns.append(turn)
        return turn

    def transcript(self, model_name: str = "") -> dict:
        return {"model": model_name, "dense": float(self.backend.dense),
                "scale": asdict(self.scale) if self.scale else None,
                "convention": "ap of a token = active parameters of the forward pass that processed it; "
                              "counts q,k,v,o,gate,up+down,head; not embeddings or attention scores",
                "turns": [asdict(t) for t in self.turns]}


# ----------------------------------------------------------------------------- output: HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222;background:#fafafa}
.turn{margin:1.2em 0;padding:.8em 1em;background:#fff;border:1px solid #ddd;border-radius:6px}
.role{font-weight:600;margin:.3em 0}.tokens{font-family:ui-monospace,Menlo,monospace;white-space:pre-wrap;
line-height:1.7}.tokens span{border-radius:2px}.sum{color:#555;font-size:.85em;margin-top:.5em}
.legend span{display:inline-block;width:2.2em;height:1em;vertical-align:middle}.note{color:#666;font-size:.85em}"""


def _spans(toks: list[Tok], scale: ComputeScale) -> str:
    """One span per displayed piece; a piece built by several tokens (a multi-byte character)
    carries all their figures."""
    out, group = [], []
    for t in toks:
        group.append(t)
        if t.text or t is toks[-1]:
            aps = [g.ap for g in group]
            mean = sum(aps) / len(aps)
            bg, fg = scale.colours(mean)
            title = " + ".join(fmt_params(a) for a in aps) + " active params"
            out.append(f'<span style="background:{bg};color:{fg}" data-ap="{",".join(f"{a:.0f}" for a in aps)}" '
                       f'data-ids="{",".join(str(g.id) for g in group)}" title="{html.escape(title)}">'
                       f'{html.escape("".join(g.text for g in group))}</span>')
            group = []
    return "".join(out)


def to_html(transcript: dict, title: str = "CWIC chat") -> str:
    s = transcript["scale"]
    scale = ComputeScale(**s)
    legend = "".join(f'<span style="background:{scale.colours(scale.lo + (scale.hi - scale.lo) * i / 8)[0]}">'
                     f'</span>' for i in range(9))
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class=\"note\">model: <code>{html.escape(transcript['model'])}"
             f"</code> · dense {fmt_params(s['dense'])} params/token</p>",
             f'<p class="legend">little compute {fmt_params(scale.lo)} {legend} {fmt_params(scale.hi)} much '
             f'compute</p><p class="note">{html.escape(transcript["convention"])}. Hover a token for its '
             f'figure.</p>']
    for i, t in enumerate(transcript["turns"]):
        toks = lambda key: [Tok(**x) for x in t[key]]  # noqa: E731
        sm = t["summary"]
        parts.append(f'<div class="turn"><div class="role">prompt as the model saw it (turn {i + 1}, '
                     f'{sm["prompt_tokens"]} new tokens)</div><div class="tokens">{_spans(toks("prompt"), scale)}'
                     f'</div><div class="role">assistant</div><div class="tokens">{_spans(toks("reply"), scale)}'
                     f'</div><div class="sum">{html.escape(summary_line(sm))}</div></div>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def summary_line(sm: dict) -> str:
    if not sm.get("tokens"):
        return f"no tokens generated ({sm.get('stop', '')})"
    return (f"{sm['tokens']} tokens · mean {fmt_params(sm['mean_active'])} active params/token "
            f"(APR {sm['apr']:.2f}×, dense {fmt_params(sm['dense'])}) · {sm['tokens_per_s']:.1f} tok/s · "
            f"prompt {sm['prompt_tokens']} tokens prefilled ({sm['prompt_cached']} cached) in "
            f"{sm['prefill_s']:.2f}s · stop: {sm['stop']}")


# ----------------------------------------------------------------------------- output: terminal

class TerminalView:
    """Streams pieces to stdout; banner, legend, summaries and notices go to stderr."""

    def __init__(self, color: bool, out=None, err=None):
        from rich.console import Console
        self.color = color
        kw = dict(highlight=False, soft_wrap=True, markup=False, emoji=False,
                  force_terminal=color, color_system="truecolor" if color else None)
        self.out = Console(file=out or sys.stdout, **kw)
        self.err = Console(file=err or sys.stderr, **kw)
        self.scale: ComputeScale | None = None

    def piece(self, text: str, aps: list[float]) -> None:
        from rich.text import Text
        if not self.color:
            # one figure per token; tokens of one multi-byte character come first with empty text
            self.out.file.write("".join(f"[{fmt_params(a)}]" for a in aps[:-1]) + f"{text}[{fmt_params(aps[-1])}]")
            self.out.file.flush()
            return
        bg, fg = self.scale.colours(sum(aps) / len(aps))
        self.out.print(Text(text, style=f"{fg} on {bg}"), end="")
        self.out.file.flush()

    def prompt_tokens(self, toks: list[Tok]) -> None:
        self.err.print("[prompt as the model saw it]")
        for t in toks:
            if self.color:
                from rich.text import Text
                bg, fg = self.scale.colours(t.ap)
                self.err.print(Text(t.text, style=f"{fg} on {bg}"), end="")
            else:
                self.err.file.write(f"{t.text}[{fmt_params(t.ap)}]")
        self.err.print()

    def legend(self, scale: ComputeScale) -> None:
        from rich.text import Text
        self.scale = scale
        line = Text(f"little compute {fmt_params(scale.lo)} ")
        if self.color:
            for i in range(9):
                bg, _ = scale.colours(scale.lo + (scale.hi - scale.lo) * i / 8)
                line.append("   ", style=f"on {bg}")
        else:
            line.append("[light yellow ... dark blue]")
        line.append(f" {fmt_params(scale.hi)} much compute   (dense {fmt_params(scale.dense)} params/token; "
                    "counts q,k,v,o,gate,up+down,head, not embeddings or attention scores)")
        self.err.print(line)

    def summary(self, sm: dict) -> None:
        self.out.file.write("\n")
        self.out.file.flush()
        self.err.print(f"── {summary_line(sm)}", style="dim" if self.color else None)

    def notice(self, msg: str) -> None:
        self.err.print(f"[notice] {msg}", style="yellow" if self.color else None, markup=False)


# ----------------------------------------------------------------------------- CLI

def others_running(samples: int = 10, interval: float = 0.02) -> float | None:
    """Mean number of other runnable tasks on the machine now: the running count of Linux's /proc/loadavg minus the
    reader itself, over `samples` reads `interval` s apart (the 1-minute load lags, and holds this process's own
    model load and kernel build). None where there is no /proc/loadavg."""
    vals = []
    try:
        for i in range(samples):
            with open("/proc/loadavg") as f:
                vals.append(int(f.read().split()[3].split("/")[0]) - 1)
            if i + 1 < samples:
                time.sleep(interval)
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, sum(vals) / len(vals))


def cpu_quota(root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> float | None:
    """This process's CPU limit in cores from its cgroup, or None where it has none (or none can be read): the
    tightest of cgroup v2's `cpu.max` or v1's `cpu.cfs_quota_us / cpu.cfs_period_us` along its cgroup's path, from
    the mount's root down (a container sees its own cgroup as the root). Linux only."""
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    folders = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":                                             # v2: one unified hierarchy
            folders.append((Path(root), path, "v2"))
        elif "cpu" in ctrls.split(","):                             # v1: cpu (often mounted as cpu,cpuacct)
            for name in (ctrls, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (Path(root) / name).is_dir():
                    folders.append((Path(root) / name, path, "v1"))
                    break
    best = None
    for base, path, kind in folders:
        steps = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(steps) + 1):
            d = base.joinpath(*steps[:depth])
            try:
                if kind == "v2":
                    quota, period = (d / "cpu.max").read_text().split()[:2]
                else:
                    quota, period = (d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text()
                if quota.strip() in ("max", "-1"):
                    continue
                cores = int(quota) / int(period)
            except (OSError, ValueError):
                continue
            if cores > 0 and (best is None or cores < best):
                best = cores
    return best


def quota_threads(quota: float | None, threads: int) -> int:
    """The thread count for a CPU quota of `quota` cores: at most its whole cores (at least 1). More threads than
    the quota get throttled in turn, and each parallel step waits for its slowest thread."""
    if quota is None:
        return threads
    return max(1, min(threads, int(quota + 1e-9)))


def busy_cpu_notice(threads: int, cores: int | None = None, others: float | None = None) -> str | None:
    """A line for a CPU decode that would share its cores, or None. Each of the kernels' (and torch's) parallel steps
    waits for all of its threads: with more threads than free cores, a thread that the scheduler sets aside for
    another process holds every step up, where fewer threads would not. Only where this process may use every CPU
    of the machine (the running count is the machine's, not a container's share)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cores < (os.cpu_count() or cores) or cpu_quota() is not None:
            return None
    if others is None:
        others = others_running()
    if others is None or threads <= 1 or others < 1 or threads <= cores - others:
        return None
    fewer = max(1, min(threads - 1, cores - math.ceil(others)))
    return (f"this machine is busy ({others:.1f} other tasks running on {cores} cores) and decoding uses {threads} "
            f"threads: each parallel step waits for a thread the scheduler sets aside, so replies may come much "
            f"slower than on a quiet machine; --threads {fewer} may be faster while it stays busy")


def default_model(search: list[Path] | None = None, option: str = "--model PATH_OR_HUB_ID") -> str:
    """The path in runs/LATEST (written by training), from the working directory or the repository; `option` names
    the caller's option for another checkpoint."""
    for base in search or (Path.cwd(), Path(__file__).resolve().parents[2]):
        latest = base / "runs" / "LATEST"
        if latest.is_file():
            path = latest.read_text().strip()
            if path and Path(path).is_dir():
                return path
            raise SystemExit(f"{latest} points to {path!r}, which does not exist: retrain with `make train` "
                             f"or pass {option}")
    raise SystemExit("no CWIC checkpoint found: runs/LATEST does not exist. Train one with `make train` "
                     f"(or `make smoke` for a tiny test model), or pass {option}")


def load(model: str, device: str = "cpu", dtype: str = "float32"):
    """A CWIC checkpoint (folder or hub id) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import cwic_exp  # noqa: F401  registers the "cwic" model type
    from .teacher import check_checkpoint
    try:
        check_checkpoint(model, "--model")
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model)
    if getattr(tok, "chat_template", None) is None:
        raise SystemExit(f"{model}: the tokenizer has no chat template; this chat needs one")
    return m, tok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cwic_exp.chat", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="CWIC checkpoint folder or hub id (default: runs/LATEST)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a user turn, non-interactive (repeat for several turns)")
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-context", type=int, default=None,
                   help="default: the model's positions (--backend cpu / engine: at most 4096, their KV cache is "
                        "allocated up front)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--html", default=None, help="write a self-contained coloured page (rewritten after every turn)")
    p.add_argument("--json", default=None, help="write the transcript with every token's figure")
    p.add_argument("--no-color", action="store_true", help="plain text, each token followed by [its figure]")
    p.add_argument("--show-prompt", action="store_true", help="also print the prefilled prompt tokens, coloured")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default="hf", help=f"decoder: {', '.join(BACKENDS)}")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch, and the cpu backend's kernels)")
    return p


def check_args(args) -> None:
    """One line for what would fail later: mid-sampling, or after a reply when the transcript is written."""
    if not args.temperature >= 0:
        raise SystemExit(f"--temperature must be ≥ 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 0 or (args.max_context is not None and args.max_context < 1):
        raise SystemExit(f"--max-new-tokens must be ≥ 0 and --max-context ≥ 1, got {args.max_new_tokens} and "
                         f"{args.max_context}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be ≥ 1, got {args.threads}")
    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path and not Path(path).expanduser().resolve().parent.is_dir():
            raise SystemExit(f"{flag} {path}: its folder does not exist")
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"--device {args.device}: {e}") from None
    if dev.type == "cuda" and args.backend != "cpu" and not torch.cuda.is_available():   # cpu: its own message
        raise SystemExit(f"--device {args.device}: no CUDA device is visible to this torch build")


def main(argv: list[str] | None = None, stdout=None, stderr=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    quota_note = None
    if args.threads is None and torch.device(args.device).type == "cpu":
        # torch and OpenMP size their pools from the CPUs they see, not a container's quota
        quota, seen = cpu_quota(), torch.get_num_threads()
        if quota_threads(quota, seen) < seen:
            args.threads = quota_threads(quota, seen)
            quota_note = (f"this process's CPU quota is {quota:g} cores (cgroup) and torch would use {seen} threads: "
                          f"decoding with {args.threads} (--threads N to choose)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # colour only on a terminal (or FORCE_COLOR=1), never with --no-color or NO_COLOR set
    color = (not args.no_color and not os.environ.get("NO_COLOR")
             and ((stdout or sys.stdout).isatty() or os.environ.get("FORCE_COLOR") == "1"))
    view = TerminalView(color, stdout, stderr)
    if quota_note:
        view.notice(quota_note)
    name = args.model or default_model()
    if args.backend not in BACKENDS:
        raise SystemExit(f"unknown backend {args.backend!r}; available: {sorted(BACKENDS)}")
    if args.backend == "cpu" and torch.device(args.device).type != "cpu":
        raise SystemExit(f"--backend cpu: the C++ kernels run on the CPU, not {args.device!r}: use --device cpu "
                         "(or --backend hf on that device)")
    model, tok = load(name, args.device, args.dtype)
    try:
        if args.backend == "cpu":
            backend = BACKENDS["cpu"](model, args.device, max_len=args.max_context, nthreads=args.threads or 0)
        elif args.backend == "engine":
            if torch.device(args.device).type != "cuda":
                view.notice(f"--backend engine on {args.device}: the engine runs its kernels' PyTorch twins there "
                            "(slow; use --device cuda for the Triton kernels, or --backend cpu on a CPU)")
            backend = BACKENDS["engine"](model, args.device, max_len=args.max_context)
        else:
            backend = BACKENDS[args.backend](model, args.device)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"--backend {args.backend}: {e}")
    if torch.device(args.device).type == "cpu":
        busy = busy_cpu_notice(args.threads or torch.get_num_threads())
        if busy:
            view.notice(busy)
    chat = ChatSession(backend, tok, system=args.system, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       max_context=args.max_context, ignore_eos=args.ignore_eos, notice=view.notice)
    view.legend(chat.calibrate())

    def save():
        tr = chat.transcript(str(name))
        # after every turn: a Ctrl-C during the write must not cost the turns written before
        if args.json:
            write_text_atomic(args.json, json_dumps(tr, ensure_ascii=False, indent=1))
        if args.html:
            write_text_atomic(args.html, to_html(tr))

    def one(user: str) -> None:
        turn = chat.turn(user, view.piece, view.prompt_tokens if args.show_prompt else None)
        if turn is not None:
            if turn.stop == "interrupted":
                view.notice("generation stopped (Ctrl-C); the partial reply is kept")
            view.summary(turn.summary)
            save()

    if args.prompt:
        for user in args.prompt:
            one(user)
        return 0
    view.err.print(f"chatting with {name} — empty input is ignored, /reset starts over, /exit or Ctrl-D quits, "
                   "Ctrl-C stops a generation", markup=False)
    while True:
        try:
            user = input("\nyou> ")
        except EOFError:
            break
        except KeyboardInterrupt:
            view.notice("(type /exit or press Ctrl-D to quit)")
            continue
        if not user.strip():
            continue
        cmd = user.strip().lower()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            chat.reset()
            view.notice("new conversation")
            continue
        view.out.file.write("bot> ")
        one(user)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
