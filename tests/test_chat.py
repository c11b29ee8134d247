"""The chat: per-token figures come from the cached generation and equal a fresh recount.

A tiny random CWIC Llama with a byte-level tokenizer (so "é" and "你" are several tokens each), built
in code: no downloads, a few seconds.
"""
from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser

import pytest
import torch

from conftest import byte_tokenizer, tiny_cwic_checkpoint, tiny_model

PROMPT = "héllo wörld, 你好!"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny CWIC checkpoint whose thresholds make the per-token counts vary."""
    return tiny_cwic_checkpoint(tmp_path_factory.mktemp("cwic_chat") / "ckpt")


def run_chat(args):
    from cwic_exp.chat import main
    out, err = io.StringIO(), io.StringIO()
    assert main(args, stdout=out, stderr=err) == 0
    return out.getvalue(), err.getvalue()


def recount(path, ids):
    from transformers import AutoModelForCausalLM
    import cwic_exp
    model = AutoModelForCausalLM.from_pretrained(path)
    x = torch.tensor([ids])
    return cwic_exp.active_parameters(model, x, per_token=True)["per_token"][0].tolist()


def test_incremental_decoder_keeps_characters_whole():
    from cwic_exp.chat import IncrementalDecoder
    tok = byte_tokenizer()
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == PROMPT
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(PROMPT) and pieces.count("") == len(ids) - len(PROMPT)


def test_one_turn_figures_equal_recount(ckpt, tmp_path):
    from cwic_exp.chat import fmt_params
    n = 24
    out, err = run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--no-color", "--max-new-tokens", str(n),
                         "--ignore-eos", "--json", str(tmp_path / "t.json"), "--html", str(tmp_path / "t.html")])
    assert "\x1b" not in out and "\x1b" not in err
    tr = json.loads((tmp_path / "t.json").read_text())
    (turn,) = tr["turns"]
    reply, prompt = turn["reply"], turn["prompt"]
    assert len(reply) == n and turn["summary"]["tokens"] == n
    # stdout: the reply, every token followed by its own figure, nothing else
    assert out == "".join(t["text"] + f"[{fmt_params(t['ap'])}]" for t in reply) + "\n"
    assert len(re.findall(r"\[\d+(?:\.\d+)?[kMB]?\]", out)) >= n
    # the figures from the cached generation equal a fresh count over the same tokens
    ids = [t["id"] for t in prompt + reply]
    assert [t["ap"] for t in prompt + reply] == recount(ckpt, ids)
    assert len(set(t["ap"] for t in prompt + reply)) > 3        # the thresholds do bite
    dense = tr["dense"]
    assert turn["summary"]["apr"] == pytest.approx(dense * n / sum(t["ap"] for t in reply))


class _Checker(HTMLParser):
    VOID = {"meta", "br", "img", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.ids, self.text, self.in_span = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        self.stack.append(tag)
        a = dict(attrs)
        if tag == "span" and "data-ids" in a:
            self.ids += [int(i) for i in a["data-ids"].split(",")]
            assert len(a["data-ap"].split(",")) == len(a["data-ids"].split(","))
            self.in_span += 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> in {self.stack[-3:]}"
        self.stack.pop()
        if tag == "span" and self.in_span:
            self.in_span -= 1

    def handle_data(self, data):
        if self.in_span:
            self.text.append(data)


def test_html_export_is_valid_and_holds_every_token(ckpt, tmp_path):
    run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--prompt", "and again <b>&</b>", "--no-color",
              "--max-new-tokens", "12", "--ignore-eos", "--json", str(tmp_path / "t.json"),
              "--html", str(tmp_path / "t.html")])
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<b>&</b>" not in page
    p = _Checker()
    p.feed(page)
    p.close()
    assert p.stack == []
    tr = json.loads((tmp_path / "t.json").read_text())
    toks = [t for turn in tr["turns"] for key in ("prompt", "reply") for t in turn[key]]
    assert p.ids == [t["id"] for t in toks]
    assert "".join(p.text) == "".join(t["text"] for t in toks)
    assert "and again <b>&</b>" in "".join(p.text)


def test_second_turn_reuses_cache_and_figures_still_match(ckpt, tmp_path):
    run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--prompt", "tell me more", "--no-color",
              "--max-new-tokens", "10", "--ignore-eos", "--json", str(tmp_path / "t.json")])
    t1, t2 = json.loads((tmp_path / "t.json").read_text())["turns"]
    cached = t2["summary"]["prompt_cached"]
    assert cached > len(t1["prompt"])            # turn 1's prompt (at least) came from the cache
    prefix = [t["id"] for t in t1["prompt"] + t1["reply"]][:cached]
    ids = prefix + [t["id"] for t in t2["prompt"] + t2["reply"]]
    full = recount(ckpt, ids)
    assert full[cached:] == [t["ap"] for t in t2["prompt"] + t2["reply"]]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_stop_the_reply_by_name(ckpt, temperature):
    """A model whose logits turn NaN (an overflow) decoded on: greedy took argmax's NaN index (a token unrelated
    to anything), sampling failed inside torch.multinomial. The reply stops there with its own stop reason and a
    notice, keeping what came before, and the next turn runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import cwic_exp  # noqa: F401
    from cwic_exp.chat import ChatSession, HFBackend
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)

    class Overflows(HFBackend):
        calls, nan_at = 0, None

        def forward(self, ids):
            Overflows.calls += 1
            logits, aps = super().forward(ids)
            if Overflows.calls == Overflows.nan_at:
                logits = logits.clone()
                logits.reshape(-1)[7] = float("nan")
            return logits, aps

    notes = []
    chat = ChatSession(Overflows(model), tok, max_new_tokens=8, ignore_eos=True, temperature=temperature,
                       notice=notes.append)
    chat.calibrate()
    Overflows.calls, Overflows.nan_at = 0, 4       # prefill, then 3 tokens: the fourth step's logits are NaN
    t1 = chat.turn(PROMPT)
    assert t1.stop == "nan" and len(t1.reply) == 3 and t1.summary["stop"] == "nan"
    assert any("logits are not finite (NaN) after 3 token(s)" in n for n in notes), notes
    assert chat.backend.cached() == len(chat.cached_ids)
    t2 = chat.turn("go on")
    assert t2.stop == "max_new_tokens" and len(t2.reply) == 8


def test_ctrl_c_keeps_partial_reply_and_chat_goes_on(ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import cwic_exp  # noqa: F401
    from cwic_exp.chat import ChatSession, HFBackend
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)

    class Flaky(HFBackend):
        calls, fail_at = 0, None

        def forward(self, ids):
            Flaky.calls += 1
            if Flaky.calls == Flaky.fail_at:
                super().forward(ids)              # the step runs, then the user presses Ctrl-C
                raise KeyboardInterrupt
            return super().forward(ids)

    chat = ChatSession(Flaky(model), tok, max_new_tokens=12, ignore_eos=True, notice=lambda m: None)
    chat.calibrate()
    Flaky.calls, Flaky.fail_at = 0, 5             # prefill, then 3 tokens, then interrupted
    t1 = chat.turn(PROMPT)
    assert t1.stop == "interrupted" and len(t1.reply) == 3
    assert chat.backend.cached() == len(chat.cached_ids)
    t2 = chat.turn("go on")
    assert t2.stop == "max_new_tokens" and len(t2.reply) == 12
    ids = chat.cached_ids
    full = recount(ckpt, ids)
    assert full[-len(t2.reply):] == [t.ap for t in t2.reply]


def test_long_conversation_is_trimmed_with_notice(ckpt, tmp_path):
    out, err = run_chat(["--model", str(ckpt), "--no-color", "--max-new-tokens", "16", "--ignore-eos",
                         "--max-context", "90", "--json", str(tmp_path / "t.json"),
                         "--prompt", "first question here", "--prompt", "second question", "--prompt", "third"])
    assert "dropped the" in err
    assert len(json.loads((tmp_path / "t.json").read_text())["turns"]) == 3


def test_a_busy_machine_is_named_when_decoding_would_share_its_cores(ckpt, monkeypatch):
    """With more threads than free cores, a thread set aside for another process holds up every parallel step (in
    one measurement on a 2-core host at a 1-minute load of 4.5 from other processes, 2 threads decoded at 7.3 tok/s
    and 1 thread at 41.7): chat says so, with a thread count that would not share."""
    from cwic_exp import chat
    assert chat.busy_cpu_notice(threads=2, cores=2, others=0.3) is None          # quiet
    assert chat.busy_cpu_notice(threads=1, cores=2, others=3.0) is None          # one thread: nothing waits for it
    assert chat.busy_cpu_notice(threads=4, cores=8, others=2.0) is None          # enough free cores
    assert chat.busy_cpu_notice(threads=4, cores=2, others=0.1) is None          # too many threads, but not busy
    assert "--threads 1 " in chat.busy_cpu_notice(threads=2, cores=2, others=1.0)
    note = chat.busy_cpu_notice(threads=8, cores=8, others=2.2)
    assert "2.2 other tasks running on 8 cores" in note and "--threads 5 " in note
    assert "--threads 1 " in chat.busy_cpu_notice(threads=8, cores=4, others=3.0)
    others = chat.others_running(samples=3, interval=0.0)
    assert others is None or others >= 0
    monkeypatch.setattr(chat, "others_running", lambda: 5.0)
    monkeypatch.setattr(chat, "cpu_quota", lambda: None)                 # (the test machine may have one)
    monkeypatch.setattr(chat.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(chat.os, "cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    try:
        _, err = run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--no-color", "--max-new-tokens", "2",
                           "--threads", "2"])
        assert "[notice] this machine is busy (5.0 other tasks running on 2 cores)" in err
        _, err = run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--no-color", "--max-new-tokens", "2",
                           "--threads", "1"])
        assert "busy" not in err
        monkeypatch.setattr(chat.os, "cpu_count", lambda: 64)           # a container's share of a bigger machine
        _, err = run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--no-color", "--max-new-tokens", "2",
                           "--threads", "2"])
        assert "busy" not in err
    finally:
        torch.set_num_threads(threads)


def test_a_cgroup_cpu_quota_is_read_and_caps_the_default_threads(ckpt, tmp_path, monkeypatch):
    """torch and OpenMP size their thread pools from the CPUs they see, not a container's CPU quota: 64 threads
    under a 2-core quota are throttled in turn, and every parallel step waits for the slowest. Chat reads the
    tightest quota along its cgroup's path (v2 cpu.max, v1 cfs quota/period) and, without --threads, decodes with
    that many whole cores, saying so; the busy notice stays silent there (the running count is the host's)."""
    from cwic_exp import chat

    def tree(files: dict, proc: str):
        root = tmp_path / f"cg{len(list(tmp_path.iterdir()))}"
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / "proc").write_text(proc)
        return dict(root=str(root), proc=str(root / "proc"))
    v2 = tree({"cpu.max": "max 100000\n", "a/cpu.max": "150000 100000\n", "a/b/cpu.max": "max 100000\n",
               "a/b/c/cpu.max": "50000 100000\n"}, "0::/a/b\n")
    assert chat.cpu_quota(**v2) == 1.5                                  # the parent's limit; c is not ours
    v1 = tree({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
               "cpu,cpuacct/x/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n"},
              "5:memory:/y\n4:cpu,cpuacct:/x\n")
    assert chat.cpu_quota(**v1) == 2.0
    assert chat.cpu_quota(**tree({"cpu.max": "max 100000\n"}, "0::/\n")) is None        # no limit
    assert chat.cpu_quota(**tree({"cpu.max": "garbage\n"}, "0::/\n")) is None
    assert chat.cpu_quota(root=str(tmp_path), proc=str(tmp_path / "missing")) is None
    assert [chat.quota_threads(q, 8) for q in (None, 0.5, 1.5, 2.0, 16.0)] == [8, 1, 1, 2, 8]
    monkeypatch.setattr(chat, "cpu_quota", lambda: 1.0)
    monkeypatch.setattr(chat, "others_running", lambda: 5.0)
    monkeypatch.setattr(chat.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(chat.os, "cpu_count", lambda: 2)
    assert chat.busy_cpu_notice(threads=2) is None
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _, err = run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--no-color", "--max-new-tokens", "2"])
        assert "CPU quota is 1 cores (cgroup) and torch would use 2 threads: decoding with 1" in err
        assert torch.get_num_threads() == 1 and "busy" not in err
        torch.set_num_threads(2)
        _, err = run_chat(["--model", str(ckpt), "--prompt", PROMPT, "--no-color", "--max-new-tokens", "2",
                           "--threads", "2"])                           # the user's choice stands
        assert "quota" not in err and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_default_model_message(tmp_path, monkeypatch):
    from cwic_exp.chat import default_model
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="make train"):
        default_model(search=[tmp_path])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "LATEST").write_text(str(tmp_path))
    assert default_model(search=[tmp_path]) == str(tmp_path)


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/no/such/run/hf/final"], "--model /no/such/run/hf/final: no such folder"),
    (["--model", "x", "--temperature", "1", "--top-p", "0"], "--top-p"),
    (["--model", "x", "--temperature", "-1"], "--temperature"),
    (["--model", "x", "--threads", "-1"], "--threads"),
    (["--model", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be ≥ 0 and --max-context ≥ 1, got -1 and"),
    (["--model", "x", "--json", "/no/such/dir/t.json"], "--json /no/such/dir/t.json: its folder"),
])
def test_chat_names_bad_arguments_before_loading(argv, needle):
    """A missing folder read as a hub repo id error; top-p 0 failed mid-sampling; a --json in a missing folder
    crashed after the reply, ending the session."""
    from cwic_exp.chat import main
    with pytest.raises(SystemExit, match=re.escape(needle)):
        main(argv, stdout=io.StringIO(), stderr=io.StringIO())


def test_analyses_and_eval_name_a_missing_checkpoint(tmp_path, monkeypatch):
    import sys
    from cwic_exp.eval.run import build_model
    from cwic_exp.teacher import check_checkpoint
    with pytest.raises(FileNotFoundError, match="checkpoint= /nope: no such folder"):
        build_model(method="cwic", checkpoint="/nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_checkpoint(str(tmp_path / "empty"))
    import cwic_exp.teacher as T
    monkeypatch.setattr(T, "hub_unreachable_reason", lambda repo: None)
    check_checkpoint("org/some-model")                  # a hub id passes where the hub answers for it
    monkeypatch.setattr(T, "hub_unreachable_reason", lambda repo: "x.org cannot be reached")
    with pytest.raises(FileNotFoundError, match="org/some-model: a hub id, but x.org cannot be reached"):
        check_checkpoint("org/some-model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_checkpoint("runs/x")                      # org/name shaped, but `runs` is a local folder
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "analyses"))
    import run_all
    with pytest.raises(SystemExit, match="--checkpoint /nope: no such folder"):
        run_all.main(["--checkpoint", "/nope", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    import argparse
    from common import setup                            # token_compute --transcript renders without a checkpoint
    setup(argparse.Namespace(threads=None, checkpoint="(transcript)", transcript="t.json", out=str(tmp_path / "o")))


def test_analyses_read_a_run_config_with_hydra_interpolations(tmp_path):
    """Runs saved before configs were resolved keep `${hydra:...}`; the analyses must still read them."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "analyses"))
    from common import run_config
    run = tmp_path / "r"
    (run / "hf" / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: ${hydra:runtime.choices.model}_x\ndata:\n  seq_len: 256\n")
    cfg = run_config(run / "hf" / "final")
    assert cfg["data"]["seq_len"] == 256 and "hydra" in cfg["run_name"]


def _two_turn_figures(backend: str, ckpt, tmp_path):
    """Two chat turns with `backend` (the second reusing the cache): (every fed token's figure, the Hugging Face
    recount of the same tokens, the transcript)."""
    run_chat(["--model", str(ckpt), "--backend", backend, "--prompt", PROMPT, "--prompt", "tell me more",
              "--no-color", "--max-new-tokens", "12", "--ignore-eos", "--json", str(tmp_path / f"{backend}.json")])
    tr = json.loads((tmp_path / f"{backend}.json").read_text())
    t1, t2 = tr["turns"]
    assert len(t1["reply"]) == len(t2["reply"]) == 12
    cached = t2["summary"]["prompt_cached"]
    assert cached > len(t1["prompt"])
    ids1 = [t["id"] for t in t1["prompt"] + t1["reply"]]
    ids = ids1[:cached] + [t["id"] for t in t2["prompt"] + t2["reply"]]
    got = [t["ap"] for t in t1["prompt"] + t1["reply"]] + [t["ap"] for t in t2["prompt"] + t2["reply"]]
    full = recount(ckpt, ids)
    return got, full[:len(ids1)] + full[cached:], tr


def _cpu_kernels_or_skip():
    from conftest import cpu_kernels_or_skip
    cpu_kernels_or_skip()


def test_cpu_backend_figures_are_the_kernels_reads_and_equal_recount(ckpt, tmp_path):
    """--backend cpu: the C++ sparse decoder generates the reply; every token's figure is what its kernels read,
    which equals the Hugging Face recount of the same tokens (fp32 weights), over two turns with the cache."""
    _cpu_kernels_or_skip()
    got, want, tr = _two_turn_figures("cpu", ckpt, tmp_path)
    # a threshold comparison may flip where the two fp32 sums differ in the last bit: allow one token in 50
    same = sum(g == w for g, w in zip(got, want))
    assert len(got) == len(want) and same >= len(got) * 0.98, (same, len(got))
    assert sum(got) == pytest.approx(sum(want), rel=2e-3)
    assert len(set(got)) > 3 and tr["dense"] == pytest.approx(recount_dense(ckpt))


def recount_dense(path):
    from transformers import AutoModelForCausalLM
    import cwic_exp
    model = AutoModelForCausalLM.from_pretrained(path)
    return cwic_exp.active_parameters(model, torch.tensor([[1, 2, 3]]), per_token=True)["dense"]


def test_cpu_backend_generates_what_the_hf_backend_does(ckpt):
    """Greedy replies of the two backends agree (fp32 weights): the C++ step is the same model."""
    _cpu_kernels_or_skip()
    from cwic_exp.chat import CpuBackend
    _same_greedy_reply_as_hf(CpuBackend, ckpt)


def _same_greedy_reply_as_hf(backend_cls, ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import cwic_exp  # noqa: F401
    from cwic_exp.chat import ChatSession, HFBackend
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    replies = []
    for backend in (HFBackend(model), backend_cls(model)):
        chat = ChatSession(backend, tok, max_new_tokens=16, ignore_eos=True, notice=lambda m: None)
        replies.append([t.id for t in chat.turn(PROMPT).reply])
    assert replies[0] == replies[1]


def test_cpu_backend_refuses_what_it_cannot_run(ckpt):
    _cpu_kernels_or_skip()
    with pytest.raises(SystemExit, match="--backend cpu: .*not 'cuda'"):
        run_chat(["--model", str(ckpt), "--backend", "cpu", "--device", "cuda", "--prompt", "x"])
    with pytest.raises(SystemExit, match="float32 or bfloat16"):
        run_chat(["--model", str(ckpt), "--backend", "cpu", "--dtype", "float16", "--prompt", "x"])


def test_engine_backend_figures_are_the_kernels_reads_and_equal_recount(ckpt, tmp_path):
    """--backend engine: the decode engine (here its PyTorch twins on the CPU; Triton kernels and a CUDA graph on a
    GPU) generates the reply; every token's figure is what its products counted for it, which equals the Hugging Face
    recount of the same tokens, over two turns with the cache; greedy replies equal the HF backend's."""
    got, want, tr = _two_turn_figures("engine", ckpt, tmp_path)
    assert got == want
    assert len(set(got)) > 3 and tr["dense"] == pytest.approx(recount_dense(ckpt))
    from cwic_exp.chat import EngineBackend
    _same_greedy_reply_as_hf(EngineBackend, ckpt)


def test_engine_backend_after_an_interrupted_step():
    """A step that ran (and counted) but whose figure was never taken (Ctrl-C while the host waits for it), then the
    chat's truncate: the figures and logits that follow are those of a clean run (the counter is re-read, and the
    hand-off buffers a half-done eager step may leave are cleared). Stripe 8 makes q/k/v one matrix whose sum goes
    through a hand-off buffer on the CPU too (the test used to fill a buffer no step reads: with stripe 16 there is
    none, and a no-op clear passed)."""
    import cwic_exp
    from cwic_exp.chat import EngineBackend
    tok = byte_tokenizer()
    model = tiny_model(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cwic_exp.to_cwic(model, stripe_size=8, head_stripe_size=64)
    be = EngineBackend(model)
    ids = [5, 17, 42, 9, 77, 3]
    clean_logits, clean = be.forward(ids)
    be.reset()
    be.forward(ids[:3])
    be.engine.feed(ids[3], 3)                      # ran and counted, never reported
    assert ("qkv", 96) in be.engine._acc
    for buf in be.engine._acc.values():            # as a half-done eager step may leave its sums
        buf.fill_(1.0)
    be.truncate(3)
    logits, again = be.forward(ids[3:])
    assert again == clean[3:] and torch.equal(logits, clean_logits)


def test_cpu_backend_truncate_then_forward_equals_a_clean_run(ckpt):
    """--backend cpu: truncate below the cached length (a re-rendered prompt that differs, Ctrl-C) keeps exactly the
    common prefix; what follows equals a clean run (a cut one position short passed: truncate was only ever called
    at the cached length)."""
    _cpu_kernels_or_skip()
    from transformers import AutoModelForCausalLM
    import cwic_exp  # noqa: F401
    from cwic_exp.chat import CpuBackend
    be = CpuBackend(AutoModelForCausalLM.from_pretrained(ckpt), max_len=32)
    ids = [5, 17, 42, 9, 77, 3]
    clean_logits, clean = be.forward(ids)
    be.reset()
    be.forward(ids[:3] + [60, 61])        # a different continuation, cached, then cut back to the common prefix
    be.truncate(3)
    assert be.cached() == 3
    logits, again = be.forward(ids[3:])
    assert again == clean[3:]
    torch.testing.assert_close(logits, clean_logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- a scripted backend
# Tests from a mutant audit of chat.py (helper): every test above ran greedy, with --ignore-eos and no colour, so
# EOS, sampling, the colour scale, --system and a full context went untested.

class Scripted:
    """A backend whose k-th forward picks script[k] (the last one after that); a fed token's figure is 1000 + id."""

    def __init__(self, script, max_context=64, vocab=300, model=None):
        self.script, self.max_context, self.vocab, self.model = list(script), max_context, vocab, model
        self.dense, self.pos, self.k = 5000.0, 0, 0

    def reset(self):
        self.pos = 0

    def cached(self):
        return self.pos

    def truncate(self, n):
        self.pos = max(0, min(n, self.pos))

    def forward(self, ids):
        if self.pos + len(ids) > self.max_context:
            raise RuntimeError("KV cache full")
        self.pos += len(ids)
        logits = torch.zeros(self.vocab)
        logits[self.script[min(self.k, len(self.script) - 1)]] = 10.0
        self.k += 1
        return logits, [1000.0 + i for i in ids]


def scripted_session(script, **kw):
    from cwic_exp.chat import ChatSession
    tok = byte_tokenizer()
    backend = Scripted(script, **{k: kw.pop(k) for k in ("max_context", "model") if k in kw})
    chat = ChatSession(backend, tok, notice=lambda m: None, **kw)
    chat.calibrate()
    backend.k = 0
    return chat, tok


def test_eos_stops_the_reply_unfed_and_the_mean_is_over_the_reply():
    tok = byte_tokenizer()
    a, b, c = tok("abc", add_special_tokens=False)["input_ids"]
    chat, tok = scripted_session([a, b, c, tok.eos_token_id], max_new_tokens=10)
    t = chat.turn("hi")
    assert t.stop == "eos" and [x.id for x in t.reply] == [a, b, c]
    assert chat.cached_ids[-1] == c and chat.backend.cached() == len(chat.cached_ids)
    assert t.summary["mean_active"] == pytest.approx(1000 + (a + b + c) / 3)


def test_the_generation_configs_eos_ids_stop_too():
    import types
    tok = byte_tokenizer()
    a, x = tok("a!", add_special_tokens=False)["input_ids"]
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=[tok.eos_token_id, x]))
    chat, _ = scripted_session([a, x, a], max_new_tokens=10, model=model)
    t = chat.turn("hi")
    assert t.stop == "eos" and [y.id for y in t.reply] == [a]


def test_sampling_follows_temperature_top_p_and_seed():
    """p = (0.6, 0.3, 0.1): top-p 0.5 keeps the first token alone; T = 0.5 squares and renormalises
    (0.36 / 0.46 = 0.783); one seed repeats its draws, another does not."""
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))

    def draws(n=4000, **kw):
        chat = scripted_session([0], **kw)[0]
        return [chat._sample(logits) for _ in range(n)]
    assert set(draws(temperature=1.0, top_p=0.5)) == {0}
    assert abs(draws(temperature=0.5, top_p=1.0).count(0) / 4000 - 0.783) < 0.03
    s0, s0b, s1 = (draws(50, temperature=1.0, top_p=1.0, seed=s) for s in (0, 0, 1))
    assert s0 == s0b and s0 != s1


def test_the_colour_scale_runs_light_to_dark_over_the_calibrated_percentiles():
    from cwic_exp.chat import CALIBRATION, ComputeScale
    s = ComputeScale(0.0, 100.0, 1.0)
    assert s.colours(0) == ("#ffffd9", "#000000") and s.colours(100) == ("#081d58", "#ffffff")
    chat, _ = scripted_session([0])
    figures = torch.tensor([1000.0 + i for i in chat._render(CALIBRATION, False)[:64]])
    assert chat.scale.lo == pytest.approx(float(figures.quantile(0.02)))
    assert chat.scale.hi == pytest.approx(float(figures.quantile(0.98)))


@pytest.mark.parametrize("argv,needle", [(["--max-new-tokens", "-1"], "--max-new-tokens"),
                                         (["--max-context", "0"], "--max-context"),
                                         (["--temperature", "nan"], "--temperature")])
def test_more_bad_arguments_are_named(argv, needle):
    from cwic_exp.chat import main
    with pytest.raises(SystemExit, match=re.escape(needle)):
        main(["--model", "x", *argv], stdout=io.StringIO(), stderr=io.StringIO())


def test_threads_flag_sets_torchs_threads(ckpt):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_chat(["--model", str(ckpt), "--prompt", "x", "--no-color", "--max-new-tokens", "1", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_cache_and_ids_agree_when_a_reply_renders_to_other_tokens():
    chat, _ = scripted_session([70, 71, 72, 73], max_new_tokens=4, ignore_eos=True)
    chat.turn("hi")
    chat.messages[-1]["content"] = "zz"          # as a re-tokenised reply may differ from the generated ids
    chat.turn("more")
    assert chat.backend.cached() == len(chat.cached_ids)


def test_trimming_drops_whole_turns_and_a_reply_fills_the_context_exactly():
    chat, _ = scripted_session([70], max_new_tokens=16, ignore_eos=True, max_context=90)
    for q in ("first question here", "second question", "third"):
        chat.turn(q)
    assert chat.messages[0]["role"] == "user" and len(chat.messages) % 2 == 0
    chat, _ = scripted_session([70], max_new_tokens=64, ignore_eos=True, max_context=40)
    t = chat.turn("hi")
    assert t.stop == "context" and chat.backend.cached() == len(chat.cached_ids) == 40


def test_the_system_prompt_is_rendered_and_html_keeps_a_trailing_empty_token():
    from cwic_exp.chat import ComputeScale, Tok, _spans
    chat, _ = scripted_session([70], max_new_tokens=1, ignore_eos=True, system="SYSTEM-X")
    assert "SYSTEM-X" in "".join(t.text for t in chat.turn("hi").prompt)
    assert 'data-ids="2"' in _spans([Tok(1, "a", 1.0), Tok(2, "", 2.0)], ComputeScale(0, 2, 2))


def test_a_reply_without_tokens_writes_valid_json(ckpt, tmp_path):
    """--max-new-tokens 0 (or an immediate EOS, or NaN logits): the turn's mean, APR and tokens/s have no value.
    They were written as NaN, which is not JSON (JSON.parse refuses it); now null."""
    path = tmp_path / "t.json"
    run_chat(["--model", str(ckpt), "--prompt", "hi", "--no-color", "--max-new-tokens", "0", "--json", str(path)])
    text = path.read_text()
    assert "NaN" not in text
    s = json.loads(text)["turns"][0]["summary"]
    assert s["tokens"] == 0 and s["apr"] is None and s["mean_active"] is None
