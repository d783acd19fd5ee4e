"""Training checkpoints (orbax ``CheckpointManager``): the latest N and the best, kept apart.

Layout of a workdir::

    checkpoints/<step>/{state,layout,meta}   latest N (``log.keep_checkpoints``), every epoch end
    best/<step>/{state,layout,meta}          the best by ``evaluator.save_key`` (one kept)
    model_best.pth                           the best EMA weights as a reference state dict

``state`` is the whole :class:`~nanodet_jax.train.state.TrainState` packed into one flat array
per dtype (``float32``, ``int32``, ``uint32``); ``layout`` (JSON) says where each leaf lies in
them: its path (``["ema", "params", "backbone", ...]``), dtype, shape and offset. The EMA,
stored flat in the state (:mod:`nanodet_jax.train.packed`), is written leaf by leaf
(:func:`~nanodet_jax.train.packed.tree_view`), so its paths name the model's variables.
Packing is exact (a leaf is a contiguous slice, bit for bit) and makes a save cost a few
arrays instead of the ~2,200 leaves of params + EMA + optimizer state: orbax/tensorstore
spend ~1-2 ms per array (a tiny model's state took 6-16 s to save, 0.1-0.3 s packed).
``meta`` (JSON) holds the epoch, the loader position and the best metric so far.
orbax writes into a temporary directory and renames it when complete, so a process killed
while saving leaves the previous checkpoint intact (an unfinished one is ignored).

Multi-host: every process calls :meth:`TrainCheckpoints.save` / ``restore`` (orbax coordinates
them; the workdir must be on a filesystem all hosts share). The train state is replicated on
the mesh, so each process packs its own local copy and orbax writes the host arrays from the
primary process; ``restore`` rebuilds every leaf as a global array with the sharding of the
template (replicated on the mesh), so a resumed run feeds the jitted step exactly what it
was compiled for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nanodet_jax.data.record import ImageRecord
from nanodet_jax.train.packed import from_tree_view, tree_view
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


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_path(path: tuple) -> list[str]:
    return [_key_name(k) for k in path]


def _host_copy(leaf: Any) -> np.ndarray:
    """The value of a (replicated) leaf on this host."""
    if isinstance(leaf, jax.Array):
        if not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            raise ValueError("a train-state leaf is sharded across processes; checkpoints "
                             "pack the replicated train state only")
        leaf = leaf.addressable_data(0)
    return np.asarray(leaf)


def pack_state(tree: Any) -> tuple[dict[str, np.ndarray], list[dict]]:
    """``tree`` as one flat host array per dtype name, and the layout of its leaves: a list
    of ``{'path', 'dtype', 'shape', 'offset'}`` in ``tree``'s flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    parts: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    layout = []
    for path, leaf in flat:
        x = _host_copy(leaf)
        name = x.dtype.name
        layout.append({"path": _leaf_path(path), "dtype": name, "shape": list(x.shape),
                       "offset": sizes.get(name, 0)})
        parts.setdefault(name, []).append(x.reshape(-1))
        sizes[name] = sizes.get(name, 0) + x.size
    return {name: np.concatenate(p) for name, p in parts.items()}, layout


def _slice(packed: dict[str, np.ndarray], entry: dict) -> np.ndarray:
    shape = tuple(entry["shape"])
    start = int(entry["offset"])
    return packed[entry["dtype"]][start:start + int(np.prod(shape, dtype=np.int64))] \
        .reshape(shape)


def unpack_state(packed: dict[str, np.ndarray], layout: list[dict], template: Any) -> Any:
    """The inverse of :func:`pack_state` into the structure, dtypes and shardings of
    ``template``; a checkpoint of another structure is a :class:`ResumeError` naming the
    leaves that differ."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    entries = {tuple(e["path"]): e for e in layout}
    wanted = {tuple(_leaf_path(p)): leaf for p, leaf in flat}
    problems = [f"missing in the checkpoint: {'/'.join(k)}" for k in wanted if k not in entries]
    problems += [f"not in this model's state: {'/'.join(k)}" for k in entries if k not in wanted]
    for k, leaf in wanted.items():
        e = entries.get(k)
        if e is not None and (tuple(e["shape"]) != tuple(np.shape(leaf))
                              or e["dtype"] != np.dtype(leaf.dtype).name):
            problems.append(f"{'/'.join(k)}: saved {e['dtype']}{e['shape']}, this state has "
                            f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}")
    if problems:
        raise ResumeError("the checkpoint does not fit this run's train state:\n  "
                          + "\n  ".join(problems[:20])
                          + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20
                             else ""))

    def put(path: tuple, leaf: Any) -> jax.Array:
        x = _slice(packed, entries[tuple(_leaf_path(path))])
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            return jnp.asarray(x)
        # a global array (any process count) with the template's sharding; the copy makes
        # each leaf own its buffer (the state is donated leaf by leaf)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: np.array(x[idx]))

    return jax.tree_util.tree_unflatten(treedef, [put(p, leaf) for p, leaf in flat])


def _save_args(state: TrainState, meta: dict) -> ocp.args.Composite:
    packed, layout = pack_state(tree_view(state))  # the EMA leaf by leaf: ema/params/...
    # host numpy arrays: orbax writes them from the primary process only
    return ocp.args.Composite(state=ocp.args.StandardSave(packed),
                              layout=ocp.args.JsonSave(layout), meta=ocp.args.JsonSave(meta))


_RESTORE_ARGS = dict(state=ocp.args.StandardRestore(), layout=ocp.args.JsonRestore(),
                     meta=ocp.args.JsonRestore())


def _unpacked(out: Any) -> tuple[dict, list, dict]:
    return ({k: np.asarray(v) for k, v in out["state"].items()}, list(out["layout"]),
            dict(out["meta"]))


class TrainCheckpoints:
    """Save / restore the train state of one workdir."""

    def __init__(self, workdir: str | Path, keep: int = 3):
        self.workdir = Path(workdir)
        self.latest = _manager(self.workdir / LATEST, keep)
        self.best = _manager(self.workdir / BEST, 1)

    def save(self, state: TrainState, meta: dict, best: bool = False) -> int:
        """Write ``state`` + ``meta`` as the latest checkpoint (and as the best one)."""
        step = int(_host_copy(state.step))
        args = _save_args(state, meta)
        for mngr in (self.latest, self.best) if best else (self.latest,):
            if step in mngr.all_steps():  # re-saved at the same step (e.g. best after latest)
                mngr.delete(step)
            mngr.save(step, args=args)
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
        step_dir = self.workdir / which / str(step)
        if not (step_dir / "layout").is_dir():
            raise ResumeError(f"{step_dir} has no 'layout': it was written by an older "
                              "nanodet_jax (one array per leaf) that this version cannot "
                              "resume; start a new run in another --workdir")
        packed, layout, meta = _unpacked(mngr.restore(step, args=ocp.args.Composite(
            **_RESTORE_ARGS)))
        view = unpack_state(packed, layout, tree_view(template))
        return from_tree_view(template, view), meta

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _step_dir(path: Path) -> Path | None:
    """The checkpoint step directory ``path`` names: itself, or the newest step of a
    workdir's ``best/`` (preferred) or ``checkpoints/``, or of such a directory."""
    if (path / "layout").is_dir():
        return path
    root = path / BEST if (path / BEST).is_dir() else \
        path / LATEST if (path / LATEST).is_dir() else path
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit()] \
        if root.is_dir() else []
    steps = sorted((int(d.name), d) for d in dirs if (d / "layout").is_dir())
    if not steps and ((path / "state").is_dir() or any((d / "state").is_dir() for d in dirs)):
        raise ValueError(f"{path}: a training checkpoint without 'layout', written by an older "
                         "nanodet_jax (one array per leaf); this version reads the packed "
                         "format only")
    return steps[-1][1] if steps else None


def read_state(step_dir: str | Path) -> dict[str, np.ndarray]:
    """Every leaf of a saved train state as a host array, keyed by its ``/``-joined path
    (``'ema/params/backbone/...'``, ``'step'``), whatever devices it was saved from."""
    step_dir = Path(step_dir).resolve()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        packed, layout, _ = _unpacked(ckptr.restore(step_dir, ocp.args.Composite(
            **_RESTORE_ARGS)))
    return {"/".join(e["path"]): _slice(packed, e) for e in layout}


def load_ema_variables(path: str | Path) -> dict | None:
    """EMA ``{'params', 'batch_stats'}`` of a training workdir, its ``checkpoints``/``best``
    directory or one ``<step>`` directory; ``None`` when ``path`` is none of these."""
    step_dir = _step_dir(Path(path).resolve())
    if step_dir is None:
        return None
    ema: dict = {"params": {}, "batch_stats": {}}
    for key, value in read_state(step_dir).items():
        parts = key.split("/")
        if parts[0] != "ema":
            continue
        node = ema
        for name in parts[1:-1]:
            node = node.setdefault(name, {})
        node[parts[-1]] = value
    return ema


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
