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
INIT_HW = (64, 64)  # trace size of the fresh init that fills a non-strict load (any works)


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


def load_variables(path: str | Path, cfg: Any, prefer_ema: bool = True, strict: bool = True,
                   rng: jax.Array | None = None) -> dict:
    """Variables ``{'params', 'batch_stats'}`` from an orbax directory written by
    ``save_variables``, a training workdir (its EMA weights: the ``best/`` checkpoint when
    there is one, else the latest; or ``best/``, ``checkpoints/``, ``checkpoints/<step>``
    themselves) or a reference ``.ckpt``/``.pth`` file (EMA weights preferred, as the
    reference does; conv kernels HWIO).

    ``strict=False`` is the reference's fine-tuning load (spec §14.2; see
    ``convert.torch_to_flax``): entries that are missing from the checkpoint or mis-shaped
    (e.g. ``head.gfl_cls.*`` of an 80-class checkpoint in a 5-class config) come from a fresh
    ``init_variables`` of ``cfg`` drawn with ``rng`` (default ``jax.random.key(0)``), unexpected
    ones are ignored, and all of them are named in one warning. It applies to orbax
    directories too; ``strict=True`` restores an orbax directory exactly as saved.
    """
    from nanodet_jax.convert import flax_to_torch, load_torch_checkpoint, torch_to_flax

    p = Path(path)
    if p.is_file() and p.suffix in TORCH_SUFFIXES:
        state_dict = load_torch_checkpoint(p, prefer_ema=prefer_ema)
    elif p.is_dir():
        from nanodet_jax.train.checkpoints import load_ema_variables

        tree = load_ema_variables(p)  # a training workdir / best / checkpoints / <step>
        if tree is None:
            with ocp.StandardCheckpointer() as ckptr:
                tree = ckptr.restore(p.resolve())
        if not isinstance(tree, dict) or "params" not in tree:
            raise ValueError(f"{p}: not a nanodet_jax variables checkpoint (no 'params')")
        tree.setdefault("batch_stats", {})
        if strict:
            return tree
        state_dict = flax_to_torch(tree)
    else:
        raise FileNotFoundError(f"checkpoint {p} is neither an orbax directory nor a "
                                f"{'/'.join(TORCH_SUFFIXES)} file")
    return torch_to_flax(state_dict, cfg, strict=strict,
                         base_variables=lambda: _fresh_variables(cfg, rng))


def _fresh_variables(cfg: Any, rng: jax.Array | None) -> dict:
    """``init_variables`` of the full training model of ``cfg`` (``rng`` default key 0)."""
    from nanodet_jax.models import build_model, init_variables

    key = jax.random.key(0) if rng is None else rng
    return init_variables(build_model(cfg), key, INIT_HW)
