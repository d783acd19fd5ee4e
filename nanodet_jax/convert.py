"""Reference PyTorch state dicts <-> Flax variables, and checkpoint file readers.

Flax module paths equal the torch module names (see ``models/layers.py``), so a key maps by
a rename of its leaf plus a layout change for conv kernels:

=====================  ==========================================  ======================
torch leaf             Flax leaf                                   layout
=====================  ==========================================  ======================
``weight`` (4-D)       ``params/.../kernel``                       OIHW -> HWIO
``weight`` (1-D)       ``params/.../scale`` (BatchNorm/GroupNorm)
``bias``               ``params/.../bias``
``scale`` (0-D)        ``params/.../scale`` (``aux_head.scales.l``)
``running_mean/var``   ``batch_stats/.../mean`` / ``var``
``num_batches_tracked`` ``batch_stats/.../num_batches_tracked``     int64 -> int32
=====================  ==========================================  ======================

``head.distribution_project.project`` is a constant (``linspace(0, reg_max, reg_max+1)``)
and is regenerated on export. torch is only needed to *read* ``.ckpt``/``.pth`` files.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nanodet_jax.models import build_model, init_variables

log = logging.getLogger(__name__)

PROJECT_BUFFER_SUFFIX = "distribution_project.project"


class CheckpointMismatchError(ValueError):
    """State-dict keys that do not match the model (listed by name)."""


class CheckpointMismatchWarning(UserWarning):
    """A non-strict load replaced, filled or ignored state-dict entries (listed by name)."""


def _flax_leaf(key: str, arr: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray]:
    """torch key -> (collection, flax path, converted array)."""
    *mods, leaf = key.split(".")
    if leaf == "weight" and arr.ndim == 4:
        return "params", (*mods, "kernel"), np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
    if leaf == "weight":
        return "params", (*mods, "scale"), arr
    if leaf in ("bias", "scale"):
        return "params", (*mods, leaf), arr
    if leaf == "running_mean":
        return "batch_stats", (*mods, "mean"), arr
    if leaf == "running_var":
        return "batch_stats", (*mods, "var"), arr
    if leaf == "num_batches_tracked":
        return "batch_stats", (*mods, "num_batches_tracked"), arr.astype(np.int32)
    raise KeyError(key)


_TORCH_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}


def _torch_name(col: str, path: tuple[str, ...], ndim: int) -> str:
    """Torch key of the Flax leaf ``(col, *path)`` holding an ``ndim``-D array."""
    *mods, leaf = path
    prefix = ".".join(mods)
    if col == "params":
        if leaf == "kernel" or (leaf == "scale" and ndim > 0):
            return f"{prefix}.weight"
        return f"{prefix}.{leaf}"
    return f"{prefix}.{_TORCH_STAT_NAMES.get(leaf, leaf)}"


def _torch_leaf(col: str, path: tuple[str, ...], arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of ``_flax_leaf``."""
    if col == "params" and path[-1] == "kernel":
        arr = np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
    elif path[-1] == "num_batches_tracked":
        arr = arr.astype(np.int64)
    return _torch_name(col, path, arr.ndim), arr


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _target_shapes(cfg: Any, input_hw: tuple[int, int] = (64, 64)) -> dict:
    """Flattened ``{(collection, *path): ShapeDtypeStruct}`` of the full training model."""
    model = build_model(cfg)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), input_hw))
    return {(col, *p): s for col in shapes for p, s in _flatten(shapes[col]).items()}


@dataclass(frozen=True)
class _Match:
    """A state dict compared with the model's variables (all keys flattened).

    ``fits``: ``{(collection, *path): converted array}`` for entries whose shape fits;
    ``mismatched``: ``(torch key, checkpoint shape, model shape as torch)``; ``missing``: torch
    names of model entries absent from the checkpoint; ``unexpected``: checkpoint keys that
    name nothing in the model. ``target``: the model's ``{(collection, *path): shape}``.
    """

    target: dict[tuple[str, ...], tuple[int, ...]]
    fits: dict[tuple[str, ...], np.ndarray]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    missing: list[str]
    unexpected: list[str]


def _match(state_dict: Mapping[str, np.ndarray], cfg: Any) -> _Match:
    """Compare ``state_dict`` (torch names, no ``model.`` prefix) with the model of ``cfg``."""
    target = {k: tuple(s.shape) for k, s in _target_shapes(cfg).items()}
    fits, mismatched, unexpected, seen = {}, [], [], set()
    for key, value in state_dict.items():
        if key.endswith(PROJECT_BUFFER_SUFFIX):
            continue
        arr = np.asarray(value)
        try:
            col, path, conv = _flax_leaf(key, arr)
        except KeyError:
            unexpected.append(key)
            continue
        shape = target.get((col, *path))
        if shape is None:
            unexpected.append(key)
            continue
        seen.add((col, *path))
        if shape == conv.shape:
            fits[(col, *path)] = conv
        else:
            model_shape = _torch_leaf(col, path, np.empty(shape, np.uint8))[1].shape  # torch
            mismatched.append((key, arr.shape, model_shape))
    missing = [_torch_name(k[0], k[1:], len(s)) for k, s in target.items() if k not in seen]
    return _Match(target, fits, sorted(mismatched), sorted(missing), sorted(unexpected))


def match_report(state_dict: Mapping[str, np.ndarray], cfg: Any) -> dict[str, list[str]]:
    """Compare a torch state dict with the model built from ``cfg``.

    Returns ``{"unexpected": [...], "missing": [...], "mismatched": [...]}`` with torch key
    names (mismatched entries read ``"<key>: checkpoint (..) vs model (..)"``, torch layout).
    """
    m = _match(state_dict, cfg)
    return {"unexpected": m.unexpected, "missing": m.missing,
            "mismatched": [f"{k}: checkpoint {a} vs model {b}" for k, a, b in m.mismatched]}


def torch_to_flax(state_dict: Mapping[str, np.ndarray], cfg: Any, *, strict: bool = True,
                  base_variables: Mapping | Callable[[], Mapping] | None = None) -> dict:
    """Map a reference state dict (torch name -> array, no ``model.`` prefix) to Flax
    ``{'params', 'batch_stats'}`` of the full training model of ``cfg`` (AGM included).

    Conv weights ``(O, I/g, kh, kw)`` become kernels ``(kh, kw, I/g, O)``; every other
    array keeps its shape.

    ``strict=True``: any unexpected, missing or mis-shaped key raises
    ``CheckpointMismatchError`` naming every offending key.

    ``strict=False`` is the reference's fine-tuning load (spec §14.2): every checkpoint entry
    whose shape fits is used as-is; mis-shaped and missing entries are taken from
    ``base_variables`` (the same tree as ``init_variables`` of ``cfg``, e.g. a fresh init;
    a zero-argument callable returning it is called only when needed); unexpected keys are
    ignored. All of them are named in ONE ``CheckpointMismatchWarning``. The result has
    exactly the tree and shapes of ``init_variables``. Raises ``CheckpointMismatchError`` if
    something must be filled and ``base_variables`` is None or lacks / mis-shapes that entry.
    """
    m = _match(state_dict, cfg)
    problems = ([f"unexpected (ignored): {k}" for k in m.unexpected]
                + [f"missing: {k}" for k in m.missing]
                + [f"mismatched: {k}: checkpoint {a} vs model {b}" for k, a, b in m.mismatched])
    if problems and strict:
        raise CheckpointMismatchError(
            f"{len(problems)} state-dict entries do not match the model:\n  "
            + "\n  ".join(problems)
            + "\nPass strict=False (--non-strict) to fine-tune from this checkpoint.")
    flat = dict(m.fits)
    fill = [k for k in m.target if k not in flat]
    if fill:
        if base_variables is None:
            raise CheckpointMismatchError(
                f"{len(m.missing) + len(m.mismatched)} model entries are missing from or "
                "mis-shaped in the checkpoint, and strict=False needs base_variables to take "
                "them from: pass base_variables=init_variables(build_model(cfg), rng) (or use "
                "checkpoint.load_variables(..., strict=False), which does). Entries:\n  "
                + "\n  ".join(p for p in problems if not p.startswith("unexpected")))
        base = base_variables() if callable(base_variables) else base_variables
        flat_base = {(col, *p): v for col in base for p, v in _flatten(base[col]).items()}
        bad = [_torch_name(k[0], k[1:], len(m.target[k])) for k in fill
               if k not in flat_base or tuple(np.shape(flat_base[k])) != m.target[k]]
        if bad:
            raise CheckpointMismatchError(
                "base_variables do not match the model of the config (build them with "
                "init_variables(build_model(cfg), rng)); absent or mis-shaped: "
                + ", ".join(bad))
        flat.update({k: flat_base[k] for k in fill})
    if problems:
        warnings.warn(f"checkpoint loaded non-strictly ({len(problems)} entries; mis-shaped "
                      "and missing ones taken from base_variables):\n  "
                      + "\n  ".join(problems), CheckpointMismatchWarning, stacklevel=2)
    tree = _unflatten({k: flat[k] for k in m.target})
    return {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}


def flax_to_torch(variables: Mapping, reg_max: int | None = None) -> dict[str, np.ndarray]:
    """Inverse of ``torch_to_flax``: Flax variables -> reference state dict (numpy arrays).

    ``reg_max`` (when given) adds the constant ``head.distribution_project.project`` buffer.
    ``flax_to_torch(torch_to_flax(sd, cfg), reg_max)`` reproduces ``sd`` exactly.
    """
    out: dict[str, np.ndarray] = {}
    for col in ("params", "batch_stats"):
        for path, v in _flatten(variables.get(col, {})).items():
            name, arr = _torch_leaf(col, path, np.asarray(v))
            out[name] = arr
    if reg_max is not None:
        out[f"head.{PROJECT_BUFFER_SUFFIX}"] = np.linspace(0, reg_max, reg_max + 1,
                                                           dtype=np.float32)
    return out


# ---------------------------------------------------------------------------------------
# File readers


def _strip_prefixes(sd: Mapping[str, Any], prefer_ema: bool, source: str) -> dict[str, Any]:
    """Reference loading rule (spec §14.2): prefer ``avg_model.*`` (EMA) keys, then strip a
    leading ``model.``/``module.`` prefix."""
    keys = list(sd)
    has_ema = any(k.startswith("avg_model.") for k in keys)
    has_live = any(k.startswith("model.") for k in keys)
    if has_ema and (prefer_ema or not has_live):
        if Path(source).name.startswith("model_last"):
            log.warning("%s: the reference refreshes avg_model.* only before validation, so the "
                        "EMA weights in model_last.ckpt may be stale (quirk #9)", source)
        return {k[len("avg_model."):]: v for k, v in sd.items() if k.startswith("avg_model.")}
    if has_live:
        return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if keys and keys[0].startswith("module."):
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return dict(sd)


def load_torch_checkpoint(path: str | Path, prefer_ema: bool = True) -> dict[str, np.ndarray]:
    """Read a reference ``.ckpt`` (Lightning) or ``.pth`` file into ``{torch name: ndarray}``.

    Uses ``torch.load(weights_only=True)`` (no arbitrary code is unpickled). ``.ckpt`` keys
    prefixed ``avg_model.`` (EMA) are preferred when ``prefer_ema``; else ``model.``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .ckpt/.pth files needs PyTorch: pip install "
                          "'nanodet_jax[torch]'") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{p}: could not be read with torch.load(weights_only=True): {e}. "
                         "Re-save the state dict alone (torch.save(ckpt['state_dict'], ...)) "
                         "if it holds non-tensor objects.") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{p}: no state_dict found (top-level keys: "
                         f"{list(obj)[:10] if isinstance(obj, dict) else type(obj)})")
    sd = _strip_prefixes(sd, prefer_ema, str(p))
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            for k, v in sd.items()}


def torchvision_backbone_to_flax(state_dict: Mapping[str, np.ndarray], variables: Mapping,
                                 cfg: Any) -> dict:
    """Load a torchvision ImageNet ShuffleNetV2 state dict into ``variables['*']['backbone']``.

    Keys are the torchvision names (``conv1.0.weight``, ``stage2.0.branch1.0.weight``...);
    ``conv5.*`` and ``fc.*`` are ignored (NanoDet-Plus has no conv5); absent
    ``num_batches_tracked`` counters (older files) keep their value in ``variables``. Any other
    unmatched, missing or mis-shaped key raises ``CheckpointMismatchError`` naming it.
    Returns new variables (conv kernels HWIO).
    """
    bb = {f"backbone.{k}": v for k, v in state_dict.items()
          if not k.startswith(("conv5.", "fc."))}
    m = _match(bb, cfg)
    problems = (m.unexpected
                + [f"{k}: checkpoint {a} vs model {b}" for k, a, b in m.mismatched]
                + [f"missing: {k}" for k in m.missing
                   if k.startswith("backbone.") and not k.endswith(".num_batches_tracked")])
    if problems:
        raise CheckpointMismatchError("torchvision backbone checkpoint does not match "
                                      f"model.arch.backbone ({cfg.model.arch.backbone.model_size})"
                                      ":\n  " + "\n  ".join(problems))
    flat = {(col, *p): v for col in ("params", "batch_stats")
            for p, v in _flatten(variables[col]).items()}
    flat.update(m.fits)
    tree = _unflatten(flat)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def load_torchvision_backbone(path: str | Path, variables: Mapping, cfg: Any) -> dict:
    """``variables`` with the backbone replaced by a torchvision ShuffleNetV2 ``.pth`` file
    (ImageNet weights, e.g. ``shufflenetv2_x1-5666bf0f80.pth``); see
    ``torchvision_backbone_to_flax``."""
    return torchvision_backbone_to_flax(load_torch_checkpoint(path), variables, cfg)
