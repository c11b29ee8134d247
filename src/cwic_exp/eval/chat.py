"""Chat data for TEAL calibration and for KL / perplexity, from the offline ShareGPT file.

The file's records are recovered one by one (it is truncated; cwic_exp.data does the decoding).
Calibration takes conversations from the HEAD of the file; the held-out set is its TAIL (the last
`n` conversations, less those with a copy earlier in the file: `cwic_exp.data.heldout_conversations`), so
neither is benchmark data and the two never overlap. Training (cwic_exp.data.build_packed) drops the last
`cwic_exp.data.HELDOUT_TAIL` (64) conversations and their copies from both its train and validation splits, so
the held-out set here (n ≤ 64) is never trained on.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..data import heldout_conversations, pad_id, render_ids


def calibration_rows(tok, rows: int = 64, seq_len: int = 512, path=None) -> Tensor:
    """(rows, seq_len) token ids: head conversations in the chat template, concatenated and cut
    into fixed-length rows (no padding: TEAL's calibration sequences)."""
    from ..data import sharegpt_conversations
    stream: list[int] = []
    need = rows * seq_len
    for msgs in sharegpt_conversations(path):
        ids = render_ids(tok, msgs)
        if ids:
            stream.extend(ids)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise RuntimeError(f"ShareGPT gave {len(stream)} tokens, fewer than {need}")
    return torch.tensor(stream[:need], dtype=torch.long).view(rows, seq_len)


def heldout_rows(tok, conversations: int = 64, seq_len: int = 1024, path=None) -> tuple[Tensor, Tensor]:
    """The last `conversations` ShareGPT conversations, one per row, cut to `seq_len` tokens and
    right-padded: (input_ids, attention_mask). From the packaged set at most HELDOUT_TAIL: training keeps
    only those out of its data."""
    from ..data import HELDOUT_TAIL
    if path is None and conversations > HELDOUT_TAIL:
        raise ValueError(f"only the last {HELDOUT_TAIL} ShareGPT conversations are held out of training "
                         f"(cwic_exp.data.HELDOUT_TAIL); {conversations} would score trained ones")
    seqs = [s for s in (render_ids(tok, m) for m in heldout_conversations(path, conversations)) if s]
    pad = pad_id(tok)
    T = min(seq_len, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:T]
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask
