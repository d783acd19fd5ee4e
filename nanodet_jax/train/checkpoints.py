"""Training checkpoints (orbax ``CheckpointManager``): the latest N and the best, kept apart.

Layout of a workdir::

    checkpoints/<step>/{state,meta}   latest N (``log.keep_checkpoints``), every epoch end
    best/<step>/{state,meta}          the best by ``evaluator.save_key`` (one kept)
    model_best.pth                    the best EMA weights as a reference state dict

``state`` is the whole :class:`~nanodet_jax.train.state.TrainState`; ``meta`` (JSON) holds the
epoch, the loader position, the best metric so far and the config/dataset fingerprints.
orbax writes into a temporary directory and renames it when complete, so a process killed
while saving leaves the previous checkpoint intact (an unfinished one is ignored).

Multi-host: every process calls :meth:`TrainCheckpoints.save` / ``restore`` (orbax coordinates
them; the workdir must be on a filesystem all hosts share). The state is saved as the global
``jax.Array``s it is (never fetched to one host), and restored with the shardings of the
template (replicated on the mesh), so a resumed run feeds the jitted step exactly what it
was compiled for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nanodet_jax.data.record import ImageRecord
from nanodet_jax.train.state import TrainState

LATEST, BEST = "checkpoints", "best"
BEST_PTH = "model_best.pth"


class ResumeError(RuntimeError):
    """A resume that would not continue the same run (the message names the differences)."""


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.resolve(), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True))


class TrainCheckpoints:
    """Save / restore the train state of one workdir."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        self.workdir = Path(workdir)
        self.latest = _manager(self.workdir / LATEST, keep)
        self.best = _manager(self.workdir / BEST, 1)

    def save(self, state: TrainState, meta: dict, best: bool = False) -> int:
        """Write ``state`` + ``meta`` as the latest checkpoint (and as the best one)."""
        step = int(jax.device_get(state.step))
        tree = state  # global arrays as they are: each process writes what it holds
        for mngr in (self.latest, self.best) if best else (self.latest,):
            if step in mngr.all_steps():  # re-saved at the same step (e.g. best after latest)
                mngr.delete(step)
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                    meta=ocp.args.JsonSave(meta)))
            mngr.wait_until_finished()
        return step

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, template: TrainState, which: str = LATEST) -> tuple[TrainState, dict]:
        """The newest complete checkpoint of ``which`` (``checkpoints`` or ``best``), restored
        into the structure, dtypes and shardings of ``template`` (a freshly created state,
        e.g. replicated on the mesh: the restored state is too)."""
        mngr = self.latest if which == LATEST else self.best
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.workdir / which}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        # device arrays like a fresh state's (host numpy leaves, for a template leaf that is
        # not a jax.Array, would be a different jit signature: one more compilation)
        return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x),
                            out["state"]), dict(out["meta"])

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def load_ema_variables(path: str | Path) -> dict | None:
    """EMA ``{'params', 'batch_stats'}`` of a training workdir, its ``checkpoints``/``best``
    directory or one ``<step>`` directory; ``None`` when ``path`` is none of these."""
    p = Path(path).resolve()
    if (p / "state").is_dir():
        step_dir = p
    else:
        root = p / BEST if (p / BEST).is_dir() else p / LATEST if (p / LATEST).is_dir() else p
        steps = sorted((int(d.name), d) for d in root.iterdir()
                       if d.is_dir() and d.name.isdigit() and (d / "state").is_dir()) \
            if root.is_dir() else []
        if not steps:
            return None
        step_dir = steps[-1][1]
    tree = restore_host(step_dir / "state")
    ema = tree["ema"]
    return {"params": ema["params"], "batch_stats": ema["batch_stats"]}


def restore_host(directory: str | Path) -> dict:
    """A saved state tree as host numpy arrays, whatever devices it was saved from (a state
    saved on a mesh restores with its own device topology unless told otherwise)."""
    path = Path(directory).resolve()
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def dataset_fingerprint(records: list[ImageRecord]) -> str:
    """Hash of what training reads: files, sizes, boxes and labels of every record."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.image_id}|{r.file}|{r.height}|{r.width}|".encode())
        h.update(np.ascontiguousarray(r.boxes).tobytes())
        h.update(np.ascontiguousarray(r.labels).tobytes())
    return h.hexdigest()[:16]


def config_differences(saved: dict, current: dict, prefix: str = "",
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted fields whose values differ between two config dicts (``ignore``d fields and
    their children excepted)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        path = f"{prefix}{k}"
        if path in ignore:
            continue
        a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path + ".", ignore)
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out
