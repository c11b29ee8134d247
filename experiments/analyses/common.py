"""Shared helpers of the analysis scripts: checkpoints, held-out chat rows, mask recording, output files.

Every script writes under runs/analyses/ (or --out): a PNG and the data behind it. The committed results under
experiments/results/ were written with --out naming their folder; the default stays out of the tracked tree.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from experiments.cli import at_least  # noqa: E402

positive_int = at_least(1)   # a count (a negative --limit sliced off the last question instead)
OUT = ROOT / "runs" / "analyses"
NOTE = "active parameters count q,k,v,o,gate,up+down,head; not embeddings or attention scores"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_common_args(p, checkpoint: bool = True):
    if checkpoint:
        p.add_argument("--checkpoint", default=None, help="CWIC checkpoint folder (default: runs/LATEST)")
    p.add_argument("--out", default=str(OUT), help=f"output folder (default: {OUT.relative_to(ROOT)})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=at_least(0), default=None,
                   help="torch CPU threads (the CPU may be shared; 0: torch's default)")
    return p


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "checkpoint", "x") is None:
        from cwic_exp.chat import default_model
        args.checkpoint = default_model(option="--checkpoint PATH")
    if getattr(args, "checkpoint", None) and not getattr(args, "transcript", None):
        from cwic_exp.teacher import check_checkpoint
        try:
            check_checkpoint(args.checkpoint, "--checkpoint")
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return Path(args.out)


def load_cwic(path, device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import cwic_exp
    model = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    if not cwic_exp.is_cwic(model):
        raise SystemExit(f"{path} is not a CWIC checkpoint")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def run_dir(ckpt) -> Path | None:
    """runs/<run> for a training export runs/<run>/hf/<name>, else None."""
    p = Path(ckpt).resolve()
    if p.parent.name == "hf" and (p.parent.parent / "config.yaml").exists():
        return p.parent.parent
    return None


def run_config(ckpt) -> dict | None:
    rd = run_dir(ckpt)
    if rd is None:
        return None
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(rd / "config.yaml")
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:   # noqa: BLE001  (runs saved before configs were resolved: ${hydra:...} left in)
        return OmegaConf.to_container(cfg, resolve=False)


DEFAULT_DATA = dict(source="sharegpt", seq_len=256, max_len=None, max_conversations=None,
                    val_fraction=0.02, seed=0)   # make_calibrated's statistics rows (the CPU training data)
HELDOUT_SEQ_LEN = 512


def heldout_rows(tok, rows: int = 8, seq_len: int = HELDOUT_SEQ_LEN):
    """Rows of the held-out chat set, the same for every checkpoint: the last HELDOUT_TAIL ShareGPT conversations less
    those with a copy earlier in the file (`cwic_exp.data.heldout_conversations`: no training split holds them,
    not even one made before 2026-12-04), those of ≤ seq_len tokens packed into rows of seq_len,
    and `rows` of those rows drawn at random (seed 0; packing puts the longest conversations first). Not a run's own
    validation split: that one can only be rebuilt from the run's data settings, which an export brought back
    from another machine (or trained on packed data) does not carry, and rebuilt with other settings it would be
    training data."""
    from cwic_exp.data import HELDOUT_TAIL, heldout_conversations, pack_sequences, pad_id, random_rows, render_ids
    convs = heldout_conversations(None, HELDOUT_TAIL)
    seqs = [s for s in (render_ids(tok, m) for m in convs) if s and len(s) <= seq_len]
    if not seqs:
        raise SystemExit(f"none of the {len(convs)} held-out conversations fits {seq_len} tokens")
    data = pack_sequences(seqs, seq_len, pad_id(tok))
    idx = random_rows(len(data), rows, 0)
    if len(idx) < rows:
        log(f"held-out rows: {len(idx)} of the {rows} asked for ({len(seqs)} conversations of ≤ {seq_len} tokens)")
    kw = {"source": "sharegpt held-out tail", "tail": HELDOUT_TAIL, "conversations": len(convs),
          "kept": len(seqs), "seq_len": seq_len, "rows": int(len(idx)), "packed_rows": len(data)}
    return data.subset(idx), kw


def packed_batches(data, batch_size: int, device="cpu"):
    """(model kwargs, token mask) per batch of packed rows."""
    from cwic_exp.data import model_inputs
    for i in range(0, len(data), batch_size):
        b = {"input_ids": data.input_ids[i:i + batch_size], "segment_ids": data.segment_ids[i:i + batch_size],
             "position_ids": data.position_ids[i:i + batch_size]}
        kw = {k: v.to(device) for k, v in model_inputs(b).items()}
        yield kw, (b["segment_ids"] > 0).to(device)


class MaskRecorder:
    """Counts, per CWIC matrix, how often each (stripe, input) of the mask G is on (and, per FFN, each
    unit of M), over the real tokens of the forwards run inside the block.

    The masks are recomputed from each module's own inputs and public thresholds with the layer's rule
    G = H(|x - x̄| - θσ); `check()` compares the resulting counts with the layers' `ap_tokens`."""

    def __init__(self, model):
        import cwic_exp
        self.model = model
        self.mods = list(cwic_exp.iter_cwic_modules(model))
        self.counts: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self.ap_sum: dict[int, float] = {}
        self.mask: torch.Tensor | None = None
        self._h = []

    def _lin_hook(self, idx):
        def hook(mod, args, out):
            x = args[0].reshape(-1, mod.in_features)
            if self.mask is not None:
                x = x[self.mask]
            mean, _ = mod.running_stats()
            g = (x.float() - mean).abs().unsqueeze(1) >= mod.thresholds().unsqueeze(0)   # (N, k, n)
            self.counts[idx] = self.counts.get(idx, 0) + g.sum(0).double()
        return hook

    def _ffn_hook(self, idx, mlp):
        def hook(gate, args, out):
            a = mlp.act_fn(out).reshape(-1, mlp.intermediate_size)
            if self.mask is not None:
                a = a[self.mask]
            m = a.float().abs() >= mlp.unit_thresholds()
            self.counts[idx] = self.counts.get(idx, 0) + m.sum(0).double()
        return hook

    def __enter__(self):
        from cwic_exp import CwicLinear
        for i, m in enumerate(self.mods):
            if isinstance(m, CwicLinear):
                self._h.append(m.register_forward_hook(self._lin_hook(i)))
            else:
                self._h.append(m.gate_proj.register_forward_hook(self._ffn_hook(i, m)))
        return self

    def __exit__(self, *exc):
        for h in self._h:
            h.remove()
        self._h = []

    @torch.no_grad()
    def run(self, kw: dict, token_mask: torch.Tensor):
        import cwic_exp
        self.mask = token_mask.reshape(-1).bool()
        with cwic_exp.cwic_context(self.model, token_mask=token_mask, track_ap=True):
            self.model(**kw)
        self.tokens += int(self.mask.sum())
        for i, m in enumerate(self.mods):
            self.ap_sum[i] = self.ap_sum.get(i, 0.0) + float(m.ap_tokens[self.mask].sum())

    def freq(self, i: int) -> torch.Tensor:
        """(k, n) for a CwicLinear, (d_ff,) for an FFN: the fraction of tokens on which it is active."""
        return (self.counts[i] / max(self.tokens, 1)).float()

    def density(self, i: int) -> float:
        """Active fraction of the module's parameters, from the recorded masks."""
        from cwic_exp import CwicLinear
        m = self.mods[i]
        f = self.freq(i)
        if isinstance(m, CwicLinear):
            rows = torch.full((m.num_stripes,), float(m.stripe_size))
            rows[-1] = m.out_features - m.stripe_size * (m.num_stripes - 1)
            return float((f * rows[:, None]).sum() / m.out_features / m.in_features)
        return float(f.mean())

    def check(self, rtol: float = 1e-4) -> float:
        """Largest relative gap between the recorded masks' counts and the layers' own counts."""
        worst = 0.0
        for i, m in enumerate(self.mods):
            ours = self.density(i) * m.dense_params * self.tokens
            theirs = self.ap_sum[i]
            worst = max(worst, abs(ours - theirs) / max(theirs, 1.0))
        if worst > rtol:
            raise AssertionError(f"recorded masks disagree with the layers' counts by {worst:.2e}")
        return worst


def dumps(obj, **kw) -> str:
    """Strict JSON (a NaN figure is null: strict parsers refuse the token NaN); numpy and torch scalars as floats."""
    from cwic_exp.files import dumps as strict
    return strict(obj, **{"default": float, **kw})


def save_json(path: Path, obj) -> None:
    path.write_text(dumps(obj, indent=1))


def describe(ckpt) -> str:
    meta = Path(ckpt) / "cwic_train_meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if "apr" in m:
            return f"{Path(ckpt).name} (training export, val APR {m['apr']:.2f}×)"
        if "train/apr" in m:
            return f"{Path(ckpt).name} (training export, train APR {m['train/apr']:.2f}×)"
        return f"{Path(ckpt).name} (training export)"
    cal = Path(ckpt) / "cwic_calibration.json"
    if cal.exists():
        m = json.loads(cal.read_text())
        return f"{Path(ckpt).name} (calibrated stand-in, not trained: APR {m['apr']:.2f}×)"
    return str(ckpt)


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as p
    return p


def log(*a):
    print(*a, file=sys.stderr, flush=True)
