"""Training callbacks: APR-target warm-up, θ clamp, statistics mode, milestone exports, atomic checkpoints."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .files import dumps as json_dumps, replace_folder, save_atomic, write_text_atomic
from .modeling import clamp_thresholds


def apr_target_at(step: int, start: float, final: float, warmup_steps: int) -> float:
    """Linear from `start` to `final + 0.05` over `warmup_steps` (METHOD.md §4), then constant."""
    end = final + 0.05
    frac = min(max(step, 0) / max(warmup_steps, 1), 1.0)
    return start + (end - start) * frac


class SameConfigOnEveryRank(L.Callback):
    """Data-parallel ranks must train one configuration. Lightning starts ranks 1.. as new processes that compose
    the config again from the command line and conf/: an edit of conf/ in between, an environment-dependent value,
    or a Hydra multirun whose child sweep left the parent's order (its ranks pair up by running the same sweep in
    step) would give ranks different settings, and DDP would average their gradients without a word. At setup
    every rank's config hash is gathered; on a difference every rank stops with the same message."""

    def __init__(self, config_text: str):
        import hashlib
        self.digest = int.from_bytes(hashlib.sha256(config_text.encode()).digest()[:7], "little")

    def setup(self, trainer, pl_module, stage):
        if trainer.world_size < 2:
            return
        got = trainer.strategy.all_gather(torch.tensor([self.digest], dtype=torch.int64,
                                                        device=trainer.strategy.root_device))
        got = [int(v) for v in got.reshape(-1).tolist()]
        if len(set(got)) > 1:
            raise RuntimeError(f"the data-parallel ranks composed different configs (hashes by rank: "
                               f"{[f'{v:014x}' for v in got]}): conf/ edited while the ranks started, a value read "
                               f"from each rank's environment, or a sweep whose ranks left step?")


class CheckpointOnStop(L.Callback):
    """Save last.ckpt whenever training ends, so the next start resumes at that very step, not at the last periodic
    checkpoint: at max_steps (which need not be a multiple of ckpt_every), at the time limit (`trainer.max_minutes`),
    on Ctrl-C and on SIGTERM.

    Ctrl-C becomes a stop at the end of the current step (the step is never cut in half; every data-parallel rank
    stops at the same one; no validation pass first); a second Ctrl-C interrupts at once and keeps the last
    checkpoint written. Lightning raises its SIGTERM exception between steps, and the checkpoint is written then.
    `interrupted` is "SIGINT" after a Ctrl-C stop, else None (SIGTERM leaves `trainer.fit` as Lightning's
    SIGTERMException, which `run` catches)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.interrupted: str | None = None
        self._orig = self._handler = None
        self._sigint = False

    def on_fit_start(self, trainer, pl_module):
        if threading.current_thread() is not threading.main_thread():
            return

        def stop_after_this_step(signum, frame):
            self._sigint = True
            signal.signal(signal.SIGINT, self._orig)    # a second Ctrl-C: Python's KeyboardInterrupt, at once
            print("\nCtrl-C: stopping after this step, with a checkpoint (Ctrl-C again: stop now, no checkpoint)",
                  file=sys.stderr, flush=True)
        self._orig, self._handler = signal.getsignal(signal.SIGINT), stop_after_this_step
        signal.signal(signal.SIGINT, stop_after_this_step)

    def release(self):
        """Put back the SIGINT handler from before the run. Call it after `trainer.fit`: Lightning's teardown
        reinstates the handlers it found when the fit began, this one among them."""
        if self._handler is not None and signal.getsignal(signal.SIGINT) is self._handler:
            signal.signal(signal.SIGINT, self._orig)
        self._handler = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # any rank's Ctrl-C stops every rank after this step (one rank stopping a step later would hang the others)
        if trainer.strategy.reduce_boolean_decision(self._sigint, all=False):
            self.interrupted = "SIGINT"
            trainer.should_stop = True
            trainer.limit_val_batches = 0     # Lightning validates whenever should_stop is set: not on a Ctrl-C

    def on_train_end(self, trainer, pl_module):
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
        if trainer.global_step > 0 and saved != trainer.global_step:   # the periodic save may have just written it
            trainer.save_checkpoint(str(self.path))

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0:
            trainer.save_checkpoint(str(self.path))


def checkpoint_step(path) -> int:
    """The optimiser steps a Lightning checkpoint holds (its tensors are mapped, not read)."""
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv (the run being resumed) is continued: Lightning's
    deletes it, and a resumed run's log then starts at the resumed step. With `keep_before` (the resumed checkpoint's
    step), the rows logged at that step or later go first: a run killed after its last checkpoint logged steps the
    resumed run logs again."""

    def __init__(self, log_dir: str, keep_before: int | None = None):
        self.keep_before = keep_before
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self):
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.reader(f))
        header = rows[0] if rows else []
        self.metrics_keys = sorted(header)
        if self.keep_before is None or "step" not in header:
            return
        i = header.index("step")

        def keep(r):
            try:
                return float(r[i]) < self.keep_before
            except (ValueError, IndexError):
                return True
        kept = [header] + [r for r in rows[1:] if keep(r)]
        if len(kept) < len(rows):
            tmp = f"{self.metrics_file_path}.tmp-{os.getpid()}"
            with self._fs.open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)
            os.replace(tmp, self.metrics_file_path)


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` whose metrics.csv survives a resume (rows are appended, after dropping those of steps at or past
    `resume_step`, which the resumed run logs again)."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, keep_before=self._resume_step)
        return self._experiment


class InvocationTimer(Timer):
    """`trainer.max_minutes` counted from this start: Lightning's own timer restores the time already spent from the
    checkpoint, so the same command run again after a time-limited stop would stop at once, every time."""

    def load_state_dict(self, state_dict):
        pass


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


def _export(folder: Path, write, meta: dict | None) -> Path:
    """An export written beside the target by `write(tmp)`, its `cwic_train_meta.json` added, renamed into place
    (never half-written)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if meta:
        (tmp / "cwic_train_meta.json").write_text(json_dumps(meta, indent=1))
    return replace_folder(tmp, folder)


def export_hf(student, tokenizer, folder: Path, meta: dict | None = None) -> Path:
    """Hugging Face export of the student (and tokenizer)."""
    def write(tmp):
        was_training = student.training
        student.eval()
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        student.train(was_training)
    return _export(folder, write, meta)


def link_export(src: Path, folder: Path, meta: dict | None = None) -> Path:
    """A second export of the weights already exported in `src`: its weight files hard-linked (copied where the file
    system cannot link), the other files copied (an edit in place stays in one export), the meta written anew."""
    def write(tmp):
        tmp.mkdir(parents=True)
        for f in Path(src).iterdir():
            if f.is_dir():
                shutil.copytree(f, tmp / f.name)
            elif f.name != "cwic_train_meta.json":
                try:
                    if f.suffix != ".safetensors":
                        raise OSError("not a weight file")
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
    return _export(folder, write, meta)


def milestone_name(m: float) -> str:
    return f"apr_{m:.2f}x"


class MilestoneExport(L.Callback):
    """HF-format student exports at 2.05×, 3.05×, … (the paper's models): after the step at which the APR target's
    schedule reaches each, as the paper's checkpoints at 3k … 15k steps (trained up to one step's increment below)."""

    def __init__(self, run_dir: str | Path, tokenizer, start: float, final: float, warmup_steps: int,
                 latest_file: str | Path | None = None, enabled: bool = True):
        self.run_dir, self.tok = Path(run_dir), tokenizer
        self.start, self.final, self.warmup = start, final, warmup_steps
        self.latest_file = Path(latest_file) if latest_file else None
        self.enabled = enabled
        self.done: list[str] = []
        self.last_export: tuple[int, Path] | None = None    # (global step, folder) of the last milestone export

    def milestones(self) -> list[float]:
        top = self.final + 0.05
        return [k + 0.05 for k in range(2, int(top) + 1) if k + 0.05 <= top + 1e-9]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.enabled or trainer.global_rank != 0:
            return
        step = trainer.global_step               # steps done
        # the schedule's value after `step` steps: the paper's checkpoint "at 3k steps" (after steps 0 … 2999, the
        # last trained at 2.0497) is its 2.05× model, and the one at 15k, the end of a 15k-step warm-up, its 6.05×
        reached = apr_target_at(step, self.start, self.final, self.warmup)
        for m in self.milestones():
            name = milestone_name(m)
            if name not in self.done and reached >= m - 1e-9:
                meta = {"step": step, "apr_target": apr_target_at(step - 1, self.start, self.final, self.warmup),
                        **{k: float(v) for k, v in pl_module.last_metrics.items()}}
                path = export_hf(pl_module.student, self.tok, self.run_dir / "hf" / name, meta)
                self.done.append(name)
                self.last_export = (step, path)
                self._point_latest(path)

    @staticmethod
    def point_latest(latest_file: Path, path: Path):
        write_text_atomic(latest_file, str(Path(path).resolve()) + "\n")

    def _point_latest(self, path: Path):
        if self.latest_file is not None:
            self.point_latest(self.latest_file, path)

    def export_final(self, pl_module, meta: dict | None = None, step: int | None = None) -> Path:
        """`hf/final`. When the last milestone was exported after this very step (the paper recipes end where their
        warm-up does: `apr_6.05x`), the weights are the same: final links that export's files, not a second copy."""
        dest = self.run_dir / "hf" / "final"
        if step is not None and self.last_export is not None and self.last_export[0] == step \
                and self.last_export[1].is_dir():
            path = link_export(self.last_export[1], dest, meta)
        else:
            path = export_hf(pl_module.student, self.tok, dest, meta)
        self._point_latest(path)
        return path

    def state_dict(self):
        return {"done": list(self.done)}

    def load_state_dict(self, state_dict):
        self.done = list(state_dict.get("done", []))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written to a temporary file, fsynced, then renamed over the previous one: a kill
    during the write leaves the last good checkpoint in place (and the temporary file, which the next
    successful write removes)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_atomic(checkpoint, path)
