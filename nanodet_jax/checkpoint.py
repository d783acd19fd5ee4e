"""Saving and restoring Flax variables (``{'params', 'batch_stats'}``) with orbax.

A variables checkpoint is a directory; ``load_variables`` also accepts reference
``.ckpt``/``.pth`` files (converted through ``nanodet_jax.convert``), so every entry point that
takes a checkpoint takes either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

TORCH_SUFFIXES = (".ckpt", ".pth", ".pt")


def save_variables(path: str | Path, variables: dict, overwrite: bool = False) -> Path:
    """Write ``variables`` to the orbax directory ``path`` (absolute path required by orbax).

    Refuses to replace an existing checkpoint unless ``overwrite``.
    """
    p = Path(path).resolve()
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists; pass overwrite=True (or --overwrite) to "
                              "replace it")
    tree = jax.tree_util.tree_map(np.asarray, {k: variables[k] for k in ("params",
                                                                          "batch_stats")})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(p, tree, force=overwrite)
    return p


def load_variables(path: str | Path, cfg: Any, prefer_ema: bool = True,
                   strict: bool = True) -> dict:
    """Variables from an orbax directory written by ``save_variables`` or a reference
    ``.ckpt``/``.pth`` file (EMA weights preferred, as the reference does)."""
    p = Path(path)
    if p.is_file() and p.suffix in TORCH_SUFFIXES:
        from nanodet_jax.convert import load_torch_checkpoint, torch_to_flax

        return torch_to_flax(load_torch_checkpoint(p, prefer_ema=prefer_ema), cfg,
                             strict=strict)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p} is neither an orbax directory nor a "
                                f"{'/'.join(TORCH_SUFFIXES)} file")
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(p.resolve())
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"{p}: not a nanodet_jax variables checkpoint (no 'params')")
    tree.setdefault("batch_stats", {})
    return tree
