"""`python train.py [+experiment=...] [overrides]`: distil a CWIC student from its dense teacher.

Run folder: `<out_dir>/<run_name>` (Hydra's output dir). Running the same command again resumes from
`checkpoints/last.ckpt` with θ, statistics, optimizer, schedule and data position intact. At the end a
summary, then one JSON line: apr, apr_target, kl, steps, tokens, wall_s (this start), wall_s_total (every start),
checkpoint (the HF export), ...
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from .files import dumps as json_dumps

log = logging.getLogger("cwic_exp.train")


def _teacher_dtype(cfg, accelerator: str) -> torch.dtype:
    name = cfg.model.teacher_dtype
    if name == "auto":
        return torch.bfloat16 if accelerator in ("gpu", "cuda") else torch.float32
    return getattr(torch, name)


def _accelerator(cfg) -> str:
    acc = cfg.trainer.accelerator
    if acc in ("gpu", "cuda", "auto") and not torch.cuda.is_available():
        if acc == "auto":
            return "cpu"
        from .config import ConfigError
        raise ConfigError(f"trainer.accelerator={acc} (trainer=gpu, trainer=ddp) but no CUDA device is visible; "
                          f"use trainer=cpu")
    return "gpu" if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()) else acc


# settings a resumed run may change (a longer horizon, another time limit, logging); any other difference
# between the command and the run it would resume is refused
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.max_minutes", "trainer.val_every", "trainer.ckpt_every",
                     "trainer.log_every", "trainer.threads", "trainer.devices", "trainer.micro_batch_size",
                     "trainer.precision", "model.attn_implementation", "data.num_workers", "data.cache",
                     "logger.", "resume", "out_dir", "run_name", "export_milestones")


def _flat(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """`key: old → new` for every setting of the old run that differs, except RESUME_MAY_CHANGE (settings the old
    config.yaml does not have, from a later version of the schema, are not compared)."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(a):
        if any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE):
            continue
        if a[k] != b.get(k, "(unset)"):
            out.append(f"{k}: {a[k]} → {b.get(k, '(unset)')}")
    return out


def _rank0() -> bool:
    """Rank 0 of a data-parallel launch (Lightning's DDP starts the script again in every rank), or no launch."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0 and \
        int(os.environ.get("NODE_RANK", 0)) == 0


def _wandb_credentials() -> bool:
    """An API key in the environment or from `wandb login` (~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run(cfg, run_dir: str | Path | None = None, sweep_member: str | None = None) -> dict:
    """Train as configured; returns the final summary (also printed as the last JSON line). sweep_member: the
    overrides naming this job of a Hydra multirun (its wandb run name)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf import OmegaConf

    from .accounting import active_parameters  # noqa: F401  (public API sanity)
    from .callbacks import (AprWarmup, AtomicCheckpointIO, CheckpointOnStop, InvocationTimer, MilestoneExport,
                            ResumableCSVLogger, SameConfigOnEveryRank, StatisticsMode, ThetaClamp, apr_target_at,
                            checkpoint_step)
    from .config import ConfigError, check_model_loadable, validate
    from .data import ChatDataModule
    from .files import write_text_atomic
    from .lit import CwicDistillModule
    from .modeling import to_cwic
    from .teacher import load_teacher

    validate(cfg)                                  # one-line errors before anything heavy
    # Lightning warnings that do not apply to this loop: its checkpoints are meant to hold the state after the step
    # (manual optimisation), the step sampler resumes mid-epoch exactly (its state is in the datamodule's), and the
    # frozen teacher is in eval mode on purpose
    for msg in (r"Using ModelCheckpoint with manual optimization", r"You're resuming from a checkpoint that ended",
                r"Found \d+ module\(s\) in eval mode"):
        warnings.filterwarnings("ignore", message=msg)
    t_start = time.time()
    run_dir = Path(run_dir or Path(cfg.out_dir) / cfg.run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    acc = _accelerator(cfg)
    try:                                           # resolved: readable without Hydra's resolvers
        saved = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:                              # noqa: BLE001  (a resolver only Hydra provides)
        saved = OmegaConf.to_yaml(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    resuming = bool(cfg.resume and last.exists())
    resume_step = None
    if resuming:
        try:
            resume_step = checkpoint_step(last)
        except Exception as e:                     # noqa: BLE001  (torch's errors for a cut or foreign file vary)
            why = str(e).splitlines()[0][:100] if str(e) else ""
            raise ConfigError(f"{last} cannot be read ({type(e).__name__}: {why}): delete it to start the run "
                              f"over, or pass resume=false") from None
    if resuming and (run_dir / "config.yaml").exists():
        import yaml
        changed = config_changes(yaml.safe_load((run_dir / "config.yaml").read_text()), yaml.safe_load(saved))
        if changed:   # the same folder, another experiment: resuming would mix the two silently
            raise ConfigError(f"{run_dir} holds a run with other settings ({'; '.join(changed[:3])}"
                              f"{' …' if len(changed) > 3 else ''}): give this one another run_name, or "
                              f"resume=false to start that run over")
    if _rank0():   # atomically: the other ranks of a launch read it for the same check
        write_text_atomic(run_dir / "config.yaml", saved)
    latest, summary_file = Path(cfg.out_dir) / "LATEST", run_dir / "summary.json"
    if not resuming and _rank0():
        # a fresh start in a used folder: the old run's log and checkpoints go, not mixed in; with resume=false (a
        # run started over on purpose) its exports and summary too, which would pass for the new run's. Without
        # a checkpoint to resume (deleted to free disk, say) a finished run's exports stay.
        old = [p.name for p in (run_dir / "checkpoints", run_dir / "hf", summary_file) if p.exists()]
        (run_dir / "logs" / "metrics.csv").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "wandb_id").unlink(missing_ok=True)
        if not cfg.resume:
            hf = (run_dir / "hf").resolve()
            if latest.exists() and hf in Path(latest.read_text().strip()).resolve().parents:
                latest.unlink()
            shutil.rmtree(run_dir / "hf", ignore_errors=True)
            summary_file.unlink(missing_ok=True)
            if old:
                print(f"resume=false: removed the earlier run's {', '.join(old)} in {run_dir}", file=sys.stderr)
    if resume_step is not None and resume_step >= cfg.trainer.max_steps and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary.get("finished") and summary.get("steps") == resume_step:
            # the same command after the run finished: its records stand (re-measuring would overwrite the
            # training figures with NaN: no step runs)
            print(f"{run_dir} finished already at step {resume_step} (raise trainer.max_steps to go on)",
                  file=sys.stderr)
            if summary.get("checkpoint") and Path(summary["checkpoint"]).exists() and _rank0():
                MilestoneExport.point_latest(latest, summary["checkpoint"])
            print(json_dumps(summary), flush=True)
            return summary

    # ---------------------------------------------------------------- models
    check_model_loadable(cfg.model.name)          # a hub id that cannot load here: one line, not 30 s of retries
    teacher, tok = load_teacher(cfg.model.name, dtype=torch.float32)
    if cfg.model.attn_implementation:
        teacher.config._attn_implementation = cfg.model.attn_implementation
    student = copy.deepcopy(teacher)
    c = cfg.cwic
    to_cwic(student, stripe_size=c.stripe_size, head_stripe_size=c.head_stripe_size, alpha_eps=c.alpha_eps,
            beta_dist=c.beta_dist, ste=c.ste, sparsify_head=c.sparsify_head,
            head_max_reduction=c.head_max_reduction)
    # every export names its teacher (config.json): evaluation measures KL against it, not against a default
    student.config.cwic_teacher = cfg.model.name
    student.train().requires_grad_(True)
    teacher.to(_teacher_dtype(cfg, acc))

    # ---------------------------------------------------------------- data
    d, t = cfg.data, cfg.trainer
    dm = ChatDataModule(tok, source=d.source, seq_len=d.seq_len, max_len=d.max_len,
                        max_conversations=d.max_conversations, val_fraction=d.val_fraction,
                        val_rows=d.val_rows, rows_per_step=t.sequences_per_step, num_steps=t.max_steps,
                        seed=cfg.seed, path=d.path, num_workers=d.num_workers, cache=d.cache)
    dm.setup("fit")
    log.info("data: %s", dm.describe())

    module = CwicDistillModule(student, teacher, OmegaConf.to_container(cfg, resolve=True))
    module.wall_t0 = t_start
    exporter = MilestoneExport(run_dir, tok, c.apr_start, c.apr_final, c.apr_warmup_steps, latest,
                               enabled=cfg.export_milestones)
    ckpt_dir = run_dir / "checkpoints"
    stopper = CheckpointOnStop(last)
    callbacks = [SameConfigOnEveryRank(saved), AprWarmup(c.apr_start, c.apr_final, c.apr_warmup_steps), ThetaClamp(),
                 StatisticsMode(),
                 exporter,
                 ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=t.ckpt_every, enable_version_counter=False),
                 stopper, TQDMProgressBar(refresh_rate=1),
                 InvocationTimer(duration={"minutes": float(t.max_minutes)} if t.max_minutes else None,
                                 interval="step")]
    loggers = [ResumableCSVLogger(str(run_dir), name="logs", version="", resume_step=resume_step)] \
        if cfg.logger.csv else []
    if cfg.logger.wandb:
        import hashlib
        from lightning.pytorch.loggers import WandbLogger
        offline = not _wandb_credentials()
        if offline and _rank0():
            print("wandb: no API key and no `wandb login` found: logging offline (`wandb sync` uploads it later)",
                  file=sys.stderr)
        # one wandb run per run (its id kept in the folder), continued on resume; a sweep's members grouped and
        # named by their overrides
        id_file = run_dir / "wandb_id"
        if not id_file.exists() and _rank0():
            write_text_atomic(id_file, hashlib.sha1(f"{run_dir.resolve()} {time.time()}".encode()).hexdigest()[:16])
        run_id = id_file.read_text().strip() if id_file.exists() else None
        loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity,
                                   name=f"{cfg.run_name}:{sweep_member}" if sweep_member else cfg.run_name,
                                   group=cfg.run_name if sweep_member else None, id=run_id, resume="allow",
                                   save_dir=str(run_dir), offline=offline, tags=list(cfg.logger.tags),
                                   config=OmegaConf.to_container(cfg, resolve=True)))
    trainer = L.Trainer(accelerator=acc, devices=t.devices, strategy=t.strategy, precision=t.precision,
                        max_steps=t.max_steps, max_epochs=-1, log_every_n_steps=t.log_every,
                        val_check_interval=t.val_every, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, callbacks=callbacks, logger=loggers or False,
                        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False,
                        enable_model_summary=False, default_root_dir=str(run_dir))
    ckpt_path = str(last) if resuming else None
    if ckpt_path:
        print(f"resuming from {ckpt_path}", file=sys.stderr)
    def stopped(by: str):
        """Ctrl-C or SIGTERM: the step finished and last.ckpt holds it; no validation, no export. SIGTERM (a
        scheduler's preemption) then exits with 143, so that the stop does not pass for a success."""
        steps = trainer.global_step
        summary = {"steps": steps, "tokens": int(module.tokens_seen), "interrupted": by, "finished": False,
                   "checkpoint": str(last) if last.exists() else None, "run_dir": str(run_dir),
                   "wall_s": round(time.time() - t_start, 1), "wall_s_total": round(module.wall_s_total(), 1)}
        _finish_wandb(loggers)
        if trainer.global_rank == 0:
            write_text_atomic(summary_file, json_dumps(summary, indent=1))
            print(f"\ninterrupted ({by}) at step {steps}: saved {last}; the same command resumes there",
                  file=sys.stderr)
            print(json_dumps(summary), flush=True)
        if by == "SIGTERM":
            raise SystemExit(128 + signal.SIGTERM)
        return summary

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except SIGTERMException:
        return stopped("SIGTERM")
    finally:
        stopper.release()
    steps = trainer.global_step
    if stopper.interrupted:
        return stopped(stopper.interrupted)

    # ---------------------------------------------------------------- final measurement + export
    if getattr(module, "val_metrics_step", None) != steps:   # not already validated at this very step
        try:
            trainer.validate(module, datamodule=dm, verbose=False)
        except SIGTERMException:
            return stopped("SIGTERM")
    vm = getattr(module, "val_metrics", {})
    target = apr_target_at(max(steps - 1, 0), c.apr_start, c.apr_final, c.apr_warmup_steps)
    summary = {"apr": round(vm.get("val/apr", float("nan")), 4), "apr_target": round(target, 4),
               "kl": round(vm.get("val/kl", float("nan")), 5),
               "train_apr": round(module.last_metrics.get("train/apr", float("nan")), 4),
               "train_kl": round(module.last_metrics.get("train/kl", float("nan")), 5),
               "steps": steps, "tokens": int(module.tokens_seen), "wall_s": round(time.time() - t_start, 1),
               "wall_s_total": round(module.wall_s_total(), 1),
               "max_steps": int(t.max_steps), "finished": steps >= t.max_steps, "run_dir": str(run_dir)}
    if trainer.global_rank == 0:
        path = exporter.export_final(module, {**summary, "note": "APR counts q,k,v,o,gate,up+down,head; "
                                                                  "not embeddings or attention scores"}, step=steps)
        summary["checkpoint"] = str(path) if path else None
        write_text_atomic(summary_file, json_dumps(summary, indent=1))
    summary.setdefault("checkpoint", None)
    _finish_wandb(loggers)
    if trainer.global_rank == 0:
        print("\n" + "=" * 60)
        print(f"CWIC distillation: {cfg.model.name} → {run_dir}")
        print(f"  steps {steps}, tokens {summary['tokens']:,}, wall {summary['wall_s']} s (this start), "
              f"{summary['wall_s_total']} s (the whole run)")
        print(f"  APR (validation) {summary['apr']}×  target {summary['apr_target']}×   "
              f"(counts q,k,v,o,gate,up+down,head; not embeddings/attention scores)")
        print(f"  KL to teacher ½(FKL+RKL) per token: {summary['kl']}")
        print(f"  HF export: {summary['checkpoint']}")
        if not summary["finished"]:   # trainer.max_minutes: a summary that looked like the end of the run
            print(f"  NOT FINISHED: stopped by trainer.max_minutes at step {steps} of {t.max_steps}; the same "
                  f"command continues")
        print("=" * 60)
        print(json_dumps(summary), flush=True)
    return summary


def earlier_sweep_folder(sweep_dir, override_dirname: str, out) -> Path | None:
    """The folder a sweep member used before 2026-12-04, when its overrides were joined raw (a path among them made
    nested folders), if it holds a run and the member's folder does not yet: None otherwise."""
    if not override_dirname:
        return None
    raw = Path(sweep_dir) / override_dirname
    if raw.resolve() == Path(out).resolve() or not (raw / "checkpoints").is_dir():
        return None
    return None if (Path(out) / "checkpoints").exists() else raw


def _finish_wandb(loggers) -> None:
    """Close the wandb run (flushes it; offline, the folder `wandb sync` uploads). `wandb.finish()` with no argument:
    its keyword arguments differ between versions (0.31 has no `quiet`)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb
        wandb.finish()


def main_from_hydra(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from .config import ConfigError
    logging.getLogger("cwic_exp").setLevel(logging.INFO)
    # Hydra's root handlers (console + train.log) take Lightning's messages too: Lightning's own console handler
    # printed each of them a second time
    import lightning.pytorch  # noqa: F401  (first: its import adds the handlers)
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
                lg.removeHandler(h)
            lg.propagate = True
        # and an advertisement
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
            lambda r: not str(r.msg).startswith("💡 Tip"))
    member = earlier = None
    try:
        hc = HydraConfig.get()
        out = hc.runtime.output_dir
        if str(hc.mode) == "RunMode.MULTIRUN":
            member = hc.job.override_dirname or f"job{hc.job.num}"
            earlier = earlier_sweep_folder(hc.sweep.dir, hc.job.override_dirname, out)
    except ValueError:
        out = None
    try:
        if member and earlier:
            raise ConfigError(f"this sweep member's earlier run is in {earlier}, named before a sweep folder became "
                              f"one folder name: move it to {out} to resume it, or remove it to start over")
        summary = run(cfg, out, sweep_member=member)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary.get("interrupted") == "SIGINT":   # as SIGTERM's 143: `train && eval` must not take it for done
        sys.exit(128 + signal.SIGINT)
