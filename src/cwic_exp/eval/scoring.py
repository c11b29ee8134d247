"""Batched log-likelihood scoring with shared prefixes, and the compute it took (no lm-eval import).

The answer choices of one question share their context, so each question becomes one prefix tree
("trie") of tokens: the context once, then a branch per choice. A tree is laid out flat with an
attention mask that lets each token see exactly its ancestors and position ids equal to its depth,
so every branch computes what a separate causal pass over `context + choice` would (tested against
that in tests/test_eval.py). Several trees share one row (block-diagonal mask). This cuts MMLU's
work by 4x (four one-token choices) and HellaSwag's by about 2x, with no approximation.

Compute is counted per processed token with the project's accounting (METHOD.md §4: q, k, v, o,
gate, up+down, head; not embeddings or attention scores), so the APR of a task is over the tokens
the model actually ran, and each question gets its own mean active parameters per token.

Everything here is device-agnostic and needs only torch: the GPU run of experiments/eval_table.py
calls it on a machine without lm-eval.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .compute import ComputeMeter


@dataclass
class Request:
    context: list[int]
    continuation: list[int]
    group: tuple = ()            # requests of one question share a group (e.g. (task, doc_id))
    key: tuple = ()              # identifies the request across runs (e.g. (task, doc_id, choice))


@dataclass
class Tree:
    """The prefix tree of one group, flattened: tokens in depth-first order, parents before children."""
    group: tuple
    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)      # -1 for roots
    depth: list[int] = field(default_factory=list)
    # per request of the group: (request index, node indices whose logits score it, target tokens)
    targets: list[tuple[int, list[int], list[int]]] = field(default_factory=list)

    def __len__(self):
        return len(self.tokens)


def build_trees(requests: list[Request], max_length: int | None = None) -> list[Tree]:
    """One tree per group, in the order groups first appear, nodes in depth-first pre-order (so a
    node's subtree is the contiguous run after it). Scoring `cont` after `ctx` needs the logits at
    the nodes of ctx[-1], cont[0], ..., cont[-2]: the path ctx + cont[:-1]."""
    groups: dict[tuple, list] = {}
    for ri, r in enumerate(requests):
        if not r.continuation:
            raise ValueError(f"request {ri}: empty continuation")
        if not r.context:
            raise ValueError(f"request {ri}: empty context (lm-eval puts the prefix token there)")
        path = list(r.context) + list(r.continuation[:-1])
        if max_length is not None and len(r.continuation) > max_length:
            raise ValueError(f"request {ri}{' ' + str(r.key) if r.key else ''}: its continuation has "
                             f"{len(r.continuation)} tokens, more than the model's max_length {max_length}: "
                             f"it cannot be scored in one window")
        if max_length is not None and len(path) > max_length:   # as lm-eval: keep the right end
            path = path[len(path) - max_length:]
        groups.setdefault(r.group, []).append((ri, path, list(map(int, r.continuation))))
    trees = []
    for g, items in groups.items():
        # trie: node -> {token: child}; node 0 is a virtual root
        kids: list[dict] = [{}]
        tok: list[int] = [-1]
        ends = []
        for ri, path, cont in items:
            node, nodes = 0, []
            for t in path:
                nxt = kids[node].get(t)
                if nxt is None:
                    nxt = len(kids)
                    kids.append({})
                    tok.append(int(t))
                    kids[node][t] = nxt
                node = nxt
                nodes.append(node)
            ends.append((ri, nodes[-len(cont):], cont))
        tree = Tree(g)
        order = {}
        stack = [(c, -1, 0) for c in reversed(list(kids[0].values()))]
        while stack:                                 # iterative pre-order DFS
            n, parent, d = stack.pop()
            order[n] = len(tree.tokens)
            tree.tokens.append(tok[n])
            tree.parent.append(parent)
            tree.depth.append(d)
            stack.extend((c, order[n], d + 1) for c in reversed(list(kids[n].values())))
        tree.targets = [(ri, [order[n] for n in nodes], cont) for ri, nodes, cont in ends]
        trees.append(tree)
    return trees


def _subtree_end(tree: Tree) -> list[int]:
    """Pre-order index one past the end of each node's subtree."""
    n = len(tree.tokens)
    end = list(range(1, n + 1))
    for i in range(n - 1, -1, -1):
        p = tree.parent[i]
        if p >= 0 and end[i] > end[p]:
            end[p] = end[i]
    return end


@dataclass
class Row:
    trees: list[int]
    length: int


def pack_rows(trees: list[Tree], row_tokens: int) -> list[Row]:
    """First-fit by decreasing size; a tree longer than `row_tokens` gets a row of its own."""
    rows: list[Row] = []
    open_rows: list[Row] = []
    for i in sorted(range(len(trees)), key=lambda i: -len(trees[i])):
        n = len(trees[i])
        for r in open_rows:
            if r.length + n <= row_tokens:
                r.trees.append(i)
                r.length += n
                break
        else:
            r = Row([i], n)
            rows.append(r)
            open_rows.append(r)
        # bounded search keeps this linear; trees only get smaller, so old rows are nearly full
        open_rows = [r for r in open_rows if r.length < row_tokens][-64:]
    return rows


@dataclass
class Batch:
    ids: Tensor          # (B, T) token ids (pad_id on padding)
    pos: Tensor          # (B, T) position ids = depth in the tree
    end: Tensor          # (B, T) row index one past the token's subtree: j is visible from i iff j <= i < end[j]
    real: Tensor         # (B, T) bool
    group: Tensor        # (B*T,) group index of each token, -1 on padding
    sel: Tensor          # (S,) flat positions whose logits score a continuation token
    target: Tensor       # (S,) the token to score there
    owner: Tensor        # (S,) request index


@dataclass
class Plan:
    """Requests laid out as batches of packed prefix trees; build once, score many models."""
    batches: list[Batch]
    groups: list[tuple]
    n_requests: int
    tokens: int

    def to(self, device) -> "Plan":
        for b in self.batches:
            for k, v in vars(b).items():
                setattr(b, k, v.to(device))
        return self


def plan_batches(requests: list[Request], row_tokens: int = 512, batch_tokens: int = 8192,
                 pad_id: int = 0, max_length: int | None = None) -> Plan:
    trees = build_trees(requests, max_length)
    groups = [t.group for t in trees]
    rows = pack_rows(trees, row_tokens)
    rows.sort(key=lambda r: -r.length)
    chunks, cur, cur_len = [], [], 0
    for r in rows:
        if cur and (len(cur) + 1) * max(cur_len, r.length) > batch_tokens:
            chunks.append(cur)
            cur, cur_len = [], 0
        cur.append(r)
        cur_len = max(cur_len, r.length)
    if cur:
        chunks.append(cur)
    batches = []
    for rows_b in chunks:
        T, B = max(r.length for r in rows_b), len(rows_b)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        end = (torch.arange(T) + 1).repeat(B, 1)
        real = torch.zeros(B, T, dtype=torch.bool)
        group = torch.full((B, T), -1, dtype=torch.long)
        sel, tgt, own = [], [], []
        for b, r in enumerate(rows_b):
            s = 0
            for ti in r.trees:
                t = trees[ti]
                n = len(t)
                ids[b, s:s + n] = torch.tensor(t.tokens)
                pos[b, s:s + n] = torch.tensor(t.depth)
                end[b, s:s + n] = torch.tensor(_subtree_end(t)) + s
                real[b, s:s + n] = True
                group[b, s:s + n] = ti
                for ri, nodes, toks in t.targets:
                    sel.extend(b * T + s + k for k in nodes)
                    tgt.extend(toks)
                    own.extend([ri] * len(toks))
                s += n
        batches.append(Batch(ids, pos, end, real, group.view(-1), torch.tensor(sel), torch.tensor(tgt),
                             torch.tensor(own)))
    return Plan(batches, groups, len(requests), sum(len(t) for t in trees))


def attention_allow(batch: Batch) -> Tensor:
    """(B, 1, T, T) bool: token i sees token j iff j is i or one of its ancestors in i's tree."""
    T = batch.ids.shape[1]
    ar = torch.arange(T, device=batch.ids.device)
    return ((ar[None, None, :] <= ar[None, :, None]) & (ar[None, :, None] < batch.end[:, None, :]))[:, None]


@dataclass
class ScoreResult:
    logprob: list[float]                 # per request: sum of log p(continuation | context)
    greedy: list[bool]                   # per request: every continuation token is the argmax
    group_active: dict                   # group -> active parameters summed over its processed tokens
    group_tokens: dict                   # group -> number of processed tokens (tree size)
    active: float                        # sum over all processed tokens
    dense: float                         # dense parameters per token
    tokens: int
    by_kind: dict = field(default_factory=dict)      # kind -> active sum
    dense_by_kind: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def apr(self) -> float:
        return self.dense * self.tokens / max(self.active, 1e-9)


def _base_model(model: nn.Module) -> nn.Module:
    return getattr(model, getattr(model, "base_model_prefix", "model"))


@torch.no_grad()
def score_plan(model: nn.Module, plan: Plan, meter: ComputeMeter | None = None, head_chunk: int = 8192,
               progress: bool = False, mask_mode: str = "auto") -> ScoreResult:
    """Score a planned set of requests on `model` (moves the plan to the model's device).

    mask_mode: "bool" (SDPA takes the boolean mask), "float" (additive 0 / -inf, any attention
    implementation), "auto" (bool for SDPA / flex, else float)."""
    t0 = time.time()
    meter = meter or ComputeMeter.for_model(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    plan.to(device)
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    lp_sum = torch.zeros(plan.n_requests, dtype=torch.float64, device=device)
    miss = torch.zeros(plan.n_requests, dtype=torch.long, device=device)
    g_act = torch.zeros(len(plan.groups), dtype=torch.float64, device=device)
    g_tok = torch.zeros(len(plan.groups), dtype=torch.long, device=device)
    by_kind: dict = {}
    it = plan.batches
    if progress:
        try:
            from tqdm import tqdm
            it = tqdm(plan.batches, desc="scoring", unit="batch", mininterval=5)
        except ImportError:
            pass
    for b in it:
        allow = attention_allow(b)
        use_bool = mask_mode == "bool" or (mask_mode == "auto" and impl in ("sdpa", "flex_attention"))
        mask = allow if use_bool else \
            torch.zeros(allow.shape, dtype=dtype, device=device).masked_fill_(~allow, torch.finfo(dtype).min)
        with meter.track(model, b.real):
            h = meter.forward_selected(model, b.ids, mask, b.pos, b.sel)
        for i in range(0, h.shape[0], head_chunk):
            logits = h[i:i + head_chunk] if meter.returns_logits else model.lm_head(h[i:i + head_chunk])
            logp = torch.log_softmax(logits.float(), dim=-1)
            tg = b.target[i:i + head_chunk]
            ow = b.owner[i:i + head_chunk]
            lp_sum.index_add_(0, ow, logp.gather(-1, tg[:, None]).squeeze(-1).double())
            miss.index_add_(0, ow, (logp.argmax(-1) != tg).long())
        pt = meter.per_token()
        keep = b.group >= 0
        g_act.index_add_(0, b.group[keep], pt[keep].double())
        g_tok.index_add_(0, b.group[keep], torch.ones_like(b.group[keep]))
        for k, v in meter.by_kind().items():
            by_kind[k] = by_kind.get(k, 0.0) + v
    g_act_l, g_tok_l = g_act.cpu().tolist(), g_tok.cpu().tolist()
    ga = dict(zip(plan.groups, g_act_l))
    gt = dict(zip(plan.groups, g_tok_l))
    return ScoreResult(lp_sum.cpu().tolist(), (miss == 0).cpu().tolist(), ga, gt, float(sum(g_act_l)),
                       meter.dense, int(sum(g_tok_l)), {k: float(v) for k, v in by_kind.items()},
                       dict(meter.dense_by_kind), time.time() - t0)


def score_requests(model: nn.Module, requests: list[Request], meter: ComputeMeter | None = None,
                   row_tokens: int = 512, batch_tokens: int = 8192, pad_id: int = 0,
                   max_length: int | None = None, progress: bool = False, mask_mode: str = "auto") -> ScoreResult:
    """Log-likelihood of each request's continuation, plus the active parameters spent.

    `meter` counts compute (dense / TEAL / CWIC: eval/compute.py); None picks it from the model.
    `row_tokens`: tokens per packed row; `batch_tokens`: tokens per forward pass.
    """
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    plan = plan_batches(requests, row_tokens, batch_tokens, pad_id, max_length)
    return score_plan(model, plan, meter, progress=progress, mask_mode=mask_mode)


def token_ppl_kl(model: nn.Module, teacher, input_ids: Tensor, attention_mask: Tensor,
                 meter: ComputeMeter | None = None, batch_rows: int = 8) -> dict:
    """Perplexity of `model` and its KL to the teacher on chat rows (next-token, real tokens only).

    `teacher`: a model, or a callable (ids, mask) -> logits (e.g. the same model with TEAL off).
    Returns ppl, nll, kl_fwd = KL(teacher‖model), kl_rev = KL(model‖teacher), kl_sym = their mean
    (the distillation objective of METHOD.md §6), all per predicted token, and the measured APR.
    """
    meter = meter or ComputeMeter.for_model(model)
    device = next(model.parameters()).device
    nll = kl_f = kl_r = 0.0
    n_pred = 0
    active, tokens = 0.0, 0
    for i in range(0, input_ids.shape[0], batch_rows):
        ids = input_ids[i:i + batch_rows].to(device)
        am = attention_mask[i:i + batch_rows].to(device)
        with torch.no_grad():
            with meter.track(model, am.bool()):
                s_logits = model(input_ids=ids, attention_mask=am).logits
            active += float(meter.per_token().double().sum())
            tokens += int(am.sum())
            t_logits = teacher(ids, am) if not isinstance(teacher, nn.Module) else \
                teacher(input_ids=ids, attention_mask=am).logits
            valid = (am[:, 1:] * am[:, :-1]).bool()
            ls = torch.log_softmax(s_logits[:, :-1].float(), -1)[valid]
            lt = torch.log_softmax(t_logits[:, :-1].float(), -1)[valid]
            tgt = ids[:, 1:][valid]
            nll += float(-ls.gather(-1, tgt[:, None]).sum())
            kl_f += float((lt.exp() * (lt - ls)).sum())
            kl_r += float((ls.exp() * (ls - lt)).sum())
            n_pred += int(valid.sum())
    n = max(n_pred, 1)
    return {"ppl": math.exp(nll / n), "nll": nll / n, "kl_fwd": kl_f / n, "kl_rev": kl_r / n,
            "kl_sym": 0.5 * (kl_f + kl_r) / n, "tokens": n_pred,
            "apr": meter.dense * tokens / max(active, 1e-9)}
