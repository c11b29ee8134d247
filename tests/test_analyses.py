"""The compute-allocation analyses (experiments/analyses/) against direct computations on a tiny random CWIC model.

A tiny CWIC Llama with random thresholds and a byte-level ChatML tokenizer, saved as a Hugging Face folder; the
held-out ShareGPT tail, ARC, the teacher and the training rows are replaced by small in-code stand-ins, so nothing
is downloaded and each test takes a few seconds. Every figure the scripts report (mask frequencies, per-kind
densities, per-token and per-question compute, APR, KL directions, milestone order, the calibrated threshold) is
compared with the same quantity computed here from its definition (METHOD.md) or through `cwic_exp`'s accounting.
"""
from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, tiny_cwic_checkpoint, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "analyses"))


def _text(rng, n):
    return "".join(rng.choice("abcdefgh ijklmnop qrstuvwxyz.,") for _ in range(n))


def _convs(n=16, seed=0, lo=20, hi=300, reply=True):
    """Stand-in held-out conversations of various lengths (byte tokens: their character count + 8 a message)."""
    rng = random.Random(seed)
    return [[{"role": "user", "content": _text(rng, rng.randint(lo, hi))}]
            + ([{"role": "assistant", "content": _text(rng, rng.randint(10, 60))}] if reply else []) for _ in range(n)]


def _dense_tiny(tok):
    return tiny_model(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_cwic_checkpoint(tmp_path_factory.mktemp("cwic_an") / "ckpt")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny forwards run fastest on one thread (the analyses' --threads 1); the setting is put back after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def heldout(monkeypatch):
    """The held-out tail replaced by `_convs()`; returns the list."""
    import cwic_exp.data as D
    convs = _convs()
    monkeypatch.setattr(D, "heldout_conversations", lambda path, n: convs[-n:])
    return convs


def _reference_ap(model, data, batch_size=2):
    """Per module, the layers' own active-parameter sum over the real tokens (segment id > 0); and that count."""
    import cwic_exp
    from cwic_exp.data import model_inputs
    mods = list(cwic_exp.iter_cwic_modules(model))
    sums, tokens, stats = [0.0] * len(mods), 0, None
    for i in range(0, len(data), batch_size):
        sl = slice(i, i + batch_size)
        real = data.segment_ids[sl] > 0
        kw = model_inputs({"input_ids": data.input_ids[sl], "segment_ids": data.segment_ids[sl],
                           "position_ids": data.position_ids[sl]})
        with torch.no_grad(), cwic_exp.cwic_context(model, token_mask=real, track_ap=True):
            model(**kw)
        sel = real.reshape(-1)
        for j, m in enumerate(mods):
            sums[j] += float(m.ap_tokens[sel].sum())
        st = cwic_exp.gather_active(model, real)
        stats = st if stats is None else stats + st
        tokens += int(sel.sum())
    return mods, sums, tokens, stats


def test_mask_recorder_counts_the_masks_of_real_tokens_only(ckpt, heldout):
    """The recorder's token total is the real tokens (padding and packing glue out); each module's density equals
    the layer's own count per real token (partial last stripes counted by their rows); the LM head's
    frequencies equal G = H(|x − x̄| − θσ) recomputed here from the final hidden states; and `check()` does
    catch a disagreement."""
    from common import MaskRecorder, heldout_rows, load_cwic, packed_batches
    model, tok = load_cwic(ckpt)
    data, _ = heldout_rows(tok, rows=3)
    assert (data.segment_ids == 0).any() and (data.segment_ids > 1).any()   # padding and packing both exercised
    rec = MaskRecorder(model)
    with rec:
        for kw, mask in packed_batches(data, 2):
            rec.run(kw, mask)
    mods, sums, tokens, _ = _reference_ap(model, data)
    assert rec.tokens == tokens == int((data.segment_ids > 0).sum())
    for i, m in enumerate(mods):
        assert rec.density(i) == pytest.approx(sums[i] / (m.dense_params * tokens), rel=1e-5), (m.kind, m.layer_idx)
    assert rec.check() < 1e-4
    # the head's (stripe, input) frequencies from its input, the normed last hidden state
    head = next(i for i, m in enumerate(mods) if m.kind == "head")
    hm, counts = mods[head], 0
    for kw, mask in packed_batches(data, 2):
        with torch.no_grad():
            x = model.model(**kw).last_hidden_state.reshape(-1, hm.in_features)[mask.reshape(-1)]
        mean, std = hm.running_stats()
        counts = counts + ((x - mean).abs()[:, None, :] >= (hm.theta * std)[None]).sum(0)
    ref = counts.double() / tokens
    assert 0.05 < float(ref.mean()) < 0.95
    torch.testing.assert_close(rec.freq(head).double(), ref, rtol=0, atol=1e-6)
    # a recorder that disagrees with the layers must say so
    rec.counts[head] = rec.counts[head] * 1.01
    with pytest.raises(AssertionError, match="disagree"):
        rec.check()


def test_heldout_rows_pack_the_fitting_conversations_and_draw_seeded_rows(monkeypatch):
    """common.heldout_rows keeps every conversation of ≤ seq_len tokens (one of exactly seq_len included), packs
    them and draws `rows` of the packed rows with random_rows(seed 0), not the first (longest) ones; the default
    row length is 512 (HELDOUT_SEQ_LEN)."""
    import cwic_exp.data as D
    from common import HELDOUT_SEQ_LEN, heldout_rows
    tok = byte_tokenizer()
    convs = _convs(10, seed=3, lo=5, hi=40, reply=False)
    glue = len(D.render_ids(tok, [{"role": "user", "content": ""}]))   # the template's own tokens
    exact = [{"role": "user", "content": "x" * (64 - glue)}]          # exactly 64 tokens
    too_long = [{"role": "user", "content": "y" * (65 - glue)}]
    convs = convs + [exact, too_long]
    monkeypatch.setattr(D, "heldout_conversations", lambda path, n: convs[-n:])
    seqs = [D.render_ids(tok, m) for m in convs]
    assert len(seqs[-2]) == 64 and len(seqs[-1]) == 65
    data, kw = heldout_rows(tok, rows=2, seq_len=64)
    assert kw["kept"] == len(convs) - 1 and kw["conversations"] == len(convs)
    full = D.pack_sequences([s for s in seqs if len(s) <= 64], 64, D.pad_id(tok))
    idx = D.random_rows(len(full), 2, 0)
    assert idx.tolist() != [0, 1]                                   # the draw differs from the first rows
    assert torch.equal(data.input_ids, full.input_ids[idx]) and torch.equal(data.segment_ids, full.segment_ids[idx])
    assert HELDOUT_SEQ_LEN == 512 and heldout_rows(tok, rows=1)[1]["seq_len"] == 512


def test_activation_frequency_main_matches_the_layers_accounting(ckpt, heldout, tmp_path):
    """activation_frequency.main on the held-out rows: density per kind (head included) equals cwic_exp's own
    accounting over the same real tokens; the head's per-stripe frequencies are one per vocabulary stripe and
    weight back to its density; Fig. 8's mean per head is the mean over that head's own contiguous hd columns;
    Fig. 7 shows layers 0 and 1 of a 2-layer model (pick_layers spans 0..L−1)."""
    import activation_frequency as AF
    from common import heldout_rows, load_cwic
    out = tmp_path / "af"
    summ = AF.main(["--checkpoint", str(ckpt), "--out", str(out), "--rows", "3"])
    model, tok = load_cwic(ckpt)
    data, _ = heldout_rows(tok, 3)
    _, _, tokens, stats = _reference_ap(model, data)
    ref = stats.summary()["density"]
    assert summ["tokens"] == tokens
    assert set(summ["density_by_kind"]) == set(ref) and "head" in ref
    for k, v in ref.items():
        assert summ["density_by_kind"][k] == pytest.approx(v, rel=1e-5), k
    hm = model.lm_head
    hs = json.loads((out / "fig4_head_stripes.json").read_text())
    assert len(hs["freq"]) == hm.num_stripes
    rows = torch.tensor([hm.stripe_size] * (hm.num_stripes - 1) + [hm.out_features - hm.stripe_size * (hm.num_stripes - 1)])
    assert float((torch.tensor(hs["freq"]) * rows).sum() / hm.out_features) == pytest.approx(ref["head"], rel=1e-5)
    f8 = json.loads((out / "fig8_o_heads.json").read_text())
    H, hd = f8["heads"], f8["head_dim"]
    assert (H, hd) == (4, 12)
    for L, per_head in enumerate(f8["per_head_mean"]):
        f = torch.tensor(f8["freq"][str(L)])                          # (stripes, H*hd), rounded to 3 places
        want = [float(f[:, h * hd:(h + 1) * hd].mean()) for h in range(H)]
        assert per_head == pytest.approx(want, abs=2e-3)
    assert json.loads((out / "fig7_gate_heatmap.json").read_text())["layers"] == [0, 1]
    assert AF.pick_layers(24) == [0, 8, 15, 23] and AF.pick_layers(2) == [0, 1]


def _t(i, text, ap=1.0):
    return {"id": i, "text": text, "ap": ap}


def test_categorise_chatml_turns():
    """Token categories of a two-turn ChatML transcript: role headers are `role`, the glue after <|im_end|> is
    `special`, and a later turn's prompt, which starts inside the previous reply (the cache stopped there),
    starts as `assistant`."""
    from token_compute import categorise
    S, E = 1, 2                                                       # <|im_start|>, <|im_end|>
    t1 = [_t(S, "<|im_start|>"), _t(10, "system"), _t(11, "\n"), _t(12, "Be"), _t(13, " brief"), _t(E, "<|im_end|>"),
          _t(11, "\n"), _t(S, "<|im_start|>"), _t(14, "user"), _t(11, "\n"), _t(15, "hi"), _t(E, "<|im_end|>"),
          _t(11, "\n"), _t(S, "<|im_start|>"), _t(16, "assistant"), _t(11, "\n")]
    t2 = [_t(17, "!"), _t(E, "<|im_end|>"), _t(11, "\n"), _t(S, "<|im_start|>"), _t(14, "user"), _t(11, "\n"),
          _t(18, "more"), _t(E, "<|im_end|>"), _t(11, "\n"), _t(S, "<|im_start|>"), _t(16, "assistant"), _t(11, "\n")]
    tr = {"turns": [{"prompt": t1, "reply": [_t(19, "Hello")]}, {"prompt": t2, "reply": [_t(20, "ok")]}]}
    cats = [c for _, c in categorise(tr, {S, E})]
    assert cats == (["special", "role", "role", "system", "system", "special", "special", "special", "role", "role",
                     "user", "special", "special", "special", "role", "role", "assistant"]
                    + ["assistant", "special", "special", "special", "role", "role", "user", "special", "special",
                       "special", "role", "role", "assistant"])


def test_categorise_llama3_headers_and_a_split_role_name():
    """Llama 3's headers (<|start_header_id|>role<|end_header_id|>\\n\\n, <|eot_id|>) give the same categories as
    ChatML's: every user token after the first <|eot_id|> was `special`, and the system header and prompt `user`.
    A role name split over two tokens ("ass" "istant") still names the role (it kept the one before)."""
    from token_compute import categorise
    B, SH, EH, EOT = 128000, 128006, 128007, 128009
    p = [_t(B, "<|begin_of_text|>"), _t(SH, "<|start_header_id|>"), _t(1, "system"), _t(EH, "<|end_header_id|>"),
         _t(2, "\n\n"), _t(3, "Be brief."), _t(EOT, "<|eot_id|>"), _t(SH, "<|start_header_id|>"), _t(4, "user"),
         _t(EH, "<|end_header_id|>"), _t(2, "\n\n"), _t(5, "hi"), _t(6, " there"), _t(EOT, "<|eot_id|>"),
         _t(SH, "<|start_header_id|>"), _t(7, "assistant"), _t(EH, "<|end_header_id|>"), _t(2, "\n\n")]
    cats = [c for _, c in categorise({"turns": [{"prompt": p, "reply": [_t(8, "Hello")]}]}, {B, SH, EH, EOT})]
    assert cats == ["special", "special", "role", "special", "role", "system", "special", "special", "role",
                    "special", "role", "user", "user", "special", "special", "role", "special", "role", "assistant"]
    S, E = 1, 2
    t2 = [_t(17, "!"), _t(E, "<|im_end|>"), _t(11, "\n"), _t(S, "<|im_start|>"), _t(30, "sys"), _t(31, "tem"),
          _t(11, "\n"), _t(18, "rules"), _t(E, "<|im_end|>")]
    cats = [c for _, c in categorise({"turns": [{"prompt": t2, "reply": []}]}, {S, E})]
    assert cats == ["user", "special", "special", "special", "role", "role", "role", "system", "special"]


def test_special_ids_include_added_special_tokens():
    """An added special token that is not bos, eos or pad (here <|im_end|>) is template: `all_special_ids` leaves it
    out, and the trained run's Fig. 9 counted each <|im_end|> and the newline after it as the turn's text."""
    from tokenizers import AddedToken
    from token_compute import special_ids
    tok = byte_tokenizer()
    tok.add_tokens([AddedToken("<|tool|>", special=True), AddedToken("plain", special=False)])
    tool, plain = tok.convert_tokens_to_ids("<|tool|>"), tok.convert_tokens_to_ids("plain")
    assert tool not in tok.all_special_ids
    ids = special_ids(tok)
    assert set(tok.all_special_ids) <= ids and tool in ids and plain not in ids


def test_token_compute_main_reports_apr_per_category(ckpt, tmp_path):
    """token_compute.main on a real (tiny) chat: per category, mean active parameters per token and
    APR = dense / mean active (> 1 with random thresholds), from the per-token table it writes."""
    import token_compute as TC
    out = tmp_path / "tc"
    rows = TC.main(["--checkpoint", str(ckpt), "--out", str(out), "--prompt", "hi there", "--max-new-tokens", "4",
                    "--width", "60"])
    tr = json.loads((out / "chat_transcript.json").read_text())
    dense = tr["dense"]
    with open(out / "token_compute_tokens.csv") as f:
        toks = list(csv.DictReader(f))
    assert len(toks) == sum(len(t["prompt"]) + len(t["reply"]) for t in tr["turns"])
    by = {}
    for t in toks:
        by.setdefault(t["category"], []).append(float(t["active"]))
    assert {r["category"] for r in rows} == set(by) and "assistant" in by
    for r in rows:
        v = by[r["category"]]
        assert r["tokens"] == len(v)
        assert r["mean_active"] == pytest.approx(sum(v) / len(v))
        assert r["apr"] == pytest.approx(dense / (sum(v) / len(v))) and r["apr"] > 1


def _questions(tok, model, n, seed, long):
    """Stand-in ARC questions whose answer key is the tiny model's own choice (read here from one forward per
    question at the assistant header's last token), so every answer counts as correct."""
    rng = random.Random(seed)
    qs = []
    for j in range(n):
        labels = ["A", "B", "C"]
        q = {"id": f"{seed}-{j}", "question": _text(rng, rng.randint(30, 60) * (3 if long else 1)) + "?",
             "choices": {"label": labels, "text": [_text(rng, rng.randint(3, 12)) for _ in labels]}}
        content = q["question"] + "\n" + "\n".join(f"{l}. {t}" for l, t in zip(labels, q["choices"]["text"]))
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        letters = [tok(l, add_special_tokens=False)["input_ids"][0] for l in labels]
        q["answerKey"] = labels[int(logits[letters].argmax())]
        q["_ids"], q["_content"], q["_text"] = ids, content, text
        qs.append(q)
    return qs


def test_arc_compute_main_per_question_compute_and_ratio(ckpt, tmp_path, monkeypatch):
    """arc_compute.main with stand-in question sets (batched, right-padded): each question's figure is the mean
    active parameters over its question/option tokens only (template and system text out), measured here one
    question at a time with cwic_exp.active_parameters; the answer is read at the last prompt position; per-set
    APR = dense / mean and easy_vs_challenge_relative = easy / challenge − 1."""
    import arc_compute as AC
    import cwic_exp
    from common import load_cwic
    model, tok = load_cwic(ckpt)
    sets = {"ARC-Easy": _questions(tok, model, 5, 1, False), "ARC-Challenge": _questions(tok, model, 5, 2, True)}
    monkeypatch.setattr(AC, "arc_questions", lambda name, split="validation": [
        {k: v for k, v in q.items() if not k.startswith("_")} for q in sets[name]])
    out = tmp_path / "arc"
    summ = AC.main(["--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "3"])
    with open(out / "arc_compute.csv") as f:
        got = {r["id"]: r for r in csv.DictReader(f)}
    dense = None
    means = {}
    for name, qs in sets.items():
        for q in qs:
            r = cwic_exp.active_parameters(model, torch.tensor([q["_ids"]]), per_token=True)
            dense = r["dense"]
            head, tail = q["_text"].split(q["_content"])               # the template around the content
            parts = [tok(x, add_special_tokens=False)["input_ids"] for x in (head, q["_content"], tail)]
            assert parts[0] + parts[1] + parts[2] == q["_ids"]
            sel = torch.tensor([False] * len(parts[0]) + [True] * len(parts[1]) + [False] * len(parts[2]))
            want = float(r["per_token"][0][sel].mean())
            assert int(got[q["id"]]["tokens"]) == len(q["_content"])
            assert float(got[q["id"]]["mean_active"]) == pytest.approx(want, rel=1e-5)
            assert got[q["id"]]["correct"] == "1"
            means.setdefault(name, []).append(want)
    e = sum(means["ARC-Easy"]) / 5
    c = sum(means["ARC-Challenge"]) / 5
    assert summ["dense"] == pytest.approx(dense)
    assert summ["ARC-Easy"]["apr"] == pytest.approx(dense / e, rel=1e-5) and summ["ARC-Easy"]["apr"] > 1
    assert summ["ARC-Challenge"]["apr"] == pytest.approx(dense / c, rel=1e-5)
    assert summ["easy_vs_challenge_relative"] == pytest.approx(e / c - 1, rel=1e-4, abs=1e-7)
    assert abs(e / c - 1) > 1e-4                                      # the two sets do differ
    assert summ["ARC-Easy"]["accuracy"] == summ["ARC-Challenge"]["accuracy"] == 1.0


def test_milestones_in_apr_order_exported_only_final_last(tmp_path):
    """kl_vs_apr.milestones: the run's apr_*x exports in numeric APR order (10.05× after 3.05×), only those
    written completely (config.json), other names ignored, the checkpoint itself last."""
    from kl_vs_apr import milestones
    hf = tmp_path / "run" / "hf"
    for name, done in [("apr_10.05x", True), ("apr_2.05x", True), ("apr_3.05x", True), ("apr_4.05x", False),
                       ("apr_x", True), ("final", True)]:
        (hf / name).mkdir(parents=True)
        if done:
            (hf / name / "config.json").write_text("{}")
    got = [p.name for p in milestones(hf / "final")]
    assert got == ["apr_2.05x", "apr_3.05x", "apr_10.05x", "final"]
    # a milestone as the checkpoint: its trajectory stops there (it measured the later ones and left out final)
    assert [p.name for p in milestones(hf / "apr_3.05x")] == ["apr_2.05x", "apr_3.05x"]
    assert [p.name for p in milestones(hf / "apr_2.05x")] == ["apr_2.05x"]


def test_kl_vs_apr_measure_directions_and_real_tokens(ckpt, heldout):
    """kl_vs_apr.measure on packed rows with padding: FKL = KL(teacher ‖ student) and RKL = KL(student ‖
    teacher) per real token, kl their mean, APR over the real tokens only (dense × tokens / active)."""
    import torch.nn.functional as F
    from common import heldout_rows, load_cwic, packed_batches
    from kl_vs_apr import measure
    model, tok = load_cwic(ckpt)
    teacher = tiny_model(vocab_size=len(tok), seed=1)                 # another model, with peaked outputs:
    with torch.no_grad():                                             # FKL and RKL differ
        teacher.model.norm.weight.mul_(8)
    data, _ = heldout_rows(tok, rows=3)
    assert (data.segment_ids == 0).any()
    batches = list(packed_batches(data, 2))
    r = measure(model, teacher, batches)
    fkl = rkl = 0.0
    for kw, mask in batches:
        with torch.no_grad():
            ls = F.log_softmax(model(**kw).logits[mask].double(), -1)
            lt = F.log_softmax(teacher(**kw).logits[mask].double(), -1)
        fkl += float((lt.exp() * (lt - ls)).sum())
        rkl += float((ls.exp() * (ls - lt)).sum())
    _, _, tokens, stats = _reference_ap(model, data)
    assert r["tokens"] == tokens
    assert r["fkl"] == pytest.approx(fkl / tokens, rel=1e-4) and r["rkl"] == pytest.approx(rkl / tokens, rel=1e-4)
    assert abs(r["fkl"] - r["rkl"]) > 1e-3 * r["kl"]                  # directions distinguishable
    assert r["kl"] == pytest.approx(0.5 * (fkl + rkl) / tokens, rel=1e-4)
    assert r["apr"] == pytest.approx(float(stats.apr), rel=1e-6) and r["apr"] > 1


def test_kl_vs_apr_main_takes_teacher_from_flag_then_run_config(ckpt, heldout, tmp_path, monkeypatch):
    """--teacher wins over the run config's model.name, which wins over the default; the teacher is the point
    (1×, 0) and each checkpoint follows it."""
    import cwic_exp
    import kl_vs_apr as KL
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "hf" / "final")
    (run / "config.yaml").write_text("model:\n  name: from-config\n")
    asked = []

    def fake_teacher(name, device="cpu"):
        asked.append(name)
        return _dense_tiny(byte_tokenizer()), None
    monkeypatch.setattr(cwic_exp, "load_teacher", fake_teacher)
    final = str(run / "hf" / "final")
    rows = KL.main(["--checkpoint", final, "--teacher", "from-flag", "--rows", "2", "--out", str(tmp_path / "a")])
    rows2 = KL.main(["--checkpoint", final, "--rows", "2", "--out", str(tmp_path / "b")])
    assert asked == ["from-flag", "from-config"]
    assert [r["checkpoint"] for r in rows] == ["teacher (from-flag)", "final"]
    assert rows[0]["apr"] == 1.0 and rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0
    assert rows2[1]["kl"] == pytest.approx(rows[1]["kl"])


def test_make_calibrated_hits_the_target_apr_with_masked_statistics(tmp_path, monkeypatch, heldout):
    """make_calibrated.main with a tiny teacher: the bisection lands within 0.1 of --apr (APR grows with θ),
    θ = c everywhere but the LM head (c × --head-scale), and the statistics are those of the training rows'
    real tokens: layer 0's q_proj input mean/std equal the bias-corrected moving average (β 0.99) of the
    per-batch moments of input_layernorm(embeddings), padding left out."""
    import cwic_exp
    import cwic_exp.data as D
    import make_calibrated as MC
    tok = byte_tokenizer()
    monkeypatch.setattr(cwic_exp, "load_teacher", lambda name, device="cpu": (_dense_tiny(tok), tok))
    seqs = [D.render_ids(tok, m) for m in _convs(10, seed=5, lo=10, hi=80)]
    train = D.pack_sequences(seqs, 128, D.pad_id(tok))
    assert (train.segment_ids == 0).any() and len(train) >= 4
    monkeypatch.setattr(D, "build_packed", lambda tok, **kw: (train, None))
    save = tmp_path / "cal"
    MC.main(["--apr", "1.5", "--stripe-size", "16", "--stat-rows", "4", "--eval-rows", "2", "--save", str(save),
             "--out", str(tmp_path / "o")])
    meta = json.loads((save / "cwic_calibration.json").read_text())
    assert abs(meta["apr"] - 1.5) < 0.1 and 0 < meta["theta"] < 3
    assert meta["head_theta"] == pytest.approx(meta["theta"] * 0.5)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(save)
    for m in cwic_exp.iter_cwic_modules(model):
        p = m.theta if isinstance(m, cwic_exp.CwicLinear) else m.phi
        want = meta["theta"] * (0.5 if m.kind == "head" else 1.0)
        assert torch.allclose(p, torch.full_like(p, want)), m.kind
    dense = _dense_tiny(tok)
    b, em, es, steps = 0.99, 0.0, 0.0, 0
    for i in range(0, 4, 2):
        ids, real = train.input_ids[i:i + 2].long(), train.segment_ids[i:i + 2] > 0
        with torch.no_grad():
            x = dense.model.layers[0].input_layernorm(dense.model.embed_tokens(ids))[real]
        em, es, steps = b * em + (1 - b) * x.mean(0), b * es + (1 - b) * x.std(0, unbiased=False), steps + 1
    mean, std = model.model.layers[0].self_attn.q_proj.running_stats()
    torch.testing.assert_close(mean, em / (1 - b ** steps), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, es / (1 - b ** steps), rtol=1e-4, atol=1e-5)


def test_run_all_compares_with_the_first_milestone(tmp_path, monkeypatch):
    """run_all: Fig. 7's --compare is the run's first APR milestone (lowest APR), never the checkpoint itself."""
    import run_all as RA
    hf = tmp_path / "run" / "hf"
    for name in ("apr_3.05x", "apr_2.05x", "final"):
        (hf / name).mkdir(parents=True)
        (hf / name / "config.json").write_text("{}")
    calls = {}
    monkeypatch.setattr(RA.activation_frequency, "main", lambda argv: calls.setdefault("frequency", argv))
    rep = RA.main(["--checkpoint", str(hf / "final"), "--out", str(tmp_path / "o"),
                   "--skip", "tokens", "arc", "kl", "tmux"])
    argv = calls["frequency"]
    assert argv[argv.index("--compare") + 1] == str((hf / "apr_2.05x").resolve())
    assert rep["milestones"] == [str((hf / n).resolve()) for n in ("apr_2.05x", "apr_3.05x")]


@pytest.mark.parametrize("kernels, backend", [(False, "hf"), (True, "cpu")])
def test_chat_capture_default_backend(ckpt, tmp_path, monkeypatch, kernels, backend):
    """chat_capture on the CPU: the C++ sparse decoder (bf16) where its kernels build, else Hugging Face's forward
    (no --dtype)."""
    import chat_capture as CC
    from cwic_kernels import cpu
    monkeypatch.setattr(cpu, "load", lambda *a, **k: object() if kernels else None)
    monkeypatch.setattr(CC.shutil, "which", lambda name: "/usr/bin/tmux")
    seen = []

    def fake_tmux(*a, check=True):
        seen.append(a)
        raise RuntimeError("stop")
    monkeypatch.setattr(CC, "tmux", fake_tmux)
    with pytest.raises(RuntimeError, match="stop"):
        CC.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o")])
    shell = seen[0][-1]
    assert f"--backend {backend}" in shell
    assert ("--dtype bfloat16" in shell) == (backend == "cpu")


def test_analysis_json_is_strict(tmp_path):
    """A NaN figure (a KL of a diverged model) is written as null: json.dumps wrote the token NaN, which strict
    parsers (JSON.parse, jq) refuse."""
    from common import save_json
    from conftest import strict_json
    save_json(tmp_path / "r.json", {"kl": float("nan"), "apr": torch.tensor(3.0).item(), "rows": [float("inf"), 1]})
    assert strict_json((tmp_path / "r.json").read_text()) == {"kl": None, "apr": 3.0, "rows": [None, 1]}


@pytest.mark.parametrize("script, argv", [
    ("arc_compute", ["--limit", "-1"]),            # sliced off the last question ([:-1]) instead
    ("arc_compute", ["--batch-size", "0"]),
    ("run_all", ["--arc-limit", "0"]),
    ("kl_vs_apr", ["--rows", "x"]),
    ("activation_frequency", ["--threads", "-2"]),   # 0 is torch's default
])
def test_analysis_counts_below_one_are_refused(script, argv, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(argv)
    assert e.value.code == 2 and "expected a whole number ≥" in capsys.readouterr().err


def test_analyses_write_outside_the_tracked_results_by_default(tmp_path, monkeypatch):
    """The default --out overwrote committed files under experiments/results/analyses/; it is runs/analyses/ now
    (ignored by git). With no runs/LATEST, the message names the script's own option."""
    import argparse
    import subprocess
    import common
    args = common.add_common_args(argparse.ArgumentParser()).parse_args([])
    root = Path(__file__).resolve().parents[1]
    assert Path(args.out) == root / "runs" / "analyses"
    assert subprocess.run(["git", "check-ignore", "-q", str(Path(args.out) / "x.png")], cwd=root).returncode == 0
    from cwic_exp.chat import default_model
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="or pass --checkpoint PATH"):
        default_model(search=[tmp_path], option="--checkpoint PATH")
