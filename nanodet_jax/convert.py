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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nanodet_jax.models import build_model, init_variables

log = logging.getLogger(__name__)

PROJECT_BUFFER_SUFFIX = "distribution_project.project"


class CheckpointMismatchError(ValueError):
    """State-dict keys that do not match the model (listed by name)."""


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


def _torch_leaf(col: str, path: tuple[str, ...], arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of ``_flax_leaf``."""
    *mods, leaf = path
    prefix = ".".join(mods)
    if col == "params":
        if leaf == "kernel":
            return f"{prefix}.weight", np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
        if leaf == "scale" and arr.ndim == 0:
            return f"{prefix}.scale", arr
        if leaf == "scale":
            return f"{prefix}.weight", arr
        return f"{prefix}.{leaf}", arr
    name = {"mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    if leaf == "num_batches_tracked":
        arr = arr.astype(np.int64)
    return f"{prefix}.{name}", arr


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


def match_report(state_dict: Mapping[str, np.ndarray], cfg: Any) -> dict[str, list[str]]:
    """Compare a torch state dict with the model built from ``cfg``.

    Returns ``{"unexpected": [...], "missing": [...], "mismatched": [...]}`` with torch key
    names (mismatched entries include both shapes).
    """
    target = _target_shapes(cfg)
    seen, unexpected, mismatched = set(), [], []
    for key, value in state_dict.items():
        if key.endswith(PROJECT_BUFFER_SUFFIX):
            continue
        arr = np.asarray(value)
        try:
            col, path, conv = _flax_leaf(key, arr)
        except KeyError:
            unexpected.append(key)
            continue
        t = target.get((col, *path))
        if t is None:
            unexpected.append(key)
        elif tuple(t.shape) != conv.shape:
            mismatched.append(f"{key}: checkpoint {arr.shape} (as Flax {conv.shape}) vs model "
                              f"{tuple(t.shape)}")
            seen.add((col, *path))
        else:
            seen.add((col, *path))
    missing = [_torch_leaf(k[0], k[1:], np.zeros(target[k].shape))[0]
               for k in target if k not in seen]
    return {"unexpected": sorted(unexpected), "missing": sorted(missing),
            "mismatched": sorted(mismatched)}


def torch_to_flax(state_dict: Mapping[str, np.ndarray], cfg: Any, *, strict: bool = True,
                  base_variables: Mapping | None = None) -> dict:
    """Map a reference state dict (torch name -> array, no ``model.`` prefix) to Flax
    ``{'params', 'batch_stats'}`` of the full training model (AGM included when present).

    ``strict=True``: any unexpected, missing or mis-shaped key raises
    ``CheckpointMismatchError`` naming every offending key. ``strict=False`` follows the
    reference's fine-tuning load: mismatched/unexpected keys are skipped and missing ones
    taken from ``base_variables`` (e.g. ``init_variables(...)``); every skipped name is
    logged as a warning.
    """
    report = match_report(state_dict, cfg)
    problems = [f"{kind}: {name}" for kind in ("unexpected", "missing", "mismatched")
                for name in report[kind]]
    if problems and strict:
        raise CheckpointMismatchError(
            f"{len(problems)} state-dict entries do not match the model:\n  "
            + "\n  ".join(problems))
    bad = {m.split(":")[0] for m in report["mismatched"]} | set(report["unexpected"])
    flat: dict[tuple[str, ...], Any] = {}
    if report["missing"]:
        if base_variables is None:
            raise CheckpointMismatchError(
                "missing keys and no base_variables to fill them: " + ", ".join(report["missing"]))
        flat.update({(col, *p): v for col in ("params", "batch_stats")
                     for p, v in _flatten(base_variables[col]).items()})
    for key, value in state_dict.items():
        if key.endswith(PROJECT_BUFFER_SUFFIX) or key in bad:
            continue
        col, path, conv = _flax_leaf(key, np.asarray(value))
        flat[(col, *path)] = conv
    for p in problems:
        log.warning("checkpoint entry skipped: %s", p)
    tree = _unflatten(flat)
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
    ``conv5.*`` and ``fc.*`` are ignored (NanoDet-Plus has no conv5). Any other unmatched or
    mis-shaped key raises ``CheckpointMismatchError`` naming it. Returns new variables.
    """
    bb = {f"backbone.{k}": v for k, v in state_dict.items()
          if not k.startswith(("conv5.", "fc."))}
    report = match_report(bb, cfg)
    missing_bb = [k for k in report["missing"] if k.startswith("backbone.")]
    problems = report["unexpected"] + report["mismatched"] + missing_bb
    if problems:
        raise CheckpointMismatchError("torchvision backbone checkpoint does not match "
                                      f"model.arch.backbone ({cfg.model.arch.backbone.model_size})"
                                      ":\n  " + "\n  ".join(problems))
    flat = {(col, *p): v for col in ("params", "batch_stats")
            for p, v in _flatten(variables[col]).items()}
    for key, value in bb.items():
        col, path, conv = _flax_leaf(key, np.asarray(value))
        flat[(col, *path)] = conv
    tree = _unflatten(flat)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}
