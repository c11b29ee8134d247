"""Training callbacks: APR-target warm-up, θ clamp, statistics mode, milestone exports, atomic checkpoints."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .modeling import clamp_thresholds


def apr_target_at(step: int, start: float, final: float, warmup_steps: int) -> float:
    """Linear from `start` to `final + 0.05` over `warmup_steps` (METHOD.md §4), then constant."""
    end = final + 0.05
    frac = min(max(step, 0) / max(warmup_steps, 1), 1.0)
    return start + (end - start) * frac


class CheckpointOnStop(L.Callback):
    """When a run stops before max_steps (the time limit, `trainer.max_minutes`), save last.ckpt so the
    next start resumes at that step instead of at the last periodic checkpoint (Lightning's timer state,
    the time already spent, goes with it)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        if 0 < trainer.global_step < (trainer.max_steps or 0):
            trainer.save_checkpoint(str(self.path))


class AprWarmup(L.Callback):
    """Sets `pl_module.apr_target` before every step from the global step (so it resumes exactly)."""

    def __init__(self, start: float, final: float, warmup_steps: int):
        self.start, self.final, self.warmup_steps = start, final, warmup_steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.apr_target = apr_target_at(trainer.global_step, self.start, self.final, self.warmup_steps)


class ThetaClamp(L.Callback):
    """θ ← max(0, θ), φ ← max(0, φ) after every optimizer step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        clamp_thresholds(pl_module.student)


class StatisticsMode(L.Callback):
    """Running statistics move during training steps only — never during validation or export."""

    def on_train_start(self, trainer, pl_module):
        pl_module.update_stats = True

    def on_validation_start(self, trainer, pl_module):
        pl_module.update_stats = False

    def on_validation_end(self, trainer, pl_module):
        pl_module.update_stats = True


def export_hf(student, tokenizer, folder: Path, meta: dict | None = None) -> Path:
    """Hugging Face export, written beside the target and renamed into place (never half-written)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    was_training = student.training
    student.eval()
    student.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if meta:
        (tmp / "cwic_train_meta.json").write_text(json.dumps(meta, indent=1))
    student.train(was_training)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def milestone_name(m: float) -> str:
    return f"apr_{m:.2f}x"


class MilestoneExport(L.Callback):
    """HF-format student exports each time the APR target passes 2.05×, 3.05×, … (the paper's models)."""

    def __init__(self, run_dir: str | Path, tokenizer, start: float, final: float, warmup_steps: int,
                 latest_file: str | Path | None = None, enabled: bool = True):
        self.run_dir, self.tok = Path(run_dir), tokenizer
        self.start, self.final, self.warmup = start, final, warmup_steps
        self.latest_file = Path(latest_file) if latest_file else None
        self.enabled = enabled
        self.done: list[str] = []

    def milestones(self) -> list[float]:
        top = self.final + 0.05
        return [k + 0.05 for k in range(2, int(top) + 1) if k + 0.05 <= top + 1e-9]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.enabled or trainer.global_rank != 0:
            return
        step = trainer.global_step               # steps done
        now = apr_target_at(step - 1, self.start, self.final, self.warmup)   # the target just trained at
        for m in self.milestones():
            name = milestone_name(m)
            if name not in self.done and now >= m - 1e-9:
                meta = {"step": step, "apr_target": now, **{k: float(v) for k, v in pl_module.last_metrics.items()}}
                path = export_hf(pl_module.student, self.tok, self.run_dir / "hf" / name, meta)
                self.done.append(name)
                self._point_latest(path)

    def _point_latest(self, path: Path):
        if self.latest_file is not None:
            self.latest_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.latest_file.with_suffix(".tmp")
            tmp.write_text(str(Path(path).resolve()) + "\n")
            os.replace(tmp, self.latest_file)

    def export_final(self, pl_module, meta: dict | None = None) -> Path:
        path = export_hf(pl_module.student, self.tok, self.run_dir / "hf" / "final", meta)
        self._point_latest(path)
        return path

    def state_dict(self):
        return {"done": list(self.done)}

    def load_state_dict(self, state_dict):
        self.done = list(state_dict.get("done", []))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file, fsynced, then renamed over the previous one: a kill
    during the write leaves the last good checkpoint in place."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
