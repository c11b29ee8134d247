"""Lean CPU decoding for dense and CWIC Llama-family models, and APR calibration for benchmarks.

    from cwic_exp.cpu_decode import CpuDecoder, calibrate_apr
    dec = CpuDecoder(model, mode="cwic")                 # or mode="dense" (same model, thresholds ignored)
    ids = dec.generate(prompt_ids, max_new_tokens=64)    # greedy, KV cache

A decode step runs entirely in C++ (`cwic_kernels.cpu` `Decoder`: one Python call per token):
embedding → RMSNorm → q/k/v → RoPE + KV cache → attention → o → RMSNorm → FFN → … → head →
argmax. Dense and CWIC models go through the very same step; only the matrix products differ:

    mode="cwic"                   every CwicLinear: granular sparse GEMV on Wᵀ (θ·σ, x̄, W x̄ + b);
                                  every CwicGatedMLP: the fused FFN (gate GMM → act, unit mask →
                                  active rows of W_up, active columns of W_down)
    mode="dense", dense="own"     the same GEMV kernel and layout with every (stripe, input) on; the FFN as gate|up
                                  GEMV, act·up, down GEMV
    mode="dense", dense="fused"   the same, but the FFN through the CWIC FFN kernel with every unit on (a unit's
                                  up and down rows one contiguous span, as the CWIC decoder reads them)
    mode="dense", dense="torch"   `at::linear` on (m, n) weights in the weights' dtype (= F.linear)

A CWIC model decoded with mode="dense" uses its own (unchanged) weights, so "dense vs CWIC" compares
one model with and without its sparsity. Weights are copied into the decoder's layout (input-major for
our kernels) in `dtype` (bf16 by default); activations and accumulation are fp32, and the KV cache is
kept in `dtype` (a bf16 Hugging Face model keeps a bf16 cache too). The prompt is fed 64 tokens a pass
(`prefill(chunk=...)`: the same kernels with a batch, which stream the weights once a pass; each token attends
causally).

The decoder's weight copies live in 2 MiB-aligned blocks marked MADV_HUGEPAGE (Linux with transparent huge
pages in "madvise" or "always" mode; `huge_pages=False` or CWIC_CPU_HUGEPAGES=0 turns it off): a sparse step
touches nearly every 4 KiB page of a matrix for a fraction of its bytes, so with small pages it pays a TLB
miss per page; on the 2-core benchmark host this made CWIC decode ~5 % and dense ~3 % faster.

`calibrate_apr(model, ids, apr)` sets the thresholds of a converted model (θ and φ, after gathering the
running statistics) so that every counted matrix keeps about 1/apr of its weights on calibration
tokens: a stand-in for a trained CWIC checkpoint when only speed is measured.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .modeling.layers import CwicGatedMLP, CwicLinear

KIND_OWN, KIND_CWIC, KIND_TORCH = 0, 1, 2


def _ext():
    from cwic_kernels import cpu
    ext = cpu.load()
    if ext is None:
        raise RuntimeError(f"CPU decoding needs the C++ kernels: {cpu.error()}")
    return ext


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


# ----------------------------------------------------------------------------- huge-page weight arena

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14          # Linux
_MADV_DONTNEED = 4


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        f = libc.madvise
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return f
    except (OSError, AttributeError):
        return None


class HugePageArena:
    """Copies of tensors in 2 MiB-aligned blocks advised MADV_HUGEPAGE before their pages are touched, so the
    kernel backs them with huge pages (a fresh block is a new anonymous mapping). `put(t)` returns a view of
    the arena holding t's values; the views keep their block alive. Without madvise (not Linux), `put` is
    the identity and `bytes_advised` stays 0."""

    def __init__(self, block_bytes: int = 64 << 20):
        self.block_bytes = int(block_bytes)
        self._madvise = _madvise()
        self._buf = None
        self._off = self._end = 0
        self.bytes_advised = 0
        self.blocks: list[tuple[int, int]] = []   # (address, bytes) of each advised block

    def _new_block(self, n: int) -> None:
        size = -(-max(self.block_bytes, n) // _HUGE) * _HUGE
        buf = torch.empty(size + _HUGE, dtype=torch.uint8)
        p = buf.data_ptr()
        off = -(-p // _HUGE) * _HUGE - p
        if self._madvise(ctypes.c_void_p(p + off), size, _MADV_HUGEPAGE) == 0:
            self.bytes_advised += size
            # the allocator may hand back memory that was touched before (a large tensor freed earlier, such as
            # a calibration's): those pages stay 4 KiB whatever the advice. Dropping them (the block is about to
            # be written anyway) makes the first write fault fresh, huge pages.
            self._madvise(ctypes.c_void_p(p + off), size, _MADV_DONTNEED)
            self.blocks.append((p + off, size))
        self._buf, self._off, self._end = buf, off, off + size

    def huge_bytes(self) -> int:
        """Bytes of the advised blocks that the kernel backs with huge pages now: AnonHugePages of the mappings
        they overlap, from /proc/self/smaps (an upper bound where a block shares a mapping), at most
        `bytes_advised`; 0 where smaps cannot be read."""
        if not self.blocks:
            return 0
        total, inside = 0, False   # inside: the current mapping overlaps a block
        try:
            with open("/proc/self/smaps") as f:
                for line in f:
                    head = line.split(" ", 1)[0]
                    if "-" in head and ":" not in head:
                        lo, hi = (int(v, 16) for v in head.split("-"))
                        inside = any(lo < a + n and a < hi for a, n in self.blocks)
                    elif inside and line.startswith("AnonHugePages:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return 0
        return min(total, self.bytes_advised)   # a block inside a larger mapping: that mapping's count

    def put(self, t: torch.Tensor) -> torch.Tensor:
        if self._madvise is None or not isinstance(t, torch.Tensor) or t.numel() == 0 or not t.is_contiguous():
            return t
        n = t.numel() * t.element_size()
        if self._buf is None or self._off + n > self._end:
            self._new_block(n)
        v = self._buf[self._off:self._off + n].view(t.dtype).view(t.shape)
        v.copy_(t)
        self._off += -(-n // 64) * 64
        return v


def _place_lin(L, place):
    for name in ("w", "thr", "mean", "bias"):
        t = getattr(L, name)
        if isinstance(t, torch.Tensor) and t.numel():
            setattr(L, name, place(t))
    return L


# ----------------------------------------------------------------------------- weight extraction

def _lin_dense(ext, mods, dtype, impl: str):
    """One dense Lin for modules sharing an input (outputs concatenated); impl "torch" or our kernel's layout."""
    L = ext.Lin()
    w = torch.cat([m.weight.detach() for m in mods], 0) if len(mods) > 1 else mods[0].weight.detach()
    biases = [m.bias for m in mods]
    b = None
    if any(x is not None for x in biases):
        b = torch.cat([x.detach().float() if x is not None else torch.zeros(m.out_features)
                       for x, m in zip(biases, mods)])
    if impl == "torch":
        L.kind = KIND_TORCH
        L.w = w.to(dtype).contiguous()
        if b is not None:
            L.bias = b.to(dtype)
    else:
        L.kind = KIND_OWN
        L.w = w.t().to(dtype).contiguous()
        if b is not None:
            L.bias = b.float().contiguous()
    return L


def _lin_cwic(ext, mods, dtype):
    """One CWIC Lin; modules fused along the outputs must each be a whole number of stripes."""
    L = ext.Lin()
    L.kind = KIND_CWIC
    L.stripe = mods[0].stripe_size
    L.w = torch.cat([m.weight.detach().t() for m in mods], 1).to(dtype).contiguous()
    thrs = [m.thresholds().detach().float() for m in mods]
    means = [m.running_stats()[0].detach().float() for m in mods]
    L.thr = torch.cat(thrs, 0).contiguous()
    if all(torch.equal(means[0], mm) for mm in means):
        L.mean = means[0].contiguous()
    else:
        L.mean = torch.cat([mm.expand(t.shape[0], -1) for mm, t in zip(means, thrs)], 0).contiguous()
    L.bias = torch.cat([m.folded_bias().detach().float() for m in mods]).contiguous()
    return L


def _fusable(mods) -> bool:
    s = mods[0].stripe_size
    return all(isinstance(m, CwicLinear) and m.stripe_size == s and m.out_features % s == 0 for m in mods[:-1]) \
        and isinstance(mods[-1], CwicLinear) and mods[-1].stripe_size == s


def _lins(ext, mods, mode, dtype, impl):
    if mode == "cwic" and any(isinstance(m, CwicLinear) for m in mods):
        if all(isinstance(m, CwicLinear) for m in mods) and _fusable(mods):
            return [_lin_cwic(ext, mods, dtype)]
        return [(_lin_cwic(ext, [m], dtype) if isinstance(m, CwicLinear) else _lin_dense(ext, [m], dtype, impl))
                for m in mods]
    return [_lin_dense(ext, mods, dtype, impl)]


# The CWIC FFN's up and down rows go side by side (one span a unit, up and down in one pass) for rows up to this many
# bytes. On the 2-core AMD EPYC host (experiments/results/cpu_amd_epyc_2026-12-03_updown/, cpu_ab in one process
# against the separate matrices): SmolLM2's 1152 B rows, CWIC decode 1.069x (FFN 3.24 -> 2.87 ms a token); the
# 1B shape's 4096 B rows, 0.938x (FFN 24.2 -> 28.0 ms). Where between the two the cut belongs was not measured.
SIDE_BY_SIDE_MAX_ROW = 2048


def _ffn(ext, mlp, mode, dtype, impl, act, place=lambda t: t):
    f = ext.Ffn()
    sparse = mode == "cwic" and isinstance(mlp, CwicGatedMLP)
    if sparse or (mode == "dense" and impl == "fused"):   # the CWIC FFN kernel; dense: no thresholds, every unit on
        assert mlp.up_proj.bias is None and mlp.down_proj.bias is None, "FFN biases are not supported"
        f.cwic = True
        f.act = getattr(mlp, "act_name", act)
        f.gate = _place_lin(_lin_cwic(ext, [mlp.gate_proj], dtype) if sparse
                            else _lin_dense(ext, [mlp.gate_proj], dtype, "own"), place)
        up = mlp.up_proj.weight.detach().to(dtype)
        down_t = mlp.down_proj.weight.detach().t().to(dtype)
        if getattr(ext, "ffn_row_strides", False) and up.shape[1] * up.element_size() <= SIDE_BY_SIDE_MAX_ROW:
            # unit j's up row and down row side by side, (F, 2d): one token reads an active unit as one span
            ud = place(torch.cat([up, down_t], dim=1).contiguous())
            f.up_w, f.down_wt = ud[:, :up.shape[1]], ud[:, up.shape[1]:]
        else:   # longer rows, or a build without row strides (cpu_ab's old side): separate contiguous matrices
            f.up_w, f.down_wt = place(up.contiguous()), place(down_t.contiguous())
        if sparse:
            f.unit_thr = place(mlp.unit_thresholds().detach().float().contiguous())
        return f
    f.cwic = False
    f.act = getattr(mlp, "act_name", act)
    f.gate_up = _place_lin(_lin_dense(ext, [mlp.gate_proj, mlp.up_proj], dtype, impl), place)
    f.down = _place_lin(_lin_dense(ext, [mlp.down_proj], dtype, impl), place)
    return f


def dense_counts(model) -> dict:
    """Weights a dense decode step reads, by part (the APR's denominator: not embeddings)."""
    cfg = _text_config(model)
    d, F = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    attn = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    L = cfg.num_hidden_layers
    return {"attn": attn * L, "ffn": 3 * d * F * L, "head": d * cfg.vocab_size,
            "total": (attn + 3 * d * F) * L + d * cfg.vocab_size}


@dataclass
class DecodeStats:
    tokens: int
    seconds: float
    reads_per_token: dict       # weights read per decoded token, by part (attn, ffn, head, total)
    apr: float                  # dense weights / weights read (counted matrices, on these tokens)
    prefill_seconds: float = 0.0   # the prompt's prefill before the timed tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-12)


class CpuDecoder:
    """Greedy batch-1 decoding with a KV cache, one C++ call per token (see the module docstring). One decoder holds
    one sequence: give each thread its own (a step while another thread's step runs raises "in use by another
    thread"; reading figures from another thread is safe)."""

    def __init__(self, model: nn.Module, mode: str = "cwic", dense: str = "own",
                 dtype: torch.dtype = torch.bfloat16, max_len: int = 1024, isa: str | None = None,
                 nthreads: int = 0, huge_pages: bool | None = None):
        if mode not in ("cwic", "dense"):
            raise ValueError(f"mode must be 'cwic' or 'dense', got {mode!r}")
        if dense not in ("own", "fused", "torch"):
            raise ValueError(f"dense must be 'own', 'fused' or 'torch', got {dense!r}")
        from cwic_kernels import cpu
        ext = _ext()
        self.mode, self.dense_impl, self.dtype, self.max_len = mode, dense, dtype, int(max_len)
        if huge_pages is None:
            huge_pages = os.environ.get("CWIC_CPU_HUGEPAGES", "1") != "0"
        self.arena = HugePageArena() if huge_pages else None
        place = self.arena.put if self.arena is not None else (lambda t: t)
        cfg = _text_config(model)
        base = model.model
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        act = getattr(cfg, "hidden_act", "silu")
        with torch.no_grad():
            pid = torch.arange(self.max_len)[None]
            cos, sin = base.rotary_emb(torch.zeros(1, dtype=torch.float32), pid)
            half = hd // 2
            cos = cos[0, :, :half].float().contiguous()
            sin = sin[0, :, :half].float().contiguous()
            eps = float(getattr(base.norm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6)))
            scaling = float(getattr(base.layers[0].self_attn, "scaling", hd ** -0.5))
            self._dec = ext.Decoder(model.get_input_embeddings().weight.detach().to(dtype).contiguous(),
                                    base.norm.weight.detach().to(dtype).contiguous(), eps, n_heads, n_kv, hd,
                                    scaling, cos, sin, self.max_len, cpu.isa_id(isa), int(nthreads))
            for layer in base.layers:
                at = layer.self_attn
                qkv = [_place_lin(q, place) for q in _lins(ext, [at.q_proj, at.k_proj, at.v_proj], mode, dtype, dense)]
                o = _place_lin(_lins(ext, [at.o_proj], mode, dtype, dense)[0], place)
                ffn = _ffn(ext, layer.mlp, mode, dtype, dense, act, place)
                self._dec.add_layer(layer.input_layernorm.weight.detach().to(dtype).contiguous(),
                                    layer.post_attention_layernorm.weight.detach().to(dtype).contiguous(),
                                    qkv, o, ffn)
            self._dec.set_head(_place_lin(_lins(ext, [model.lm_head], mode, dtype, dense)[0], place))
        self.dense = dense_counts(model)
        self.pos = 0

    # ------------------------------------------------------------------ decoding
    def reset(self) -> None:
        self.pos = 0
        self._dec.reset_reads()

    def step(self, token: int) -> int:
        """Feed one token at the next position; returns the greedy next token."""
        if self.pos >= self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        nxt = self._dec.step(int(token), self.pos)
        self.pos += 1
        return nxt

    def logits(self) -> torch.Tensor:
        """fp32 logits of the last step."""
        return self._dec.logits()

    def prefill(self, ids, chunk: int = 64) -> int:
        """Reset and feed the prompt, `chunk` tokens a pass (the small-batch kernels: the weights streamed once a
        pass, each token attending causally; 1: token by token through `step`); returns the first generated
        token. Logits as the token-by-token path gives them, up to fp32 summation order."""
        ids = torch.as_tensor(ids).reshape(-1).to(torch.int64)
        if ids.numel() == 0:
            raise ValueError("prefill: empty prompt")
        if chunk < 1:
            raise ValueError(f"prefill: chunk must be >= 1, got {chunk}")
        if ids.numel() > self.max_len:
            raise RuntimeError(f"prompt of {ids.numel()} tokens: KV cache holds {self.max_len} positions")
        self.reset()
        nxt = None
        for c0 in range(0, ids.numel(), chunk):
            part = ids[c0:c0 + chunk]
            nxt = self._dec.step(int(part[0]), self.pos) if part.numel() == 1 else self._dec.prefill(part, self.pos)
            self.pos += part.numel()
        return nxt

    def generate(self, ids, max_new_tokens: int = 32, eos: int | None = None) -> list[int]:
        """Greedy continuation of `ids`: the prompt followed by the new tokens."""
        prompt = [int(t) for t in torch.as_tensor(ids).reshape(-1).tolist()]
        out = list(prompt)
        nxt = self.prefill(prompt)
        for i in range(max_new_tokens):
            out.append(nxt)
            if (eos is not None and nxt == eos) or i == max_new_tokens - 1:
                break
            nxt = self.step(nxt)
        return out

    def timed_decode(self, ids, new_tokens: int = 32, forced=None) -> DecodeStats:
        """Prefill (timed apart), then time `new_tokens` greedy decode steps (no early stop). forced: tokens fed in
        place of the greedy choices, one a step (teacher forcing), so that several decoders time the same text."""
        if new_tokens < 1:
            raise ValueError(f"timed_decode: new_tokens must be >= 1 (tokens/s of no token), got {new_tokens}")
        if forced is not None and len(forced) < new_tokens:
            raise ValueError(f"forced: {len(forced)} tokens for {new_tokens} steps")
        t0 = time.perf_counter()
        nxt = self.prefill(ids)
        t_pre = time.perf_counter() - t0
        self._dec.reset_reads()
        t0 = time.perf_counter()
        for i in range(new_tokens):
            nxt = self.step(nxt if forced is None else forced[i])
        dt = time.perf_counter() - t0
        return DecodeStats(new_tokens, dt, *self._reads(new_tokens), prefill_seconds=t_pre)

    def _reads(self, n: int):
        a, f, h, _ = self._dec.reads()
        per = {"attn": a / n, "ffn": f / n, "head": h / n, "total": (a + f + h) / n}
        return per, self.dense["total"] / max(per["total"], 1e-9)

    def profile(self) -> dict:
        """Seconds per decoded token by part since the last reset (C++ wall clock)."""
        _, _, _, n = self._dec.reads()
        names = ("glue", "qkv", "attention", "o", "ffn", "head")
        return {k: v / max(n, 1) for k, v in zip(names, self._dec.profile())}

    def weights_read(self) -> int:
        """Weights the kernels have read since the last reset (counted matrices: q, k, v, o, FFN, head)."""
        a, f, h, _ = self._dec.reads()
        return int(a + f + h)

    def reads_per_token(self) -> dict:
        _, _, _, n = self._dec.reads()
        return self._reads(max(n, 1))[0]


# ----------------------------------------------------------------------------- calibration

def _collect(model, ids, mask):
    """Inputs of every CwicLinear and act(g) of every CwicGatedMLP on the real tokens."""
    from . import cwic_context, iter_cwic_modules
    store, hooks = {}, []
    sel = None if mask is None else mask.reshape(-1).bool()

    def keep(key, t):
        t = t.detach().reshape(-1, t.shape[-1]).float()
        store[key] = t if sel is None else t[sel]

    for m in iter_cwic_modules(model):
        if isinstance(m, CwicLinear):
            hooks.append(m.register_forward_pre_hook(lambda mod, args: keep(mod, args[0])))
        else:
            hooks.append(m.act_fn.register_forward_hook(
                lambda mod, args, out, owner=m: keep(owner, out)))
    try:
        with torch.no_grad(), cwic_context(model, token_mask=mask):
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return store


def _bisect(density_of, target: float, lo: float = 0.0, hi: float = 64.0, iters: int = 22) -> float:
    """c with density_of(c) ≈ target (density_of non-increasing in c)."""
    if density_of(lo) <= target:
        return lo
    while density_of(hi) > target and hi < 1e6:
        hi *= 4
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if density_of(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


@torch.no_grad()
def calibrate_apr(model: nn.Module, input_ids: torch.Tensor, apr: float, attention_mask=None,
                  iters: int = 2, jitter: float = 0.3, seed: int = 0, max_tokens: int = 512,
                  stats: bool = True, cache: dict | None = None, fix_steps: int = 3, tol: float = 0.02) -> dict:
    """Thresholds for a uniform density 1/apr in every counted matrix, on the given tokens.

    A converted model first gathers its running statistics on the tokens with θ = 0 (statistics mode;
    `stats=False` keeps the ones it has). Then, `iters` times (the first pass sees the dense model,
    each later one the sparsity set by the previous one): every CwicLinear gets θ[r, i] = c·u[r, i]
    (u a fixed random jitter in [1 - jitter, 1 + jitter], so stripes differ) with c chosen so that the
    fraction of (token, stripe, input) triples on, weighted by stripe rows, is 1/apr; every CwicGatedMLP
    gets φ_j = c' (uniform) so that 1/apr of its (token, unit) pairs are on. `cache` (a dict) keeps the
    dense pass for later calls with other targets. Returns `cwic_exp.active_parameters` on the tokens.
    """
    from . import active_parameters, cwic_context, iter_cwic_modules
    if not 1 <= float(apr) < float("inf"):    # 0.5 or NaN returned the dense model, 0 and inf raised deep inside
        raise ValueError(f"calibrate_apr: apr must be a finite number ≥ 1 (1: dense), got {apr}")
    if attention_mask is not None and not bool(attention_mask.any()):
        raise ValueError("calibrate_apr: the attention mask leaves no token to calibrate on")
    target = 1.0 / float(apr)
    mods = list(iter_cwic_modules(model))
    with torch.no_grad():
        for m in mods:
            (m.theta if isinstance(m, CwicLinear) else m.phi).zero_()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if stats:
        with cwic_context(model, token_mask=attention_mask, update_stats=True):
            model(input_ids=input_ids, attention_mask=attention_mask)
    g = torch.Generator().manual_seed(seed)
    jit = {}
    for m in mods:
        if isinstance(m, CwicLinear):
            jit[m] = 1.0 + jitter * (2 * torch.rand(m.theta.shape, generator=g) - 1)
    for it in range(max(1, iters)):
        if it == 0 and cache is not None and "dense" in cache:
            store = cache["dense"]
        else:
            store = _collect(model, input_ids, attention_mask)
            if it == 0:
                sub = {}
                for m, x in store.items():   # subsample once: every later call sees the same tokens
                    sub[m] = x[torch.randperm(x.shape[0], generator=g)[:max_tokens]] if x.shape[0] > max_tokens else x
                store = sub
                if cache is not None:
                    cache["dense"] = store
        for m in mods:
            x = store[m]
            if x.shape[0] > max_tokens:
                x = x[torch.randperm(x.shape[0], generator=g)[:max_tokens]]
            if isinstance(m, CwicLinear):
                mean, std = m.running_stats()
                zs = ((x - mean) / std.clamp_min(1e-12)).abs().t().contiguous().sort(1).values  # (n, N)
                u = jit[m].t().contiguous().to(zs.device)                 # (n, k), on the model's device
                rows = m._rows.float().to(zs.device)                      # (k,)
                w = rows / rows.sum()
                N = zs.shape[1]

                def dens(c, zs=zs, u=u, w=w, N=N):
                    on = N - torch.searchsorted(zs, c * u)                # (n, k): tokens with z >= c·u
                    return float((on.float().mean(0) / N * w).sum())
                c = _bisect(dens, target)
                m.theta.copy_(c * jit[m])
            else:
                scale = m.running_stats()[1]
                a = (x.abs() / scale.clamp_min(1e-12)).flatten().sort().values
                N = a.numel()
                c = _bisect(lambda c, a=a, N=N: float(N - torch.searchsorted(a, a.new_tensor([c]))[0]) / N,
                            target)
                m.phi.fill_(c)
    # the passes interact (thresholds change the next layers' inputs): correct the whole model with one
    # global factor on θ and φ (secant steps on log APR vs log factor) until within `tol` of the target
    import math
    saved = {m: (m.theta if isinstance(m, CwicLinear) else m.phi).detach().clone() for m in mods}

    def set_scale(x):
        for m in mods:
            (m.theta if isinstance(m, CwicLinear) else m.phi).copy_(saved[m] * math.exp(x))

    st = active_parameters(model, input_ids, attention_mask)
    xs, fs = [0.0], [math.log(st["apr"] / apr)]
    best = (abs(fs[0]), 0.0, st)
    x_next = -fs[0] / 1.5                 # first guess: log APR grows ~1.5× as fast as log factor
    for _ in range(fix_steps):
        if best[0] <= math.log1p(tol):
            break
        set_scale(x_next)
        st_n = active_parameters(model, input_ids, attention_mask)
        f_n = math.log(st_n["apr"] / apr)
        xs.append(x_next)
        fs.append(f_n)
        if abs(f_n) < best[0]:
            best = (abs(f_n), x_next, st_n)
        if f_n == fs[-2]:
            break
        x_next = xs[-1] - f_n * (xs[-1] - xs[-2]) / (f_n - fs[-2])
    set_scale(best[1])
    st = best[2]
    st["threshold_scale"] = math.exp(best[1])
    return st
