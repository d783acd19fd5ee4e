"""The reference's (PyTorch NanoDet-Plus) training step, timed on the train suite's batches.

Used by ``benchmarks/train.py`` for ``--reference PATH``, where PATH is a checkout of
RangiLyu/nanodet (the directory that holds the ``nanodet/`` package) and torch is installed.
The model is built by the reference's own code from its own YAML
(``PATH/config/nanodet-plus-<case>.yml``: ``nanodet.util.cfg`` + ``load_config``, then
``nanodet.model.arch.build_model``), with ``num_classes`` set to the case's and the ImageNet
backbone download turned off. One step is what the reference's Lightning task does per batch:
``model.forward_train(gt_meta)`` (main head and AGM aux head, assigner, both losses),
``loss.backward()``, ``clip_grad_norm_(params, grad_clip)``, the optimizer step (its
``nanodet.optim.build_optimizer`` where the checkout has it, else ``torch.optim.<name>``),
``zero_grad`` and the EMA update (``build_weight_averager(...).update``). Before/after detach
is ``model.set_epoch(0)`` / ``model.set_epoch(model.detach_epoch)``.

Each case runs in a fresh subprocess (this file run as a script, :class:`ReferenceStepper`)
with ``torch.set_num_threads(os.cpu_count())``: its peak RSS is its own and torch's thread
pool does not share a process with XLA's. The subprocess stays ready between steps, so the
train suite has them take turns with ours (three of ours, three of the reference's, ...):
both sides see the same moments of a machine whose speed drifts. :func:`check_reference` imports the
reference the same way and fails, naming PATH and what is missing, before any timing starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

YAML_TEMPLATE = "config/nanodet-plus-{case}.yml"
CASES = ("m_320", "m_416", "m-1.5x_416")  # the reference's config names


class ReferenceUnavailable(RuntimeError):
    """``--reference PATH`` cannot be used: PATH, the reference package or torch is missing
    or unusable, or the reference's step failed (the message names PATH and the cause)."""


def reference_yaml(path: str | os.PathLike, case: str) -> Path:
    """The reference's own config for ``case`` (e.g. ``m_320``, ``m-1.5x_416``), inside the
    checkout ``path``."""
    return Path(path) / YAML_TEMPLATE.format(case=case)


def to_reference_inputs(batch: Mapping[str, np.ndarray]
                        ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Our padded batch as the reference's ``gt_meta`` parts.

    ``batch``: ``image`` (B, H, W, 3) float32, ``gt_boxes`` (B, G, 4) xyxy, ``gt_labels``
    (B, G), ``gt_mask`` (B, G) bool (see ``benchmarks.train.random_batch``).
    Returns ``img`` (B, 3, H, W) float32 (the same values, NCHW), and per image ``gt_bboxes``
    (n_i, 4) float32 and ``gt_labels`` (n_i,) int64 with only the unmasked boxes, in order:
    the numpy arrays ``NanoDetPlusHead.loss`` reads from ``gt_meta``.
    """
    img = np.ascontiguousarray(np.asarray(batch["image"], np.float32).transpose(0, 3, 1, 2))
    mask = np.asarray(batch["gt_mask"], bool)
    boxes = np.asarray(batch["gt_boxes"], np.float32)
    labels = np.asarray(batch["gt_labels"])
    gt_bboxes = [np.ascontiguousarray(b[m]) for b, m in zip(boxes, mask)]
    gt_labels = [lab[m].astype(np.int64) for lab, m in zip(labels, mask)]
    return img, gt_bboxes, gt_labels


def _run_worker(path: str | os.PathLike, args: Sequence[str], what: str) -> dict:
    """Run this file as a script (``args``) and return the JSON it writes to ``--out``."""
    with tempfile.TemporaryDirectory(prefix="nanodet_ref_") as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args,
                               "--reference", str(path), "--out", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ReferenceUnavailable(f"--reference {path}: {what} failed "
                                       f"(exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())


def check_reference(path: str | os.PathLike, cases: Sequence[str] = CASES) -> dict:
    """Check that ``path`` is a usable reference checkout with torch, before any timing.

    Raises :class:`ReferenceUnavailable` naming ``path`` and what is missing: the directory,
    ``nanodet/__init__.py``, a ``config/nanodet-plus-<case>.yml``, torch, or an import of
    ``nanodet.util`` / ``nanodet.model.arch`` (and its dependencies) from ``path``.
    Returns ``{"path", "torch", "nanodet_package"}``.
    """
    p = Path(path).expanduser()
    hint = "expected a checkout of RangiLyu/nanodet: the directory that holds nanodet/"
    if not p.is_dir():
        raise ReferenceUnavailable(f"--reference {path}: no such directory ({hint})")
    if not (p / "nanodet" / "__init__.py").is_file():
        raise ReferenceUnavailable(f"--reference {path}: no nanodet/__init__.py there ({hint})")
    missing = [YAML_TEMPLATE.format(case=c) for c in cases if not reference_yaml(p, c).is_file()]
    if missing:
        raise ReferenceUnavailable(f"--reference {path}: missing the reference configs "
                                   f"{', '.join(missing)}")
    if importlib.util.find_spec("torch") is None:
        raise ReferenceUnavailable(f"--reference {path}: torch is not installed "
                                   "(pip install torch, or the nanodet_jax[torch] extra)")
    info = _run_worker(p.resolve(), ["check", *(f"--case={c}" for c in cases)],
                       "importing the reference package")
    return {"path": str(p.resolve()), **info}


class ReferenceStepper:
    """The reference's train step for ``case`` (``m_320``...) on ``batch``, kept ready in a
    subprocess so that its steps can take turns with ours (a few steps each): this machine
    kind's speed drifts by tens of percent within minutes, so timing one side after the
    other compares two different machines.

    ``batch`` is our padded numpy batch (see :func:`to_reference_inputs`). Starting it builds
    the reference model, optimizer and EMA and runs one untimed first step;
    :meth:`step` runs one more and returns its seconds; :meth:`close` ends the subprocess and
    returns ``{"first_step_s", "peak_rss_mb", "loss_finite", "epoch", "torch_threads",
    "optimizer", "grad_clip", "ema"}``. Use it as a context manager.
    """

    def __init__(self, path: str | os.PathLike, case: str, num_classes: int,
                 batch: Mapping[str, np.ndarray], detach: bool):
        self.path = Path(path).expanduser().resolve()
        self.what = f"the reference step for {case} (batch {np.shape(batch['image'])[0]})"
        self._tmp = tempfile.TemporaryDirectory(prefix="nanodet_ref_in_")
        inputs = Path(self._tmp.name) / "batch.npz"
        np.savez(inputs, **{k: np.asarray(batch[k]) for k in
                            ("image", "gt_boxes", "gt_labels", "gt_mask")})
        self._log = open(Path(self._tmp.name) / "stderr.txt", "w+")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", f"--case={case}",
             f"--num-classes={num_classes}", f"--inputs={inputs}", "--reference",
             str(self.path)]
            + (["--detach"] if detach else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self._reply("ready")

    def _reply(self, expect: str) -> Any:
        """The next reply's ``expect`` field; a missing or malformed reply (the subprocess
        failed) kills it and raises :class:`ReferenceUnavailable` with its stderr's tail."""
        line = self._proc.stdout.readline()
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict) or expect not in msg:
            self._proc.kill()
            self._proc.wait()
            self._log.seek(0)
            tail = "\n".join(self._log.read().strip().splitlines()[-15:])
            self._cleanup()
            raise ReferenceUnavailable(f"--reference {self.path}: {self.what} failed "
                                       f"(exit {self._proc.returncode}):\n{tail}")
        return msg[expect]

    def _send(self, command: str) -> None:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()

    def step(self) -> float:
        """Run one reference step; its wall time in seconds (measured in the subprocess)."""
        self._send("step")
        return float(self._reply("step_s"))

    def close(self) -> dict:
        self._send("quit")
        info = self._reply("summary")
        self._proc.wait()
        self._cleanup()
        return info

    def _cleanup(self) -> None:
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> ReferenceStepper:
        return self

    def __exit__(self, *exc) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
            self._cleanup()


# ---- the subprocess side: imports torch and the reference ------------------------------------

def _import_reference(path: Path):
    """Import the reference package from ``path`` (put first on ``sys.path``, once).

    Returns ``(cfg, load_config, build_model, package_dir)`` of the reference.
    """
    if sys.path[:1] != [str(path)]:
        sys.path.insert(0, str(path))
    import nanodet
    from nanodet.model.arch import build_model
    from nanodet.util import cfg, load_config

    where = Path(nanodet.__file__).resolve().parent
    if where != (path / "nanodet").resolve():
        raise ImportError(f"`import nanodet` found {where}, not the checkout {path}")
    return cfg, load_config, build_model, where


def _reference_config(path: Path, case: str, num_classes: int | None = None):
    """The reference's frozen config for ``case`` (``num_classes`` set in both heads)."""
    base_cfg, load_config, _, _ = _import_reference(path)
    c = base_cfg.clone()
    load_config(c, str(reference_yaml(path, case)))
    if c.model.arch.name != "NanoDetPlus":
        raise ValueError(f"{reference_yaml(path, case)}: arch {c.model.arch.name!r}, "
                         "expected NanoDetPlus")
    c.defrost()
    c.model.arch.backbone.pretrain = False  # no ImageNet download; timing only
    if num_classes is not None:
        c.model.arch.head.num_classes = num_classes
        c.model.arch.aux_head.num_classes = num_classes
    c.freeze()
    return c


def _worker_check(path: Path, cases: Sequence[str]) -> dict:
    import torch

    *_, where = _import_reference(path)
    for c in cases:
        _reference_config(path, c)
    return {"torch": torch.__version__, "nanodet_package": str(where)}


def _worker_serve(path: Path, case: str, num_classes: int, inputs: Path, detach: bool) -> None:
    """Build the reference step, run it once, then one step per ``step`` line on stdin
    (one JSON line per reply on stdout) until ``quit`` (see :class:`ReferenceStepper`)."""
    # the protocol goes to the original stdout; anything else written to stdout (the
    # reference prints while it builds the model and trains) goes to stderr
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**msg) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    _, _, build_model, _ = _import_reference(path)
    c = _reference_config(path, case, num_classes)
    with np.load(inputs) as f:
        img, gt_bboxes, gt_labels = to_reference_inputs(dict(f))
    w, h = c.data.train.input_size
    if img.shape[2:] != (h, w):
        raise ValueError(f"batch is {img.shape[2:]} (h, w), the reference config {w}x{h}")
    # no ignored boxes: an empty (0, 4) array per image, as the reference's own dataset
    # gives (its head reads the key unconditionally)
    gt_meta = {"img": torch.from_numpy(img), "gt_bboxes": gt_bboxes, "gt_labels": gt_labels,
               "gt_bboxes_ignore": [np.zeros((0, 4), np.float32) for _ in gt_bboxes]}

    model = build_model(c.model)
    model.train()
    if not detach and model.detach_epoch <= 0:
        raise ValueError(f"detach_epoch is {model.detach_epoch}: no before-detach epoch")
    epoch = model.detach_epoch if detach else 0
    model.set_epoch(epoch)
    try:
        from nanodet.optim import build_optimizer
        optimizer = build_optimizer(model, c.schedule.optimizer)
        optimizer_name = "nanodet.optim.build_optimizer"
    except ModuleNotFoundError as e:  # older checkouts: the task built torch.optim.<name>
        if e.name != "nanodet.optim":
            raise
        ocfg = dict(c.schedule.optimizer)
        optimizer_name = f"torch.optim.{ocfg.pop('name')}"
        optimizer = getattr(torch.optim, optimizer_name.rsplit(".", 1)[1])(
            model.parameters(), **ocfg)
    grad_clip = float(c.get("grad_clip", 0.0))
    ema = None
    if c.model.get("weight_averager"):
        from nanodet.model.weight_averager import build_weight_averager
        ema = build_weight_averager(c.model.weight_averager, device="cpu")
        ema.load_from(model)

    def step(i: int) -> float:
        _, loss, _ = model.forward_train(gt_meta)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.update(model, i)
        return float(loss.detach())

    t0 = time.perf_counter()
    loss = step(0)
    first = time.perf_counter() - t0
    reply(ready=True)
    i = 0
    for command in sys.stdin:
        if command.strip() == "step":
            i += 1
            t0 = time.perf_counter()
            loss = step(i)
            reply(step_s=time.perf_counter() - t0)
        elif command.strip() == "quit":
            break
        else:
            raise ValueError(f"unknown command {command!r}")
    reply(summary={"first_step_s": round(first, 3), "steps": i,
                   "peak_rss_mb": _own_peak_rss_mb(), "loss_finite": bool(np.isfinite(loss)),
                   "epoch": epoch, "torch_threads": torch.get_num_threads(),
                   "optimizer": optimizer_name, "grad_clip": grad_clip,
                   "ema": ema is not None})


def _own_peak_rss_mb() -> int:
    """Peak resident memory of this process alone, in MiB.

    ``VmHWM`` of ``/proc/self/status`` (this process's address space since its ``exec``):
    ``ru_maxrss`` of a child started from the benchmark would report the parent's peak
    (Linux carries it over the fork), which made the reference's figure equal to ours.
    Falls back to ``ru_maxrss`` (KiB) where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: ``check`` cases (writes its JSON to ``--out``) or ``serve`` one case
    (the :class:`ReferenceStepper` protocol on stdin/stdout)."""
    p = argparse.ArgumentParser(description="internal: run by benchmarks/train.py")
    p.add_argument("mode", choices=("check", "serve"))
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--out", type=Path, help="check: where to write the JSON")
    p.add_argument("--case", action="append", required=True)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--inputs", type=Path)
    p.add_argument("--detach", action="store_true")
    a = p.parse_args(argv)
    if a.mode == "check":
        if a.out is None:
            p.error("check needs --out")
        a.out.write_text(json.dumps(_worker_check(a.reference, a.case)))
    else:
        _worker_serve(a.reference, a.case[0], a.num_classes, a.inputs, a.detach)
    return 0


if __name__ == "__main__":
    sys.exit(main())
