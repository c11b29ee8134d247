"""Data splits: copies of a conversation never straddle train and validation, held-out copies stay out, the paper
mix's cap reaches every source, tiny sources fail clearly, the packer places every sequence once."""
from __future__ import annotations

import json
import math
import random
import sys
import types

import pytest
import torch

from cwic_exp import data as D
from conftest import IdTok as Tok


def _convs(data: D.PackedData) -> list[int]:
    """The conversations' numbers N ("qN") in the rows."""
    return [int(t) - 1000 for t in data.input_ids.flatten().tolist() if t >= 1000]


def _sharegpt(tmp_path, numbers):
    recs = [{"conversations": [{"from": "human", "value": f"q{n}"}, {"from": "gpt", "value": "a"}]} for n in numbers]
    p = tmp_path / "sharegpt.json"
    p.write_text(json.dumps(recs))
    return str(p)


def test_copies_stay_on_one_side_and_heldout_copies_are_dropped(tmp_path):
    body = [1000 + i for i in range(300)]
    tail = [5000 + i for i in range(D.HELDOUT_TAIL)]
    numbers = body + body[:100] + tail[:5] + tail       # 100 repeated conversations; 5 held-out ones appear early
    train, val = D.build_packed(Tok(), source="sharegpt", seq_len=12, val_fraction=0.2,
                                path=_sharegpt(tmp_path, numbers), cache=False, progress=False)
    tr, va = _convs(train), _convs(val)
    assert not set(tr) & set(va)
    assert not (set(tr) | set(va)) & set(tail)
    assert len(va) == len(set(va)) == round(300 * 0.2)          # one copy of each validation conversation
    assert sorted(set(tr) | set(va)) == body                   # nothing else lost
    assert train.info["heldout_copies_dropped"] == 5 and train.info["distinct"] == 300
    held = [int(m[0]["content"][1:]) for m in D.heldout_conversations(_sharegpt(tmp_path, numbers))]
    assert held == tail[5:]                                     # the tail less the conversations with earlier copies
    assert sum(tr.count(n) for n in body[:100] if n in tr) == 2 * len([n for n in body[:100] if n in tr])


def _fake_paper_mix(monkeypatch, tmp_path, heldout=(99,)):
    """Each paper-mix source k (from 1) gives rows "q{1000 k + j}", j < 50; the packaged ShareGPT file holds the
    conversations `heldout` only (all of them its held-out tail)."""
    def load_dataset(name, cfg, split, streaming):
        k = [i for i, (n, c, *_) in enumerate(D.PAPER_MIX) if n == name and c == cfg][0]
        rows = [{"messages": [{"role": "user", "content": f"q{1000 * (k + 1) + j}"},
                              {"role": "assistant", "content": "a"}]} for j in range(50)]
        if split is None:   # every split (AgentInstruct): two of unequal length, the hub's order not sorted
            return {"zz": rows[:10], "aa": rows[10:]}
        return rows
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    sg = tmp_path / "packaged"
    sg.mkdir(exist_ok=True)
    monkeypatch.setattr(D, "sharegpt_path", lambda: _sharegpt(sg, list(heldout)))


def test_paper_mix_cap_reaches_every_source_and_repeats_do_not_leak(monkeypatch, tmp_path):
    _fake_paper_mix(monkeypatch, tmp_path)
    train, val = D.build_packed(Tok(), source="paper_mix", seq_len=12, max_conversations=47, cache=False,
                                progress=False)
    got = _convs(train) + _convs(val)
    assert {n // 1000 for n in got} == set(range(1, len(D.PAPER_MIX) + 1))
    assert len(set(got)) == 47 == train.info["distinct"]               # the cap counts distinct source rows
    caps = [6, 6] + [5] * (len(D.PAPER_MIX) - 2)                          # 47 = 9 × 5 + 2
    assert train.info["kept"] == sum(c * rep for c, (*_, rep) in zip(caps, D.PAPER_MIX))   # then the repeats
    train, val = D.build_packed(Tok(), source="paper_mix", seq_len=12, val_fraction=0.1, cache=False, progress=False)
    assert not set(_convs(train)) & set(_convs(val))
    assert len(_convs(val)) == len(set(_convs(val)))


def test_a_source_of_several_splits_gives_every_split_in_turn(monkeypatch, tmp_path):
    """AgentInstruct-1M has 15 task splits and no "train": the mix takes them all, one row of each in turn, so a
    capped run samples every split (it took only "creative_content", 5 % of the dataset, before)."""
    k = [i for i, (n, *_) in enumerate(D.PAPER_MIX) if n == "microsoft/orca-agentinstruct-1M-v1"]
    assert len(k) == 1 and D.PAPER_MIX[k[0]][2] is None
    assert list(D._round_robin([[1, 2, 3, 4], [], [10, 20]])) == [1, 10, 2, 20, 3, 4]
    _fake_paper_mix(monkeypatch, tmp_path)
    monkeypatch.setattr(D, "PAPER_MIX", [D.PAPER_MIX[k[0]]])     # source 1: rows "q1000" .. "q1049"
    firsts = [int(m[0]["content"][1:]) - 1000 for m in D.paper_mix_conversations(6)]
    assert firsts == [10, 0, 11, 1, 12, 2]                    # "aa" (rows 10..49), then "zz" (0..9), in turn
    every = [int(m[0]["content"][1:]) - 1000 for m in D.paper_mix_conversations()]
    assert sorted(every) == list(range(50))                    # uncapped: every row of every split, once


def test_the_paper_mix_leaves_out_the_evaluations_heldout_sharegpt_chats(monkeypatch, tmp_path):
    """The held-out chat set (the ShareGPT tail, KL / perplexity) is evaluated on every run, whatever it trained on:
    a copy of one in the paper mix's sources (OpenHermes, smoltalk, ... carry ShareGPT-like chats) would leak it into
    training. Such copies are dropped, every repeat of them: 1003 (repeated once) and 6002 (MMLU's, 5 times)."""
    _fake_paper_mix(monkeypatch, tmp_path, heldout=(1003, 6002, 99))
    train, val = D.build_packed(Tok(), source="paper_mix", seq_len=12, val_fraction=0.1, cache=False, progress=False)
    got = set(_convs(train)) | set(_convs(val))
    assert not got & {1003, 6002} and {1002, 1004, 6001} <= got
    assert train.info["heldout_copies_dropped"] == 1 + 5 and train.info["distinct"] == 50 * len(D.PAPER_MIX) - 2


def test_a_tokenizer_without_a_chat_template_is_refused_by_name(tmp_path):
    class Base(Tok):   # a base model's tokenizer: the data could not be rendered in the chat format
        chat_template, name_or_path = None, "meta-llama/Llama-3.2-1B"
    with pytest.raises(ValueError, match="'meta-llama/Llama-3.2-1B' has no chat template"):
        D.build_packed(Base(), source="sharegpt", seq_len=12, path=_sharegpt(tmp_path, [1000]), cache=False,
                       progress=False)


def test_a_source_too_small_for_a_training_split_says_so(tmp_path):
    path = _sharegpt(tmp_path, [1000] + [5000 + i for i in range(D.HELDOUT_TAIL)])
    with pytest.raises(RuntimeError, match="no training data"):
        D.build_packed(Tok(), source="sharegpt", seq_len=12, path=path, cache=False, progress=False)
    with pytest.raises(ValueError, match="no training rows"):
        D.StepSampler(0, 4, 10)


def test_packing_is_best_fit_decreasing_and_places_every_sequence_once():
    random.seed(0)
    seqs = [[i + 1] * random.randint(1, 64) for i in range(3000)] + [[9999] * 65, []]   # too long, empty: dropped
    p = D.pack_sequences(seqs, 64, 0)
    placed = {}   # sequence -> (row, order in the row)
    for r in range(len(p)):
        for s in range(1, int(p.segment_ids[r].max()) + 1):
            ids = p.input_ids[r][p.segment_ids[r] == s]
            assert len(set(ids.tolist())) == 1
            placed[int(ids[0]) - 1] = (r, s)
    assert sorted(placed) == list(range(3000))
    # replay in the packer's order (longest first): each sequence went into the open row with the least room that
    # held it, or opened a row when none did (first fit takes the first row that holds it instead)
    room: dict[int, int] = {}
    for i in sorted(range(3000), key=lambda i: -len(seqs[i])):
        n, (r, _) = len(seqs[i]), placed[i]
        fits = [f for f in room.values() if f >= n]
        if r in room:
            assert room[r] == min(fits), (i, room[r], min(fits))
            room[r] -= n
        else:
            assert not fits and r == len(room)
            room[r] = 64 - n
    assert len(p) <= 11 / 9 * math.ceil(sum(map(len, seqs[:3000])) / 64) + 1
    for r in range(len(p)):                                      # positions restart at every conversation
        seg, pos = p.segment_ids[r], p.position_ids[r]
        for s in range(1, int(seg.max()) + 1):
            assert torch.equal(pos[seg == s], torch.arange(int((seg == s).sum()), dtype=pos.dtype))


def test_validation_rows_are_drawn_at_random_and_packed_rows_must_fit_seq_len(tmp_path):
    path = _sharegpt(tmp_path, [1000 + i for i in range(400)] + [5000 + i for i in range(D.HELDOUT_TAIL)])
    dm = D.ChatDataModule(Tok(), seq_len=12, val_fraction=0.5, val_rows=5, path=path, cache=False, seed=3)
    dm.setup()
    train, val = D.build_packed(Tok(), seq_len=12, val_fraction=0.5, path=path, cache=False, progress=False, seed=3)
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(3))[:5].sort().values
    assert torch.equal(dm.val_data.input_ids, val.input_ids[idx])
    assert not torch.equal(idx, torch.arange(5))
    saved = D.save_packed(tmp_path / "p.pt", train, val, Tok())
    with pytest.raises(ValueError, match="holds rows of 12 tokens, but data.seq_len is 16"):
        D.ChatDataModule(Tok(), source="packed", seq_len=16, path=str(saved)).setup()


def test_a_resume_over_other_training_rows_is_refused(tmp_path, caplog):
    path = _sharegpt(tmp_path, [1000 + i for i in range(200)] + [5000 + i for i in range(D.HELDOUT_TAIL)])
    dm = D.ChatDataModule(Tok(), seq_len=12, path=path, cache=False)
    dm.setup()
    state = dm.state_dict()
    same = D.ChatDataModule(Tok(), seq_len=12, path=path, cache=False)
    same.load_state_dict(state)          # before setup: checked once the data exist
    same.setup()
    other = D.ChatDataModule(Tok(), seq_len=12, path=path, cache=False, seed=1)   # another split
    other.setup()
    with pytest.raises(RuntimeError, match="training rows differ"):
        other.load_state_dict(state)
    old = D.ChatDataModule(Tok(), seq_len=12, path=path, cache=False)
    old.setup()
    old.load_state_dict({k: v for k, v in state.items() if k != "data"})   # a checkpoint from before: a warning
    assert "cannot check" in caplog.text


def test_a_file_that_is_not_sharegpt_is_named(tmp_path):
    """A data.path of another format died with `ValueError: substring not found` (no file named), or with a
    misleading 'no conversation of <= N tokens'."""
    from cwic_exp.data import sharegpt_conversations
    obj, arr = tmp_path / "obj.json", tmp_path / "arr.json"
    obj.write_text('{"rows": [1, 2]}')
    arr.write_text('[{"text": "hello"}, {"text": "bye"}]')
    with pytest.raises(ValueError, match="obj.json: not a JSON array"):
        list(sharegpt_conversations(obj))
    with pytest.raises(ValueError, match="arr.json: none of its 2 records .* not ShareGPT"):
        list(sharegpt_conversations(arr))
    bom = tmp_path / "bom.json"                       # a byte-order mark before the array is still ShareGPT
    bom.write_text('\ufeff[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]',
                   encoding="utf-8")
    assert len(list(sharegpt_conversations(bom))) == 1


def test_the_tokenised_cache_follows_every_setting_and_the_file(tmp_path, monkeypatch):
    """The cache is keyed by the split's settings and by the source file's size and time, the packaged default file
    too: another seed, another validation fraction or an edited file is packed again, never read from the first."""
    monkeypatch.setattr(D, "_cache_root", lambda: tmp_path / "cache")
    tail = [5000 + i for i in range(D.HELDOUT_TAIL)]
    path = _sharegpt(tmp_path, [1000 + i for i in range(200)] + tail)

    def val(**over):
        return sorted(_convs(D.build_packed(Tok(), **{"seq_len": 12, "val_fraction": 0.2, "progress": False,
                                                      "path": path, **over})[1]))
    first = val()
    assert val() == first and len(list((tmp_path / "cache").glob("*.pt"))) == 1     # the second: from the cache
    assert val(seed=1) != first
    assert len(val(val_fraction=0.3)) != len(first)
    path = _sharegpt(tmp_path, [2000 + i for i in range(200)] + tail)               # the same file, edited
    assert val() != first and min(val()) >= 1000
    default = tmp_path / "packaged"
    default.mkdir()
    monkeypatch.setattr(D, "sharegpt_path", lambda: _sharegpt(default, [1000 + i for i in range(200)] + tail))
    packaged = val(path=None)
    monkeypatch.setattr(D, "sharegpt_path", lambda: _sharegpt(default, [3000 + i for i in range(200)] + tail))
    assert val(path=None) != packaged            # an upgraded package's file: packed again


def test_packed_files_round_trip_exactly(tmp_path):
    """save_packed → load_packed gives back the very rows: token ids above 32767 (stored in 16 bits; SmolLM2 has
    49152), every conversation of every row with its positions, and the padding."""
    g = random.Random(0)
    seqs = [[g.randrange(0, 49152) for _ in range(g.randint(2, 9))] for _ in range(30)]
    train, val = D.pack_sequences(seqs[:24], 16, 0), D.pack_sequences(seqs[24:], 16, 0)
    assert int(train.input_ids.max()) >= 32768 and int(train.segment_ids.max()) >= 2
    back = D.load_packed(D.save_packed(tmp_path / "p.pt", train, val, Tok()))
    for a, b in zip((train, val), back):
        for f in ("input_ids", "segment_ids", "position_ids"):
            assert torch.equal(getattr(a, f).long(), getattr(b, f).long()), f


class LenTok(Tok):
    """Conversation "qN" renders to N % 100 tokens ([1000 + N] then 7s), plus `extra` under another template."""
    extra = 0

    def apply_chat_template(self, msgs, tokenize=True):
        n = int(msgs[0]["content"][1:])
        return [1000 + n] + [7] * (n % 100 - 1 + self.extra)


def _lengths(lengths_counts, tail=True):
    """Distinct conversation numbers with the given token counts: [(tokens, how many)]."""
    nums, k = [], 1
    for n_tok, count in lengths_counts:
        for _ in range(count):
            nums.append(100 * k + n_tok)
            k += 1
    return nums + ([100 * (k + i) + 3 for i in range(D.HELDOUT_TAIL)] if tail else [])


def test_the_length_limits_are_exact_and_max_len_is_capped_at_seq_len(tmp_path):
    """A conversation of exactly max_len tokens is kept (> max_len is too long); max_len above seq_len is capped
    there, since the packer could not place a longer one, so the split is drawn only over what it packs."""
    tr, _ = D.build_packed(LenTok(), seq_len=12, val_fraction=0.1, path=_sharegpt(tmp_path, _lengths([(12, 10), (3, 10)])),
                           cache=False, progress=False)
    assert tr.info["too_long"] == 0 and tr.info["kept"] == 20
    tr, _ = D.build_packed(LenTok(), seq_len=12, max_len=100, val_fraction=0.1, cache=False, progress=False,
                           path=_sharegpt(tmp_path, _lengths([(20, 5), (3, 10)])))
    assert tr.info["max_len"] == 12 and tr.info["too_long"] == 5


def test_the_cache_follows_max_len_and_the_chat_template(tmp_path, monkeypatch):
    """Another max_len, or a tokenizer with the same vocabulary and another chat template, is tokenised again: a
    stale cache would train on other conversations or on other tokens, silently."""
    monkeypatch.setattr(D, "_cache_root", lambda: tmp_path / "cache")
    path = _sharegpt(tmp_path, _lengths([(10, 10), (3, 10)]))
    a = D.build_packed(LenTok(), seq_len=12, max_len=5, val_fraction=0.1, path=path, progress=False)[0]
    b = D.build_packed(LenTok(), seq_len=12, max_len=12, val_fraction=0.1, path=path, progress=False)[0]
    assert a.info["kept"] == 10 and b.info["kept"] == 20
    other = LenTok()
    other.chat_template, other.extra = "len+1", 1
    c = D.build_packed(other, seq_len=12, val_fraction=0.1, path=path, progress=False)[0]
    assert _convs(c) == _convs(b)                                        # the same split, each one token longer
    assert int((c.segment_ids > 0).sum()) == int((b.segment_ids > 0).sum()) + len(_convs(c))


def test_max_conversations_and_the_validation_size_are_exact(tmp_path):
    """max_conversations=10 reads 10 ShareGPT conversations (not 11); the validation set holds round(n · fraction)
    conversations: 150 × 0.025 = 3.75 → 4."""
    tr, _ = D.build_packed(LenTok(), seq_len=12, max_conversations=10, val_fraction=0.1, cache=False, progress=False,
                           path=_sharegpt(tmp_path, _lengths([(3, 50)])))
    assert tr.info["conversations"] == 10 and tr.info["distinct"] == 10
    _, va = D.build_packed(LenTok(), seq_len=12, val_fraction=0.025, cache=False, progress=False,
                           path=_sharegpt(tmp_path, _lengths([(3, 150)])))
    assert int((va.segment_ids > 0).sum()) == 3 * 4


def test_repeated_roles_are_merged_into_one_turn(tmp_path):
    """Two human messages in a row become one user turn (strict chat templates refuse repeated roles, which would
    drop the conversation silently)."""
    p = tmp_path / "r.json"
    p.write_text(json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                {"from": "gpt", "value": "c"}]}]))
    assert list(D.sharegpt_conversations(p)) == [[{"role": "user", "content": "a\n\nb"},
                                                  {"role": "assistant", "content": "c"}]]


def test_each_epoch_draws_a_new_order_and_the_loader_starts_at_the_trainers_step(tmp_path):
    """10 rows, 10 a step: each of 4 steps is its own permutation (the epoch enters the seed). The training loader
    resumes at the trainer's global step, also when it is ahead of the data module's own start."""
    steps = list(D.StepSampler(10, 10, 4, seed=0))
    assert len({tuple(s) for s in steps}) == 4
    dm = D.ChatDataModule(LenTok(), seq_len=12, val_fraction=0.1, cache=False, rows_per_step=4, num_steps=10,
                          path=_sharegpt(tmp_path, _lengths([(3, 100)])))
    dm.setup()
    dm.trainer = types.SimpleNamespace(global_rank=0, world_size=1, global_step=3)
    assert list(dm.train_dataloader().batch_sampler) == list(D.StepSampler(len(dm.train_data), 4, 10, 0, 3))


def test_packing_reports_real_tokens_and_hands_the_model_its_positions():
    """info counts the real tokens (not the padding); model_inputs passes the packed rows' restarting positions."""
    p = D.pack_sequences([[1] * 5], 8, 0)
    assert p.info["real_tokens"] == 5 and p.info["fill"] == pytest.approx(5 / 8)
    p = D.pack_sequences([[1, 2, 3], [4, 5]], 8, 0)
    assert torch.equal(D.model_inputs(vars(p))["position_ids"], p.position_ids.long())
