"""The training run: epochs of the jitted step, logging, evaluation, checkpoints, resume.

``run_training(cfg, workdir, ...)`` is what ``scripts/train.py`` calls. Everything that can be
wrong with the inputs (config fields, dataset problems, a workdir holding another run) fails
before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nanodet_jax.config import ConfigError
from nanodet_jax.data.check import check_dataset, format_report
from nanodet_jax.data.loader import build_loader
from nanodet_jax.data.readers import build_dataset
from nanodet_jax.data.synthetic import ensure_synthetic_for_path
from nanodet_jax.models import build_model, init_train_variables
from nanodet_jax.objective import make_objective
from nanodet_jax.train.checkpoints import (
    BEST_PTH,
    ResumeError,
    TrainCheckpoints,
    config_differences,
    dataset_fingerprint,
)
from nanodet_jax.train.metrics_log import MetricsLog, plot_curves
from nanodet_jax.train.optim import make_optimizer
from nanodet_jax.train.schedule import make_lr_schedule
from nanodet_jax.train.sharding import check_batch_divides, global_batch, make_mesh, replicate
from nanodet_jax.train.state import TrainState, create_train_state
from nanodet_jax.train.step import jit_train_step, make_train_step
from nanodet_jax.train.variants import StepVariants

CONFIG_FILE = "config.json"
MAX_BAD_STEPS = 5  # non-finite steps in a row that stop a run
# fields a resume may change (device.distributed: per host, and where the run restarts)
RESUME_IGNORED = ("schedule.resume", "save_dir", "device.distributed")
METRICS = ("mAP", "AP50", "AP75", "AP_small", "AP_m", "AP_l")
SAVE_KEY_ALIASES = {"AP_50": "AP50", "AP_75": "AP75"}  # the reference evaluator's names
CHECKPOINT_WRITE_ERRORS = (OSError, ValueError)  # tensorstore reports I/O errors as ValueError


class TrainingStopped(RuntimeError):
    """The run stopped itself (non-finite losses, unreadable data, a failed write); the last
    good checkpoint is kept."""


def check_writable(workdir: Path) -> None:
    """Create ``workdir`` and write a probe file there, or fail with a ConfigError naming it
    (before any compilation or training time is spent)."""
    probe = workdir / ".nanodet_write_test"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable ({e.strerror or e}): choose "
                          "another --workdir or fix its permissions") from e


def _write_failure(e: BaseException) -> str:
    text = str(e)
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os_error_code='28'" in text \
            or "No space left" in text:
        return "the disk is full"
    if getattr(e, "errno", None) == errno.EFBIG or "os_error_code='27'" in text:
        return "a file size limit was hit"
    return getattr(e, "strerror", None) or type(e).__name__


@contextlib.contextmanager
def guarded_write(what: str, workdir: Path, ckpts: TrainCheckpoints | None,
                  errors: tuple[type[BaseException], ...] = (OSError,)) -> Iterator[None]:
    """Turn a failure while writing ``what`` (disk full, quota, permissions changed under the
    run) into :class:`TrainingStopped` naming the last good checkpoint to resume from. A
    checkpoint whose write failed never becomes the latest: orbax renames it into place
    only when complete (tensorstore reports failed writes as ``ValueError``, hence
    ``errors``)."""
    try:
        yield
    except errors as e:
        last = ckpts.latest_step() if ckpts is not None else None
        kept = (f"The last good checkpoint is {ckpts.latest.directory / str(last)}; free "
                f"space and continue with --resume." if last is not None else
                "No checkpoint was written yet.")
        raise TrainingStopped(f"writing {what} in {workdir} failed ({_write_failure(e)}): "
                              f"{e}\nStopping. {kept}") from e


@dataclass
class RunOptions:
    """Run-time choices that are not part of the recipe."""

    resume: bool = False
    force: bool = False
    seed: int = 0
    num_workers: int | None = None  # default: device.workers_per_gpu (capped by CPUs)
    max_steps: int | None = None     # stop after this many steps (smoke tests)
    checkpoint_steps: int | None = None  # also save every N steps (default: epoch ends)
    check_images: int = 64           # images decoded by the start-up dataset check
    progress: bool = True


def save_key(cfg: Any) -> str:
    """The metric that selects the best checkpoint (reference names accepted)."""
    key = str(cfg.evaluator.save_key)
    return SAVE_KEY_ALIASES.get(key, key)


def validate_run_config(cfg: Any) -> None:
    """Inconsistent fields fail here, naming the field, before anything is written."""
    for split in ("train", "val"):
        w, h = cfg.data[split].input_size
        if w % 32 or h % 32:
            raise ConfigError(f"data.{split}.input_size = [{w}, {h}]: width and height must "
                              "be multiples of 32")
    check_batch_divides(cfg)  # the global batch splits evenly over devices and processes
    key = save_key(cfg)
    if key not in METRICS:
        raise ConfigError(f"evaluator.save_key = {cfg.evaluator.save_key!r} is not a metric; "
                          f"use one of {list(METRICS)} (or the reference's AP_50 / AP_75)")
    for key in ("total_epochs", "val_intervals"):
        if int(cfg.schedule[key]) < 1:
            raise ConfigError(f"schedule.{key} must be >= 1, got {cfg.schedule[key]}")


def _prepare_workdir(workdir: Path, cfg_dict: dict, opts: RunOptions) -> dict | None:
    """The saved config of a run to resume (None for a new run); refuses to mix runs."""
    saved_path = workdir / CONFIG_FILE
    if not opts.resume:
        if saved_path.exists() or (workdir / "checkpoints").exists():
            raise ResumeError(f"{workdir} already holds a training run: pass --resume to "
                              "continue it, or choose a new --workdir")
        return None
    if not saved_path.exists():
        raise ResumeError(f"--resume: {workdir} holds no run ({CONFIG_FILE} missing)")
    saved = json.loads(saved_path.read_text())
    diffs = config_differences(saved["config"], cfg_dict, ignore=RESUME_IGNORED)
    if diffs and not opts.force:
        listed = "\n  ".join(diffs)
        raise ResumeError(f"--resume: the config differs from the run in {workdir}:\n  "
                          f"{listed}\npass --force to resume anyway, or use a new --workdir")
    return saved


def _start_variables(cfg: Any, rng: jax.Array) -> dict:
    """Starting weights: ``schedule.load_model`` (non-strict, the reference's fine-tuning
    load) or a fresh init honouring ``model.arch.backbone.pretrain``."""
    path = cfg.schedule.get("load_model")
    if path:
        from nanodet_jax.checkpoint import load_variables

        if not Path(path).exists():
            raise ConfigError(f"schedule.load_model: {path} does not exist")
        return load_variables(path, cfg, strict=False, rng=rng)
    return init_train_variables(cfg, rng)


class Trainer:
    """Holds the pieces of one run; :meth:`fit` runs it."""

    def __init__(self, cfg: Any, workdir: str | Path, opts: RunOptions | None = None):
        self.cfg, self.opts = cfg, opts or RunOptions()
        self.started = time.perf_counter()  # rows carry wall_s: seconds since this point
        self.workdir = Path(workdir)
        self._ckpts: TrainCheckpoints | None = None
        self.is_main = jax.process_index() == 0  # the one process that writes files
        validate_run_config(cfg)
        self.mesh = make_mesh()  # every device of every process; axis "data"
        self.cfg_dict = cfg.to_dict()
        ensure_synthetic_for_path(cfg.data.train.ann_path)
        self.train_set = build_dataset(cfg.data.train, list(cfg.class_names), "data.train")
        self.val_set = build_dataset(cfg.data.val, list(cfg.class_names), "data.val")
        self._check_data()
        self.saved = _prepare_workdir(self.workdir, self.cfg_dict, self.opts)
        if self.saved and self.saved.get("dataset") != dataset_fingerprint(
                self.train_set.records) and not self.opts.force:
            raise ResumeError(f"--resume: the training data changed since the run in "
                              f"{self.workdir} started (pass --force to resume anyway)")
        workers = self.opts.num_workers
        if workers is None:
            import os

            workers = min(int(cfg.device.workers_per_gpu), os.cpu_count() or 1)
        batch = check_batch_divides(cfg)  # global; each process loads its slice
        seed = int(self.saved["seed"]) if self.saved else self.opts.seed
        self.seed = seed
        self.train_loader = build_loader(cfg.data.train, self.train_set.records,
                                         batch_size=batch, seed=seed, train=True,
                                         num_workers=workers)
        self.val_loader = build_loader(cfg.data.val, self.val_set.records, batch_size=batch,
                                       seed=seed, train=False, num_workers=workers,
                                       field="data.val")
        self.steps_per_epoch = len(self.train_loader)
        self.model = build_model(cfg)
        self.optimizer = make_optimizer(cfg, self.steps_per_epoch)
        self.lr = make_lr_schedule(cfg.schedule, self.steps_per_epoch)
        self.step_fn = jit_train_step(make_train_step(make_objective(self.model, cfg),
                                                      self.optimizer, self.lr), self.mesh)
        if self.is_main:  # last: every input error above leaves nothing behind
            check_writable(self.workdir)
        if jax.process_count() > 1:  # every process has checked the workdir before any
            from jax.experimental import multihost_utils  # of them writes into it

            multihost_utils.sync_global_devices("nanodet_jax Trainer ready")

    def _check_data(self) -> None:
        for split in ("train", "val"):
            report = check_dataset(self.cfg, split, max_images=self.opts.check_images)
            if not report.ok:
                raise TrainingStopped(f"the dataset check of data.{split} found errors; fix "
                                      f"them first:\n{format_report(report)}")

    # ------------------------------------------------------------------------------ state

    def initial_state(self) -> tuple[TrainState, dict]:
        key = jax.random.PRNGKey(self.seed)
        init_key, state_key = jax.random.split(key)
        state = create_train_state(_start_variables(self.cfg, init_key), self.optimizer,
                                   state_key)
        state = replicate(state, self.mesh)  # every process computed the same values
        meta = {"epoch": 0, "loader": {"epoch": 0, "batch": 0}, "best": None,
                "best_epoch": None}
        return state, meta

    # ------------------------------------------------------------------------------- run

    def fit(self) -> dict:
        """Train to ``schedule.total_epochs`` (or ``max_steps``); returns the last
        evaluation's metrics (empty when none ran)."""
        cfg = self.cfg
        state, meta = self.initial_state()
        with self._writing("the checkpoint directories", CHECKPOINT_WRITE_ERRORS):
            ckpts = TrainCheckpoints(self.workdir, keep=int(cfg.log.keep_checkpoints))
        if self.saved:
            state, meta = ckpts.restore(state)  # replicated on the mesh, as `state`
            if self.is_main:
                print(f"resumed {self.workdir} at epoch {meta['epoch']}, step "
                      f"{int(state.step)}, batch {meta['loader']['batch']}", flush=True)
        elif self.is_main:
            with self._writing(CONFIG_FILE):
                (self.workdir / CONFIG_FILE).write_text(json.dumps(
                    {"config": self.cfg_dict, "seed": self.seed,
                     "dataset": dataset_fingerprint(self.train_set.records)}, indent=1))
        with self._writing("metrics.jsonl"):
            log = MetricsLog(self.workdir, enabled=self.is_main,
                             resume_step=int(jax.device_get(state.step)) if self.saved else None)
        self._ckpts = ckpts
        # every step variant this run needs, compiled side by side in the background
        self.step_variants = StepVariants(self.step_fn, needed=self._variants_needed(meta))
        last_eval: dict = {}
        try:
            last_eval = self._epochs(state, meta, ckpts, log)
        finally:
            self.step_variants.close()
            ckpts.close()
            log.close()
        return last_eval

    def _variants_needed(self, meta: dict) -> list[bool]:
        """``detach`` of every epoch this run will train, from where it starts to
        ``total_epochs`` or ``--max-steps``."""
        last_epoch = int(self.cfg.schedule.total_epochs) - 1
        if self.opts.max_steps:  # the epoch of the last step this run will do
            last_epoch = min(last_epoch,
                             (int(self.opts.max_steps) - 1) // self.steps_per_epoch)
        detach_epoch = int(self.cfg.model.arch.detach_epoch)
        return [e >= detach_epoch for e in range(int(meta["loader"]["epoch"]), last_epoch + 1)]

    def _epochs(self, state: TrainState, meta: dict, ckpts: TrainCheckpoints,
                log: MetricsLog) -> dict:
        cfg, opts = self.cfg, self.opts
        total = int(cfg.schedule.total_epochs)
        detach_epoch = int(cfg.model.arch.detach_epoch)
        interval = max(1, int(cfg.log.interval))
        val_every = int(cfg.schedule.val_intervals)
        last_eval: dict = {}
        start_batch = int(meta["loader"]["batch"])
        for epoch in range(int(meta["loader"]["epoch"]), total):
            detach = epoch >= detach_epoch
            bar = _progress(self.steps_per_epoch, epoch, total, start_batch,
                            opts.progress and self.is_main)
            t0, seen = time.perf_counter(), 0  # images/s over the latest log window
            for k, batch in enumerate(self.train_loader.epoch(epoch, start_batch),
                                      start=start_batch):
                batch = global_batch({key: batch[key] for key in (
                    "image", "gt_boxes", "gt_labels", "gt_mask")}, self.mesh)
                state, metrics = self.step_variants(state, batch, detach)
                seen += len(batch["image"])  # the global batch
                step = int(jax.device_get(state.step)) if (k + 1) % interval == 0 else None
                if step is not None:
                    row = _fetch(metrics)
                    now = time.perf_counter()
                    ips = seen / max(now - t0, 1e-9)
                    t0, seen = now, 0
                    row.update(epoch=epoch, step=step, images_per_s=round(ips, 2),
                               skipped=int(state.skipped), wall_s=self._wall())
                    with self._writing("metrics.jsonl"):
                        log.write(row, "train")
                    bar.set_postfix_str(_postfix(row))
                    if int(state.bad_streak) >= MAX_BAD_STEPS:
                        raise TrainingStopped(
                            f"{int(state.bad_streak)} steps in a row had a non-finite loss or "
                            f"gradient (updates skipped); stopping. The last good checkpoint "
                            f"is in {ckpts.latest.directory}: lower the learning rate "
                            "(schedule.optimizer.lr) or check the data")
                bar.update(1)
                meta = {**meta, "epoch": epoch, "loader": {"epoch": epoch, "batch": k + 1}}
                if opts.checkpoint_steps or opts.max_steps:  # opt-in host sync per step
                    done = int(jax.device_get(state.step))
                    if opts.checkpoint_steps and done % opts.checkpoint_steps == 0:
                        with self._writing("a checkpoint", CHECKPOINT_WRITE_ERRORS):
                            ckpts.save(state, meta)
                    if opts.max_steps and done >= opts.max_steps:
                        bar.close()
                        with self._writing("a checkpoint", CHECKPOINT_WRITE_ERRORS):
                            ckpts.save(state, meta)
                        return self._finish(state, log, last_eval)
            bar.close()
            start_batch = 0
            meta = {**meta, "epoch": epoch + 1, "loader": {"epoch": epoch + 1, "batch": 0}}
            best = False
            if (epoch + 1) % val_every == 0 or epoch + 1 == total:
                last_eval = self._evaluate(state, epoch, log)
                value = last_eval.get(save_key(cfg))
                if value is not None and (meta["best"] is None or value > meta["best"]):
                    meta = {**meta, "best": value, "best_epoch": epoch}
                    best = True
            with self._writing("a checkpoint", CHECKPOINT_WRITE_ERRORS):
                ckpts.save(state, meta, best=best)
            if best and self.is_main:
                with self._writing(BEST_PTH):
                    self._export_best(state)
        return self._finish(state, log, last_eval)

    def _wall(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def _writing(self, what: str, errors: tuple[type[BaseException], ...] = (OSError,)):
        return guarded_write(what, self.workdir, self._ckpts, errors)

    def _finish(self, state: TrainState, log: MetricsLog, last_eval: dict) -> dict:
        """A closing ``summary`` row: steps, skipped updates and how many variants of the
        step were compiled (2 when the run crossed ``detach_epoch``; more means an
        unexpected recompilation)."""
        compiled = self.step_variants.compiled
        with self._writing("metrics.jsonl"):
            log.write({"step": int(jax.device_get(state.step)),
                       "skipped": int(state.skipped), "compiled_step_variants": compiled},
                      "summary")
        return last_eval

    def _evaluate(self, state: TrainState, epoch: int, log: MetricsLog) -> dict:
        from nanodet_jax.train.evaluate import evaluate, format_per_class_table

        # replicated on the mesh; every process evaluates its slice
        result = evaluate(self.model, state.ema_variables, self.val_loader, self.val_set,
                          self.cfg, mesh=self.mesh)
        metrics = dict(result.metrics)
        step = int(jax.device_get(state.step))
        with self._writing("the evaluation results"):
            log.write({"epoch": epoch, "step": step, **metrics, "wall_s": self._wall()},
                      "val")
            if self.is_main:
                table = format_per_class_table(result)
                (self.workdir / "per_class_ap.txt").write_text(table + "\n")
                plot_curves(log.rows(), self.workdir / "curves.png")
        if self.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float))
            print(f"\n[eval epoch {epoch + 1}] {shown}\n{table}", flush=True)
        return metrics

    def _export_best(self, state: TrainState) -> None:
        """The best EMA weights as a reference ``.pth`` (``{'state_dict': ...}``, reference
        names), when torch is installed."""
        try:
            import torch
        except ImportError:
            print(f"note: torch is not installed, {BEST_PTH} not written (the orbax "
                  "checkpoint in best/ holds the same weights)", file=sys.stderr)
            return
        from nanodet_jax.convert import flax_to_torch

        sd = flax_to_torch(jax.device_get(state.ema_variables),
                           reg_max=int(self.cfg.model.arch.head.reg_max))
        tmp = self.workdir / (BEST_PTH + ".tmp")
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v))
                                   for k, v in sd.items()}}, tmp)
        tmp.replace(self.workdir / BEST_PTH)


def _fetch(metrics: dict) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = bool(v) if v.dtype == bool else float(v)
    return out


def _postfix(row: dict) -> str:
    parts = [f"loss {row['loss']:.3f}"]
    parts += [f"{k.replace('loss_', '')} {row[k]:.3f}" for k in ("loss_qfl", "loss_bbox",
                                                                   "loss_dfl") if k in row]
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"{row['images_per_s']:.1f} img/s")
    if row.get("skipped"):
        parts.append(f"skipped {row['skipped']}")
    return " | ".join(parts)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(steps: int, epoch: int, total: int, start: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{total}",
                dynamic_ncols=True, leave=True, file=sys.stdout)


def run_training(cfg: Any, workdir: str | Path, opts: RunOptions | None = None) -> dict:
    """Build and run a :class:`Trainer`; returns the last evaluation's metrics."""
    return Trainer(cfg, workdir, opts).fit()
