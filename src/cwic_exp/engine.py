"""Decode engine: static KV cache, one CUDA graph per decode step, same code for dense and CWIC models.

    from cwic_exp.engine import DecodeEngine
    eng = DecodeEngine(model, max_len=512)          # a Hugging Face Llama-family model, dense or CWIC
    tokens = eng.generate(prompt_ids, max_new_tokens=128)     # greedy; (T + 128,) on the device

`prepare_decode(model)` turns the model into flat decode weights: for every CWIC matrix the input-major
bf16 weight (Wᵀ), the per-stripe thresholds θ·σ, the running mean and the folded bias W x̄ + b (q, k and
v fused into one matrix when their widths are whole stripes); for every dense matrix the plain weight
(q/k/v and gate/up fused). The engine then runs one decoder, in which only the matrix products differ:
cuBLAS (`F.linear`/`addmm`) for dense matrices, the granular sparse GEMV (`cwic_kernels.gpu`) for CWIC
ones. RoPE + cache writes, attention and the greedy argmax are the same Triton kernels for both; the
RMSNorms are a Triton kernel before each dense matrix and are computed inside the CWIC kernels that
read the normalised vector (`fuse_norm`; CWIC_FUSE_NORM=0 gives them the separate kernel too, for A/B
runs). For one token the CWIC q/k/v and o kernels skip their split-K arrival and epilogue: they add their
partial sums into fp32 buffers (`gemv_ex(acc_out=...)`), which the RoPE kernel (q/k/v) and the one-launch
FFN kernel (o: it adds the residual itself) round and clear (`acc_qkv`, `acc_o`; CWIC_ACC_QKV=0 /
CWIC_ACC_O=0 turn them off for A/B runs). The one-launch FFN hands its product on likewise (`acc_ffn`,
CWIC_ACC_FFN=0: off): it adds it into an fp32 buffer and writes its input, the residual stream; the next
layer's q/k/v kernel reads the two, adds them, and writes the sum as that layer's residual stream
(`gemv_ex(x_acc=..., x_out=...)`); the next RoPE kernel clears the o and FFN buffers, whose readers have
all finished by then (stream order; with PDL every kernel waits for its predecessor's completion before it
touches memory, so transitively for all earlier ones). The last layer's FFN keeps its epilogue.
With CWIC_FUSE_ROPE=1 (`fuse_rope`; off: slower than `acc_qkv`, which it replaces) the CWIC q/k/v kernel of one token applies RoPE and writes the cache in its epilogue.
Positions live in a device tensor, and a decode step (embedding → logits → argmax → next input) has no host
synchronisation, so it is captured once and replayed. On the CPU the engine runs the same code with the
PyTorch twins of the kernels (`triton=True` runs the Triton kernels there under TRITON_INTERPRET=1).

For the chat (`cwic_exp.chat --backend engine`), `DecodeEngine(model, count_reads=True)` has the one-token kernels
add the weights they read to a device counter (`reads`: q/k/v and o, FFN, head; one atomic a kernel program), and
`feed(token, pos)` runs one step of a given token at a given position (the graph replayed) and returns its logits.

An engine holds one sequence (its cache, positions and buffers): a call that would run it (capture, prefill, feed,
decode, generate, refresh) while another thread's call runs is refused by name, as the CPU `Decoder` does, instead of
interleaving the two threads' kernels on the shared buffers. Give each thread its own engine.

Prefill runs eagerly over all prompt tokens: up to `gemm_from - 1` tokens (default 511) with the same kernels
(the small-batch GEMV path: below `gemv.DENSE_W_FROM` tokens a tile skips what all its tokens skip, 2 tokens and
3-4 of some shapes in the small blocks of `gemv.small_block`; from there on a 16-token tile reads every weight row,
its tokens' masks applied to x), from `gemm_from` tokens on
(CWIC_PREFILL_GEMM=T; 0: never) with per-stripe GEMMs on masked, centred inputs (`cwic_kernels.gpu.prefill`:
cuBLAS, the weights read once, the same product up to fp32 rounding). On the H200 (1B-shaped, 3x APR,
experiments/bench/gpu_prefill.py) the GEMM path was slower than the kernels up to 256 tokens (about 15 torch ops
a matrix, eager) and slightly faster at 512 (31 vs 33 ms); both stay behind dense prefill (7.5 ms), launch-bound.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modeling.layers import CwicGatedMLP, CwicLinear


@dataclass
class Linear:
    """One (possibly fused) matrix, ready for decode. dense: w (m, n); cwic: wt (n, m) + mask data."""
    kind: str                       # "dense" | "cwic"
    out_features: int
    w: torch.Tensor | None = None
    wt: torch.Tensor | None = None
    bias: torch.Tensor | None = None   # dense: weight dtype or None; cwic: fp32 folded W x̄ + b
    mean: torch.Tensor | None = None   # cwic: (n,) or per stripe (k, n), fp32
    thr: torch.Tensor | None = None    # cwic: (k, n) fp32, θ·σ
    stripe: int = 0
    mods: tuple = ()                   # cwic: the source modules (for `refresh`)

    def nbytes(self) -> int:
        t = self.w if self.kind == "dense" else self.wt
        return t.numel() * t.element_size()


@dataclass
class FFN:
    kind: str                       # "dense" | "cwic"
    act: str
    gate_up: torch.Tensor | None = None    # dense (2F, d)
    down: torch.Tensor | None = None       # dense (d, F)
    gate: Linear | None = None             # cwic: striped GMM
    up_w: torch.Tensor | None = None       # cwic: (F, d), row j = unit j's input weights
    down_wt: torch.Tensor | None = None    # cwic: (F, d), row j = unit j's output weights
    unit_thr: torch.Tensor | None = None   # cwic: (F,) fp32
    mlp: nn.Module | None = None


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: list                       # one fused Linear, or [q, k, v]
    o: Linear
    ffn: FFN


@dataclass
class DecodeWeights:
    embed: torch.Tensor
    layers: list
    norm: torch.Tensor
    head: Linear
    eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    rotary: nn.Module
    vocab: int


def _cwic_linear(mods: list, dtype) -> Linear:
    """Fuse CwicLinear modules that share an input along the outputs (each a whole number of stripes)."""
    with torch.no_grad():
        stripe = mods[0].stripe_size
        wts, means, thrs, biases = [], [], [], []
        for m in mods:
            mean = m.running_stats()[0].float()
            thr = m.thresholds().float().detach()
            wts.append(m.weight.detach().t().to(dtype))
            thrs.append(thr)
            means.append(mean.expand(thr.shape[0], -1))
            biases.append(m.folded_bias().float())
        same_mean = all(torch.equal(means[0][0], mm[0]) for mm in means)
        mean = means[0][0].contiguous() if same_mean else torch.cat(means, 0).contiguous()
        return Linear("cwic", sum(m.out_features for m in mods), wt=torch.cat(wts, 1).contiguous(),
                      bias=torch.cat(biases).contiguous(), mean=mean, thr=torch.cat(thrs, 0).contiguous(),
                      stripe=stripe, mods=tuple(mods))


def _dense_linear(mods: list, dtype) -> Linear:
    with torch.no_grad():
        w = torch.cat([m.weight.detach().to(dtype) for m in mods], 0).contiguous() if len(mods) > 1 \
            else mods[0].weight.detach().to(dtype).contiguous()
        has_b = [m.bias is not None for m in mods]
        b = None
        if any(has_b):
            b = torch.cat([m.bias.detach().to(dtype) if m.bias is not None
                           else torch.zeros(m.out_features, dtype=dtype, device=w.device) for m in mods])
        return Linear("dense", w.shape[0], w=w, bias=b)


def _linear(mods: list, dtype) -> list:
    """One fused Linear when possible, else one per module."""
    if all(isinstance(m, CwicLinear) for m in mods):
        s = mods[0].stripe_size
        if len(mods) == 1 or all(m.stripe_size == s and m.out_features % s == 0 for m in mods):
            return [_cwic_linear(mods, dtype)]
        return [_cwic_linear([m], dtype) for m in mods]
    if not any(isinstance(m, CwicLinear) for m in mods):
        return [_dense_linear(mods, dtype)]
    return [(_cwic_linear if isinstance(m, CwicLinear) else _dense_linear)([m], dtype) for m in mods]


@torch.no_grad()
def prepare_decode(model: nn.Module, dtype: torch.dtype | None = None) -> DecodeWeights:
    """Flat decode weights of a Llama-family causal LM (dense, or converted by `cwic_exp.to_cwic`)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dtype = dtype or model.get_input_embeddings().weight.dtype
    base = model.model
    layers = []
    for layer in base.layers:
        at, mlp = layer.self_attn, layer.mlp
        qkv = _linear([at.q_proj, at.k_proj, at.v_proj], dtype)
        o = _linear([at.o_proj], dtype)[0]
        if isinstance(mlp, CwicGatedMLP):
            ffn = FFN("cwic", mlp.act_name, gate=_cwic_linear([mlp.gate_proj], dtype),
                      up_w=mlp.up_proj.weight.detach().to(dtype).contiguous(),
                      down_wt=mlp.down_proj.weight.detach().t().to(dtype).contiguous(),
                      unit_thr=mlp.unit_thresholds().float().detach().contiguous(), mlp=mlp)
            assert mlp.up_proj.bias is None and mlp.down_proj.bias is None, "FFN biases not supported"
        else:
            assert getattr(mlp.up_proj, "bias", None) is None
            ffn = FFN("dense", getattr(cfg, "hidden_act", "silu"),
                      gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).to(dtype).contiguous(),
                      down=mlp.down_proj.weight.detach().to(dtype).contiguous())
        layers.append(Layer(layer.input_layernorm.weight.detach().to(dtype),
                            layer.post_attention_layernorm.weight.detach().to(dtype), qkv, o, ffn))
    head = _linear([model.lm_head], dtype)[0]
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return DecodeWeights(
        embed=model.get_input_embeddings().weight.detach().to(dtype), layers=layers,
        norm=base.norm.weight.detach().to(dtype), head=head,
        eps=float(getattr(base.norm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6))),
        n_heads=n_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
        scaling=float(getattr(base.layers[0].self_attn, "scaling", head_dim ** -0.5)),
        rotary=base.rotary_emb, vocab=cfg.vocab_size)


@torch.no_grad()
def refresh_thresholds(w: DecodeWeights) -> None:
    """Copy the modules' current thresholds, means and folded biases into the decode buffers in place
    (the weights are unchanged), so a captured CUDA graph stays valid after θ or the statistics move."""
    def lin(L: Linear):
        if L.kind != "cwic":
            return
        thrs = [m.thresholds().float() for m in L.mods]
        means = [m.running_stats()[0].float().expand(t.shape[0], -1) for m, t in zip(L.mods, thrs)]
        L.thr.copy_(torch.cat(thrs, 0))
        L.bias.copy_(torch.cat([m.folded_bias().float() for m in L.mods]))
        L.mean.copy_(torch.cat(means, 0) if L.mean.dim() == 2 else means[0][0])
    for layer in w.layers:
        for q in layer.qkv:
            lin(q)
        lin(layer.o)
        if layer.ffn.kind == "cwic":
            lin(layer.ffn.gate)
            layer.ffn.unit_thr.copy_(layer.ffn.mlp.unit_thresholds().float())
    lin(w.head)


def weight_bytes(w: DecodeWeights) -> dict:
    """Bytes of every matrix a dense decode step reads (CWIC reads a fraction of its share)."""
    n = {"attn": 0, "ffn": 0, "head": w.head.nbytes()}
    for L in w.layers:
        n["attn"] += sum(q.nbytes() for q in L.qkv) + L.o.nbytes()
        f = L.ffn
        if f.kind == "dense":
            n["ffn"] += f.gate_up.numel() * f.gate_up.element_size() + f.down.numel() * f.down.element_size()
        else:
            n["ffn"] += f.gate.nbytes() + 2 * f.up_w.numel() * f.up_w.element_size()
    n["total"] = sum(n.values())
    return n


def _one_thread(fn):
    """Run `fn` holding the engine; a second thread's call while it runs is refused (the same thread may nest:
    generate calls capture, prefill and decode)."""
    @functools.wraps(fn)
    def run(self, *args, **kw):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("DecodeEngine: in use by another thread; an engine holds one sequence (its cache, "
                               "positions and buffers): give each thread its own")
        try:
            return fn(self, *args, **kw)
        finally:
            self._busy.release()
    return run


class DecodeEngine:
    """Greedy decoding with a static KV cache; a decode step is one CUDA-graph replay on CUDA."""

    def __init__(self, model: nn.Module, max_len: int = 1024, dtype: torch.dtype | None = None,
                 cuda_graph: bool = True, triton: bool | None = None, gemm_from: int | None = None,
                 count_reads: bool = False):
        from cwic_kernels.gpu import backend
        self._busy = threading.RLock()
        self.device = next(model.parameters()).device
        self.w = prepare_decode(model, dtype)
        self.dtype = self.w.embed.dtype
        self.K = backend(self.device, triton)
        self.max_len = int(max_len)
        w = self.w
        L = len(w.layers)
        self.kc = torch.zeros(L, self.max_len, w.n_kv_heads, w.head_dim, dtype=self.dtype, device=self.device)
        self.vc = torch.zeros_like(self.kc)
        with torch.no_grad():
            pid = torch.arange(self.max_len, device=self.device)[None]
            cos, sin = w.rotary(torch.zeros(1, dtype=torch.float32, device=self.device), pid)
        half = w.head_dim // 2
        self.cos = cos[0, :, :half].float().contiguous()
        self.sin = sin[0, :, :half].float().contiguous()
        self.pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._pos_host = 0      # the host's copy of pos (prefill, feed and decode keep it): decode() checks it
        self.tok = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.tokens = torch.zeros(self.max_len + 1, dtype=torch.int64, device=self.device)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        # RMSNorm fused into the CWIC kernels that consume it (CWIC_FUSE_NORM=0: a separate kernel, for A/B)
        self.fuse_norm = os.environ.get("CWIC_FUSE_NORM", "1") != "0"
        # RoPE and the cache writes in the epilogue of the CWIC q/k/v kernel of one token (CWIC_FUSE_ROPE=1; it takes
        # precedence over acc_qkv). Off: +0.3 % on the H200 before acc_qkv, -4.1 % against it
        # (experiments/results/gpu_h200/tune_2026-12-02_1 and _2)
        self.fuse_rope = os.environ.get("CWIC_FUSE_ROPE", "0") == "1"
        # one token: the CWIC q/k/v kernel adds its split-K partials into an fp32 buffer (no arrival, no epilogue)
        # and the RoPE kernel rounds and consumes it (CWIC_ACC_QKV=0: the kernel's own epilogue, for A/B runs)
        self.acc_qkv = os.environ.get("CWIC_ACC_QKV", "1") != "0"
        # likewise the o product, which the one-launch FFN kernel adds to the residual stream itself, where the FFN
        # runs in one launch (CWIC_ACC_O=0: off). The buffers are zeroed again by capture() and prefill()
        self.acc_o = os.environ.get("CWIC_ACC_O", "1") != "0"
        # and the FFN's product, handed to the next layer's q/k/v kernel, which adds the residual stream the FFN
        # passed through and writes it for the layer (CWIC_ACC_FFN=0: off). The next RoPE kernel clears the o and
        # FFN sums once their readers have finished
        self.acc_ffn = os.environ.get("CWIC_ACC_FFN", "1") != "0"
        # one token, dense and CWIC alike: RoPE, the cache writes and the attention in one launch
        # (`decode.rope_attention`; CWIC_FUSE_ATTN=1; else rope_cache, then decode_attention). With acc_qkv the
        # q/k/v sums alternate between two buffers by layer parity, and each layer's launch clears the other one
        # (read by the previous layer's launch, finished by then) along with the o and FFN hand-off sums
        # Off by default: on the H200 (1B-shaped, 3x APR, two alternations) it made the dense engine 1.5 % faster
        # (991.6 -> 1006.5 tok/s) and the CWIC engine 2.3 % slower (1755.9 -> 1713.9), 1.77x -> 1.70x
        self.fuse_attn = os.environ.get("CWIC_FUSE_ATTN", "0") == "1"
        # one token, where the o product hands its sum to the FFN (acc_o): the attention and the CWIC o product of
        # its output in one launch (`decode.attn_o`: each head's programs multiply its own output into the o sum;
        # the attention output never goes to memory). CWIC_ATTN_O=1 turns it on. Off by default: on the H200
        # (1B-shaped, 3x APR) it made the CWIC engine slower at every split tried, 1.816x -> 1.48-1.51x (4 programs
        # a head), 1.69x (8), 0.97x (1) (experiments/results/gpu_h200/attn_o_2026-12-03)
        self.attn_o = os.environ.get("CWIC_ATTN_O", "0") == "1"
        # from this many tokens on, CWIC products run as per-stripe GEMMs (`cwic_kernels.gpu.prefill`); 0: never
        if gemm_from is None:
            gemm_from = int(os.environ.get("CWIC_PREFILL_GEMM", "512"))
        if gemm_from < 0:
            raise ValueError(f"gemm_from: a number of tokens >= 0 (0: never), got {gemm_from}")
        self.gemm_from = int(gemm_from)
        self._acc: dict = {}
        # whether any layer may sum its q/k/v into a hand-off buffer (one fused CWIC q/k/v matrix)
        self._cwic_qkv = any(len(L.qkv) == 1 and L.qkv[0].kind == "cwic" for L in self.w.layers)
        # count_reads: every one-token forward (a decode step, or a one-token prefill; longer prompts are not counted)
        # adds the weights its products read to `reads` (int64, [q/k/v and o, FFN,
        # head]), on the device inside the kernels (one atomic a program; the kernels' `count=`); the chat's per-token
        # figures. attn_o is then off (its o product does not count). Off by default: the benchmarks do not count
        self.count_reads = bool(count_reads)
        self.reads = torch.zeros(3, dtype=torch.int64, device=self.device)
        self.logits = None   # the last step's logits (1, V); with a CUDA graph a static buffer, rewritten each replay
        self.graph = None

    @_one_thread
    def refresh(self) -> None:
        """Take up new thresholds / statistics of the source model without re-capturing the graph."""
        refresh_thresholds(self.w)

    # ------------------------------------------------------------------ the model
    def _lin(self, lin: Linear, x, residual=None, norm=None, count=None):
        """y = lin(x) (+ residual); norm = (w, eps): x is the residual stream and lin takes RMSNorm(x)·w,
        fused into the CWIC kernels, a separate kernel before a dense matrix. count: one token's weights read are
        added into it (a dense matrix: all of them)."""
        if norm is not None and lin.kind == "dense":
            x = self.K.rmsnorm(x, norm[0], norm[1])
        if count is not None and lin.kind == "dense":
            count += lin.w.numel()
        if lin.kind == "dense":
            if residual is not None and lin.bias is None:
                return torch.addmm(residual, x, lin.w.t())
            y = F.linear(x, lin.w, lin.bias)
            return y if residual is None else y + residual
        if self._gemm(x):
            from cwic_kernels.gpu.prefill import masked_gemm
            assert count is None, "count: one token at a time"
            if norm is not None:
                x = self.K.rmsnorm(x, norm[0], norm[1])
            return masked_gemm(x, lin.wt, lin.mean, lin.thr, lin.bias, lin.stripe, residual=residual)
        gemv = self.K.gemv_ex if self.K.supports_stripe(lin.stripe, lin.out_features) else _ref_gemv_ex
        nw, eps = norm if norm is not None else (None, 1e-6)
        return gemv(x, lin.wt, lin.mean, lin.thr, lin.bias, lin.stripe, residual=residual, norm_w=nw, eps=eps,
                    count=count)

    def _gemm(self, x: torch.Tensor) -> bool:
        """Whether CWIC products of these tokens run as GEMMs (`gemm_from`; never one token: the decode step)."""
        return 0 < self.gemm_from <= x.shape[0] and x.shape[0] > 1

    def _acc_buf(self, key: str, m: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A static (1, m) buffer: fp32 for `gemv_ex(acc_out=...)`, zeroed once, which its consumer (or, for the o
        and FFN sums of a hand-off, the next RoPE kernel) leaves zeroed; "h": the residual stream a handed-on
        q/k/v kernel writes (`gemv_ex(x_out=...)`)."""
        acc = self._acc.get((key, m))
        if acc is None:
            acc = self._acc[(key, m)] = torch.zeros((1, m), dtype=dtype, device=self.device)
        return acc

    def _clear_acc(self) -> None:
        """Zero the hand-off buffers and the static residual-stream buffer (the hand-off buffers are left zeroed
        by their consumers; this recovers from a step that stopped
        half-way, e.g. an exception in an eager forward, or a switch flipped between producer and consumer)."""
        for a in self._acc.values():
            a.zero_()

    def _hand_buf(self, d: int) -> torch.Tensor:
        """The o product's and the FFN's fp32 sums, (1, 2d) in one buffer, so that one kernel clears both."""
        return self._acc_buf("o+ffn", 2 * d)

    def _ffn(self, f: FFN, x, residual, norm=None, x_acc=None, y_acc=None, count=None):
        """FFN(RMSNorm(x)·w) + residual for norm = (w, eps), else FFN(x) + residual. x_acc (CWIC only): the
        input and residual are x + x_acc (the o product's fp32 sum), rounded; x_acc is left zeroed. y_acc (the
        one-launch FFN only): the product is added into y_acc and the input (x + x_acc) returned; x_acc is not
        cleared (`_attention` has the next RoPE kernel do it). count: as in `_lin`."""
        if count is not None and f.kind == "dense":
            count += f.gate_up.numel() + f.down.numel()
        if norm is not None and f.kind == "dense":
            x = self.K.rmsnorm(x, norm[0], norm[1])
        nw, eps = norm if norm is not None else (None, 1e-6)
        if f.kind == "dense":
            assert x_acc is None, "x_acc: CWIC FFNs only"
            h = self.K.act_mul(F.linear(x, f.gate_up), f.act)
            return torch.addmm(residual, h, f.down.t())
        g = f.gate
        if self._gemm(x):
            from cwic_kernels.gpu.prefill import ffn_gemm
            assert x_acc is None and y_acc is None and count is None, "x_acc / y_acc / count: one token only"
            if norm is not None:
                x = self.K.rmsnorm(x, nw, eps)
            return ffn_gemm(x, g.wt, g.mean, g.thr, g.bias, g.stripe, f.up_w, f.down_wt, f.unit_thr, f.act,
                            residual=residual)
        if not self.K.supports_stripe(g.stripe, g.out_features):
            from cwic_kernels.gpu.fallback import ffn_ref
            return ffn_ref(x, g.wt, g.mean, g.thr, g.bias, g.stripe, f.up_w, f.down_wt, f.unit_thr,
                           f.act, residual=residual, norm_w=nw, eps=eps, x_acc=x_acc, y_acc=y_acc, count=count)
        return self.K.ffn(x, g.wt, g.mean, g.thr, g.bias, g.stripe, f.up_w, f.down_wt, f.unit_thr,
                          f.act, residual=residual, norm_w=nw, eps=eps, x_acc=x_acc, y_acc=y_acc, count=count)

    def _one_token_cwic(self, lin: Linear, h: torch.Tensor) -> bool:
        """Whether lin runs as a one-token CWIC kernel (the cases where a hand-off or an epilogue fusion applies)."""
        return lin.kind == "cwic" and h.shape[0] == 1 and self.K.supports_stripe(lin.stripe, lin.out_features)

    def _hand_o_to_ffn(self, L: Layer, h: torch.Tensor) -> bool:
        """Whether layer L's o product hands its fp32 sum to the FFN (`acc_o`): a one-token CWIC o and a CWIC FFN
        that runs in one launch (the only FFN kernel that reads the sum itself)."""
        g = L.ffn.gate
        return self.acc_o and L.ffn.kind == "cwic" and self._one_token_cwic(L.o, h) \
            and self._one_token_cwic(g, h) and self.K.ffn_one_launch(g.wt.shape[0], g.out_features, g.stripe)

    def _hand_ffn_to_qkv(self, L: Layer, nxt: Layer | None, h: torch.Tensor) -> bool:
        """Whether layer L's FFN hands its fp32 product to the next layer's q/k/v kernel (`acc_ffn`): L hands o to
        its one-launch FFN, and the next layer's q/k/v is one fused one-token CWIC product summed for RoPE."""
        return self.acc_ffn and nxt is not None and self._hand_o_to_ffn(L, h) and self.fuse_norm \
            and self.acc_qkv and not self.fuse_rope and len(nxt.qkv) == 1 and self._one_token_cwic(nxt.qkv[0], h)

    def _attend(self, li: int, qkv: torch.Tensor, acc: bool = False, clear: torch.Tensor | None = None,
                o_acc: tuple | None = None):
        """Layer li's attention output for its q/k/v (T, (hq + 2 hkv)·hd), RoPE and the cache writes included:
        one launch for one token (`fuse_attn`), else rope_cache then decode_attention. acc: qkv is the fp32 sum of
        a summed q/k/v kernel; clear: the o and FFN hand-off sums to zero (their readers have finished).
        o_acc = (o, buffer) (`_o_fusable`): the attention and the o product in one launch (`attn_o`), whose sum goes
        into the buffer; returns None."""
        w, K = self.w, self.K
        if self.fuse_attn and qkv.shape[0] == 1:
            assert o_acc is None, "o_acc: not with the fused RoPE + attention launch (see _o_fusable)"
            clears = [clear] if clear is not None else []
            # the next layer's q/k/v sum (its last reader has finished), whether or not this layer sums its own: a
            # dense layer between two summing ones must clear the buffer they share
            nxt = self._qkv_buf(li + 1, qkv.shape[1]) if self._cwic_qkv else None
            if nxt is not None and nxt is not qkv:
                clears.append(nxt)
            att = K.rope_attention(qkv, self.pos, self.cos, self.sin, self.kc[li], self.vc[li], w.n_heads,
                                   w.n_kv_heads, w.scaling, acc=acc, clear=clears)
            if nxt is qkv:   # one layer: nobody else to clear it
                qkv.zero_()
            return att
        q = K.rope_cache(qkv, self.pos, self.cos, self.sin, self.kc[li], self.vc[li], w.n_heads, w.n_kv_heads,
                         acc=acc, clear=clear)
        return self._attn_out(li, q, o_acc)

    def _attn_out(self, li: int, q: torch.Tensor, o_acc: tuple | None):
        """decode_attention of the rotated q, or with o_acc = (o, buffer) `attn_o` (returns None)."""
        w, K = self.w, self.K
        if o_acc is not None:
            o, buf = o_acc
            K.attn_o(q, self.kc[li], self.vc[li], self.pos, w.n_heads, w.scaling, o.wt, o.mean, o.thr, o.bias,
                     o.stripe, acc_out=buf)
            return None
        return K.decode_attention(q, self.kc[li], self.vc[li], self.pos, w.n_heads, w.scaling)

    def _o_fusable(self, L: Layer, h: torch.Tensor) -> bool:
        """Whether layer L's attention and o product run in one launch (`attn_o`): o hands its sum to the FFN
        (`_hand_o_to_ffn`), no fused RoPE + attention launch, `attn_o_config` tiles the o shape, and the engine does
        not count reads (`attn_o` does not count its o product's)."""
        o = L.o
        return self.attn_o and not self.count_reads and not self.fuse_attn and self._hand_o_to_ffn(L, h) and \
            self.K.attn_o_config(o.out_features, o.stripe, self.w.head_dim) is not None

    def _qkv_buf(self, li: int, m: int) -> torch.Tensor:
        """The fp32 buffer layer li (modulo the layers: li = L is the next step's layer 0) adds its q/k/v sum into:
        one, zeroed by its rope_cache; with `fuse_attn` one by layer parity, which the launch of the layer before
        clears (see `_attend`). With an odd number of layers the last one takes a third buffer, so that layer 0 of
        the next step does not add into the sum the last layer's launch is still reading."""
        if not self.fuse_attn:
            return self._acc_buf("qkv", m)
        n = len(self.w.layers)
        li %= n
        return self._acc_buf(f"qkv{2 if n % 2 and li == n - 1 and n > 1 else li % 2}", m)

    def _attention(self, li: int, L: Layer, h: torch.Tensor, x_acc: torch.Tensor | None = None,
                   o_acc: tuple | None = None, count: torch.Tensor | None = None):
        """Layer li's attention output for the residual stream h (T, d), its rotated keys and values written to
        the cache, and h. x_acc (`_hand_ffn_to_qkv`): the residual stream is h + x_acc (the previous FFN's
        product), formed and written to a static buffer by the q/k/v kernel, and returned. o_acc = (o, buffer)
        (`_o_fusable`): the o product of the attention output is added into the buffer in the attention's launch,
        and None is returned in its place. count: the q/k/v products' reads are added into it (one token)."""
        w, K = self.w, self.K
        lin = L.qkv[0]
        fused = self.fuse_norm and len(L.qkv) == 1      # one q/k/v matrix: RMSNorm inside the CWIC kernels
        one_cwic = fused and self._one_token_cwic(lin, h)
        assert x_acc is None or (one_cwic and self.acc_qkv and not self.fuse_rope), \
            "x_acc: the summed one-token q/k/v path"
        if one_cwic and self.fuse_rope:
            # one token: norm, q/k/v product, RoPE and the cache writes in one CWIC launch
            q = K.qkv_rope(h, lin.wt, lin.mean, lin.thr, lin.bias, lin.stripe, self.pos, self.cos, self.sin,
                           self.kc[li], self.vc[li], w.n_heads, w.n_kv_heads, norm_w=L.ln1, eps=w.eps, count=count)
            return self._attn_out(li, q, o_acc), h
        if one_cwic and self.acc_qkv:
            acc = self._qkv_buf(li, lin.out_features)
            clear = None
            if x_acc is not None:   # the new residual stream h + x_acc goes to a static buffer; RoPE clears the sums
                h_in, h = h, self._acc_buf("h", h.shape[1], h.dtype)
                clear = self._hand_buf(h.shape[1])
                K.gemv_ex(h_in, lin.wt, lin.mean, lin.thr, lin.bias, lin.stripe, norm_w=L.ln1, eps=w.eps,
                          acc_out=acc, x_acc=x_acc, x_out=h, count=count)
            else:
                K.gemv_ex(h, lin.wt, lin.mean, lin.thr, lin.bias, lin.stripe, norm_w=L.ln1, eps=w.eps, acc_out=acc,
                          count=count)
            return self._attend(li, acc, acc=True, clear=clear, o_acc=o_acc), h
        if fused:   # (dense: a norm kernel before the product)
            qkv = self._lin(lin, h, norm=(L.ln1, w.eps), count=count)
        else:
            xn = K.rmsnorm(h, L.ln1, w.eps)
            qkv = [self._lin(q, xn, count=count) for q in L.qkv]
            qkv = qkv[0] if len(qkv) == 1 else torch.cat(qkv, 1)
        return self._attend(li, qkv.contiguous(), o_acc=o_acc), h

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Tokens ids (T,) at positions self.pos[0] + t: write the cache, return logits (1 or T, V)."""
        w, K = self.w, self.K
        h = F.embedding(ids, w.embed)                               # (T, d)
        fuse = self.fuse_norm
        # one token with count_reads: its products add their weights read into reads[part]
        ca, cf, ch = ((self.reads[0:1], self.reads[1:2], self.reads[2:3]) if self.count_reads and ids.shape[0] == 1
                      else (None, None, None))
        y_acc = None   # the previous FFN's product, handed on to this layer's q/k/v kernel
        for li, L in enumerate(w.layers):
            hand_o = fuse and self._hand_o_to_ffn(L, h)
            o_acc = None
            if hand_o and self._o_fusable(L, h):   # the o product inside the attention's launch
                o_acc = (L.o, self._hand_buf(L.o.out_features)[:, :L.o.out_features])
            att, h = self._attention(li, L, h, x_acc=y_acc, o_acc=o_acc, count=ca)
            y_acc = None
            if hand_o:
                # one token: the o product's fp32 sum goes to the FFN kernel, which adds the residual itself, and
                # (acc_ffn) the FFN's product to the next layer's q/k/v kernel
                o = L.o
                hand = self._hand_buf(o.out_features)
                acc = hand[:, :o.out_features]
                if o_acc is None:
                    K.gemv_ex(att, o.wt, o.mean, o.thr, o.bias, o.stripe, acc_out=acc, count=ca)
                nxt = w.layers[li + 1] if li + 1 < len(w.layers) else None
                if self._hand_ffn_to_qkv(L, nxt, h):
                    y_acc = hand[:, o.out_features:]
                h = self._ffn(L.ffn, h, h, norm=(L.ln2, w.eps), x_acc=acc, y_acc=y_acc, count=cf)
                continue
            h = self._lin(L.o, att, residual=h, count=ca)
            if fuse:
                h = self._ffn(L.ffn, h, h, norm=(L.ln2, w.eps), count=cf)
            else:
                h = self._ffn(L.ffn, K.rmsnorm(h, L.ln2, w.eps), h, count=cf)
        if last_only:
            h = h[-1:]
        if fuse:
            return self._lin(w.head, h, norm=(w.norm, w.eps), count=ch)
        return self._lin(w.head, K.rmsnorm(h, w.norm, w.eps), count=ch)

    def _step(self):
        logits = self.forward(self.tok, last_only=True)
        self.logits = logits
        nxt = self.K.argmax(logits)
        self.tokens.index_copy_(0, self.pos + 1, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    # ------------------------------------------------------------------ generation
    @_one_thread
    def capture(self, warmup: int = 2):
        """Compile every kernel and capture one decode step. The warm-up steps run at position 0: the cache row they
        write, the token slots and the read counts are restored afterwards, so a prefill before the first decode()
        stays valid and keeps what it counted."""
        if not self.use_graph or self.graph is not None:
            return
        self._clear_acc()
        saved = (self.pos.clone(), self.tok.clone(), self.reads.clone())
        rows = (self.kc[:, 0].clone(), self.vc[:, 0].clone(), self.tokens[:2].clone())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                self.pos.zero_()
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.pos.zero_()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._step()
        self.graph = g
        self.pos.copy_(saved[0])
        self.tok.copy_(saved[1])
        self.kc[:, 0].copy_(rows[0])
        self.vc[:, 0].copy_(rows[1])
        self.tokens[:2].copy_(rows[2])
        self._clear_acc()
        self.reads.copy_(saved[2])   # the warm-up steps counted: back to what was counted before

    @_one_thread
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (T,), pick the first new token; returns the last position's logits."""
        ids = ids.reshape(-1).to(self.device)
        T = ids.numel()
        if not 0 < T < self.max_len:
            raise ValueError(f"prefill of {T} tokens: the engine takes 1..{self.max_len - 1} (raise max_len)")
        self._clear_acc()
        self.pos.zero_()
        logits = self.forward(ids, last_only=True)
        nxt = logits.argmax(-1)
        self.tokens[:T] = ids
        self.tokens[T:T + 1] = nxt
        self.tok.copy_(nxt)
        self.pos.fill_(T)
        self._pos_host = T
        return logits

    @_one_thread
    @torch.no_grad()
    def feed(self, token: int, pos: int) -> torch.Tensor:
        """One decode step of `token` at position `pos` (the cache row written, attention over positions 0..pos):
        its logits (1, V), a static buffer with a CUDA graph (copy it to keep it). With count_reads, `reads` has grown
        by the weights the step read. The caller owns the positions (e.g. a chat backend truncating after Ctrl-C)."""
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} outside the engine's 0..{self.max_len - 1}"
                             + (" (raise max_len)" if pos >= self.max_len else ""))
        if self.use_graph and self.graph is None:
            self.capture()
        self.tok.fill_(int(token))
        self.pos.fill_(int(pos))
        self._pos_host = int(pos) + 1
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.logits

    @_one_thread
    @torch.no_grad()
    def decode(self, n: int):
        """n more greedy tokens after the current one (no host synchronisation). Refused, before anything runs,
        when they would pass max_len: a step there would write past its layer's cache rows."""
        if self._pos_host + n > self.max_len:
            raise ValueError(f"decode({n}) from position {self._pos_host} would pass the engine's max_len "
                             f"{self.max_len} (raise max_len)")
        self._pos_host += max(int(n), 0)
        if self.use_graph and self.graph is None:
            self.capture()
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    @_one_thread
    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        ids = ids.reshape(-1)
        T = ids.numel()
        if max_new_tokens < 1 or T + max_new_tokens > self.max_len:
            raise ValueError(f"generate({T} prompt tokens + {max_new_tokens} new): the engine takes 1 new token or "
                             f"more and {self.max_len} positions in all (raise max_len)")
        if self.use_graph and self.graph is None:
            self.capture()
        self.prefill(ids)
        self.decode(max_new_tokens - 1)
        return self.tokens[:T + max_new_tokens].clone()


def _ref_gemv_ex(*args, **kw):
    from cwic_kernels.gpu.fallback import gemv_ex_ref
    return gemv_ex_ref(*args, **kw)
