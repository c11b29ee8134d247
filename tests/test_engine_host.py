"""Host-side checks of the decode engine and the GPU kernels' Python (from a mutant audit, run on the CPU): capture's
restore (under a stand-in for torch.cuda whose graph replays the step eagerly), position bounds, per-part read
counts, the prefill GEMM switch, q/k/v fusion, weight bytes, the custom ops' fake kernels, and the argument checks
and config choices of gemv_ex / gemv_compact."""
from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_checks import _inputs  # noqa: F401  (sets DEV; before triton)

import cwic_exp  # noqa: E402
from cwic_kernels import reference as ref  # noqa: E402
from cwic_kernels.gpu import gemv as G  # noqa: E402
from cwic_kernels.gpu import gemv_compact as C  # noqa: E402


def _tiny(cwic: bool, seed=0, stripe=32, **kw):
    from test_triton_kernels import _calibrated_tiny
    if stripe == 32:
        return _calibrated_tiny(cwic, seed=seed, **kw)
    from conftest import tiny_model
    model = tiny_model(hidden_size=64, intermediate_size=128, vocab_size=96, seed=seed, **kw)
    cwic_exp.to_cwic(model, stripe_size=stripe)
    g = torch.Generator().manual_seed(seed)
    with cwic_exp.cwic_context(model, update_stats=True):
        model(torch.randint(0, 96, (1, 40), generator=g))
    with torch.no_grad():
        for m in cwic_exp.iter_cwic_modules(model):
            p = m.theta if hasattr(m, "theta") else m.phi
            p.copy_(torch.rand(p.shape, generator=g) * 1.2)
    return model


# ----------------------------------------------------------------------------- engine: capture on a fake CUDA

class _FakeGraph:
    def __init__(self):
        self.fn = None

    def replay(self):
        self.fn()


@contextlib.contextmanager
def _fake_cuda(monkeypatch, eng):
    """Just enough of torch.cuda for DecodeEngine.capture on the CPU: the captured step replays eagerly."""
    class S:
        def wait_stream(self, other):
            pass
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: S())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: S())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)

    @contextlib.contextmanager
    def graph(g, *a, **k):
        g.fn = eng._step
        yield
    monkeypatch.setattr(torch.cuda, "graph", graph)
    eng.use_graph = True
    yield


def test_capture_after_prefill_restores_cache_tokens_and_reads(monkeypatch):
    """capture() runs warm-up steps at position 0 and restores what they wrote: the cache row, the token slots and the
    read counts. A one-token prompt is counted by design, and the first decode() captures: its counts must survive
    (they were zeroed with the warm-up's). Against an engine without a graph, to the bit."""
    from cwic_exp.engine import DecodeEngine
    model = _tiny(True)
    ids = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(9))
    plain = DecodeEngine(model, max_len=16, triton=False, count_reads=True)
    plain.prefill(ids)
    plain.decode(4)
    eng = DecodeEngine(model, max_len=16, triton=False, count_reads=True)
    with _fake_cuda(monkeypatch, eng):
        eng.prefill(ids)
        eng.decode(4)                      # captures first: warm-up steps at position 0
        assert eng.graph is not None
    assert eng.tokens[:12].tolist() == plain.tokens[:12].tolist()
    torch.testing.assert_close(eng.kc[:, :11], plain.kc[:, :11], rtol=0, atol=0)
    torch.testing.assert_close(eng.vc[:, :11], plain.vc[:, :11], rtol=0, atol=0)
    assert eng.reads.tolist() == plain.reads.tolist()
    plain = DecodeEngine(model, max_len=16, triton=False, count_reads=True)
    eng = DecodeEngine(model, max_len=16, triton=False, count_reads=True)
    for e in (plain, eng):
        with _fake_cuda(monkeypatch, e) if e is eng else contextlib.nullcontext():
            e.prefill(ids[:1])                 # one token: counted
            assert e.reads.sum() > 0
            e.decode(2)
    assert eng.reads.tolist() == plain.reads.tolist()


# ----------------------------------------------------------------------------- engine: bounds and counts

def test_decode_of_a_negative_count_does_not_move_the_host_position():
    """decode(-5) does nothing, and must not let a later decode run past max_len."""
    from cwic_exp.engine import DecodeEngine
    eng = DecodeEngine(_tiny(False), max_len=12, triton=False)
    eng.prefill(torch.arange(8))
    eng.decode(-5)                         # nothing to do
    eng.decode(4)                          # positions 8..11
    with pytest.raises(ValueError, match="max_len"):
        eng.decode(1)


def test_generate_may_fill_every_position():
    """generate(T prompt tokens, max_len - T new) fits exactly, and equals HF's greedy output."""
    from cwic_exp.engine import DecodeEngine
    model = _tiny(False)
    eng = DecodeEngine(model, max_len=10, triton=False)
    ids = torch.arange(1, 7)
    out = eng.generate(ids, 4)
    hf = model.generate(ids[None], max_new_tokens=4, min_new_tokens=4, do_sample=False)[0]
    assert out.tolist() == hf.tolist()


def test_reads_are_counted_by_part():
    """A dense model's step reads q/k/v and o, the FFN and the head, each in its own counter."""
    from cwic_exp.cpu_decode import dense_counts
    from cwic_exp.engine import DecodeEngine
    dense = _tiny(False)
    eng = DecodeEngine(dense, max_len=8, triton=False, count_reads=True)
    eng.feed(3, 0)
    want = dense_counts(dense)
    assert eng.reads.tolist() == [want["attn"], want["ffn"], want["head"]]


def test_gemm_from_is_inclusive(monkeypatch):
    """A prompt of exactly gemm_from tokens runs the per-stripe GEMMs."""
    import cwic_kernels.gpu.prefill as P
    from cwic_exp.engine import DecodeEngine
    eng = DecodeEngine(_tiny(True), max_len=16, triton=False, gemm_from=5)
    calls, fn = [], P.masked_gemm
    monkeypatch.setattr(P, "masked_gemm", lambda *a, **k: (calls.append(1), fn(*a, **k))[1])
    eng.pos.zero_()
    eng.forward(torch.arange(5), last_only=False)
    assert calls


def test_qkv_not_fused_when_widths_are_not_whole_stripes():
    """q (64) and k/v (32) with stripe 24 (partial last stripes) are not fused: the stripes would straddle the
    matrices. The engine still equals the model."""
    from cwic_exp.engine import DecodeEngine
    model = _tiny(True, stripe=24)
    eng = DecodeEngine(model, max_len=16, triton=False)
    assert len(eng.w.layers[0].qkv) == 3
    ids = torch.randint(0, 96, (6,), generator=torch.Generator().manual_seed(3))
    eng.pos.zero_()
    got = eng.forward(ids, last_only=False).float()
    with torch.no_grad():
        want = model(ids[None]).logits[0].float()
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_weight_bytes_is_the_dense_step():
    """A CWIC model's matrices weigh what the dense model's do (fp32: 4 bytes a weight), part by part."""
    from cwic_exp.cpu_decode import dense_counts
    from cwic_exp.engine import prepare_decode, weight_bytes
    model = _tiny(True)
    n = weight_bytes(prepare_decode(model))
    want = dense_counts(model)
    assert {k: v // 4 for k, v in n.items()} == want     # fp32: 4 bytes a weight


# ----------------------------------------------------------------------------- custom ops: fake kernels

def test_fake_kernels_give_the_real_shapes_and_refuse_bad_inputs():
    """The custom ops' fake kernels (torch.compile's shapes) give (B, m), and the ops refuse 3-D inputs and an FFN
    input of the wrong width by name, under FakeTensorMode too. The one dispatch test used a square matrix."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from cwic_kernels import ops  # noqa: F401  registers torch.ops.cwic
    x, wt, mean, thr, bias = _inputs(2, 48, 80, 16, torch.float32, seed=1)
    assert torch.ops.cwic.gemv(x, wt, mean, thr, bias, 16).shape == (2, 80)
    with pytest.raises(ValueError, match="flatten"):
        torch.ops.cwic.gemv(x[None], wt, mean, thr, bias, 16)
    F_ = 32
    up, down, uthr = torch.randn(F_, 48), torch.randn(F_, 48), torch.rand(F_)
    gthr, gmean, gbias = torch.rand(2, 48), torch.zeros(48), torch.zeros(F_)
    gwt = torch.randn(48, F_)
    with FakeTensorMode() as mode:
        fx, fwt = mode.from_tensor(x), mode.from_tensor(wt)
        y = torch.ops.cwic.gemv(fx, fwt, mode.from_tensor(mean), mode.from_tensor(thr), mode.from_tensor(bias), 16)
        assert tuple(y.shape) == (2, 80)
        args = [mode.from_tensor(t) for t in (gwt, gmean, gthr, gbias)]
        rest = [mode.from_tensor(t) for t in (up, down, uthr)]
        with pytest.raises(ValueError, match="flatten"):
            torch.ops.cwic.ffn(fx[None], *args, 16, *rest, "silu")
        with pytest.raises(ValueError, match="flatten"):
            torch.ops.cwic.ffn(mode.from_tensor(torch.randn(2, 40)), *args, 16, *rest, "silu")


# ----------------------------------------------------------------------------- gemv host functions

def test_supports_stripe_needs_multiples_of_16():
    """The kernels tile outputs in 16s: a stripe must be a multiple of 16, or the whole width."""
    assert not G.supports_stripe(24, 64) and G.supports_stripe(32, 64) and G.supports_stripe(24, 24)


def test_a_strided_or_long_bias_is_refused():
    """The bias must be contiguous and m long."""
    x, wt, mean, thr, bias = _inputs(1, 64, 32, 16, torch.float32, seed=2)
    with pytest.raises(AssertionError, match="bias"):
        G.gemv_ex(x, wt, mean, thr, torch.zeros(64)[::2], 16)
    with pytest.raises(AssertionError, match="bias"):
        G.gemv_ex(x, wt, mean, thr, torch.zeros(40), 16)


def test_count_with_a_batch_tile_is_refused():
    """count= is for one token: a config with a batch tile (BLOCK_B 16) is refused."""
    x, wt, mean, thr, bias = _inputs(1, 64, 32, 16, torch.float32, seed=3)
    cfg = G.gemv_config(16, 64, 32, 16, x.device)
    with pytest.raises(ValueError, match="BLOCK_B"):
        G.gemv_ex(x, wt, mean, thr, bias, 16, config=cfg, count=torch.zeros(1, dtype=torch.int64, device=x.device))


def test_x_out_sharing_x_is_refused():
    """x_out must not share memory with x: programs still reading x would see it overwritten."""
    x, wt, mean, thr, bias = _inputs(1, 64, 32, 16, torch.float32, seed=4)
    buf = torch.zeros(1, 64)
    acc = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="share memory"):
        G.gemv_ex(buf, wt, mean, thr, bias, 16, acc_out=acc, x_acc=torch.zeros(1, 64), x_out=buf)


def test_compact_pdl_never_with_fused(monkeypatch):
    """The fused compact kernel has no select kernel to overlap: PDL stays off whatever is asked (on, it would launch
    early without waiting before reading x)."""
    monkeypatch.setattr(C, "INTERPRET", False)
    monkeypatch.setattr(C, "gdc_wait", object())
    assert C.compact_config(256, 128, 64, torch.device("cpu"), fused=True, pdl=True)["pdl"] is False
    assert C.compact_config(256, 128, 64, torch.device("cpu"), fused=False, pdl=True)["pdl"] is True


def test_compact_fused_after_unfused_same_shape():
    """The workspace is keyed by `fused` too: an unfused call (k·split regions) then a fused one (grid_m·split
    regions) of the same shape each get their own (a shared one was written out of bounds)."""
    n, m, stripe = 128, 128, 64
    x, wt, mean, thr, bias = _inputs(1, n, m, stripe, torch.float32, seed=5, density=0.9)
    want = ref.gemv_reference(x, wt, mean, thr, bias, stripe)
    C._WORKSPACES.clear()
    for fused in (False, True):
        cfg = C.compact_config(n, m, stripe, x.device, block_m=16, chunk=64, block_n=16, fused=fused)
        y = C.gemv_compact(x, wt, mean, thr, bias, stripe, config=cfg)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    keys = [k for k in C._WORKSPACES if k[2:5] == (n, m, 2)]
    assert len(keys) == 2


def test_compact_overrides_replace_the_tuned_tiles(monkeypatch):
    """Given overrides, TUNED_COMPACT[(n, m)] is not merged in (as gemv_config does with TUNED)."""
    dev = torch.device("cpu")
    got = C.compact_config(2048, 8192, 512, dev, block_m=64)
    monkeypatch.setattr(C, "TUNED_COMPACT", {})
    assert got == C.compact_config(2048, 8192, 512, dev, block_m=64)


@pytest.mark.parametrize("B", [1, 3])
def test_one_stripe_of_a_width_that_is_not_a_power_of_two(B):
    """A single stripe of 48 outputs (stripe >= m) gets a power-of-two output block, and the right product."""
    x, wt, mean, thr, bias = _inputs(B, 40, 48, 48, torch.float32, seed=6)
    assert G._block_m(48, 48, 64) == 64
    y = G.gemv_ex(x, wt, mean, thr, bias, 48, compact=False)
    torch.testing.assert_close(y, ref.gemv_reference(x, wt, mean, thr, bias, 48), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key", sorted(G.TUNED), ids=str)
def test_every_tuned_tile_entry_gives_a_valid_config_for_its_shape(key, monkeypatch):
    """Each `gemv.TUNED[(n, m, BLOCK_B)]` entry names only known tiles and, for its shape at stripe 512 and a batch
    that picks that BLOCK_B, gives output blocks inside a stripe, split-K chunks that cover every input exactly, and
    a grid within the arrival counters; the batch entries (16-token blocks' union reads: below `DENSE_W_FROM` tokens,
    where no small block applies, e.g. with CWIC_GEMV_SMALL_B=0) run pipelined unless they say otherwise, and from
    DENSE_W_FROM tokens on the dense reads' own tiles apply."""
    n, m, bb = key
    monkeypatch.setattr(G, "DENSE_W_FROM", 4)
    monkeypatch.setattr(G, "SMALL_B", False)
    assert set(G.TUNED[key]) <= {"block_m", "block_n", "waves", "max_split", "num_warps", "num_stages", "pipe"}
    if bb != 1:
        dense = G.gemv_config(16, n, m, 512, torch.device("cpu"))
        assert dense["dense_w"] and (dense["BLOCK_N"], dense["num_stages"], dense["pipe"]) == (64, 3, False)
    for B in ((1,) if bb == 1 else (2, 3)):
        cfg = G.gemv_config(B, n, m, 512, torch.device("cpu"))
        assert cfg["BLOCK_B"] == bb and 512 % cfg["BLOCK_M"] == 0
        assert cfg["CHUNK_N"] % cfg["BLOCK_N"] == 0
        assert (cfg["SPLIT"] - 1) * cfg["CHUNK_N"] < n <= cfg["SPLIT"] * cfg["CHUNK_N"]
        assert cfg["grid"] == (-(-m // cfg["BLOCK_M"]), cfg["SPLIT"], 1) and cfg["grid"][0] <= G.COUNTER_SLOTS
        if "block_n" in G.TUNED[key]:
            assert cfg["BLOCK_N"] == G.TUNED[key]["block_n"]
        assert cfg["pipe"] == G.TUNED[key].get("pipe", bb != 1)
