"""The reference ``ExpMovingAverager`` (``model.weight_averager``) over a variables pytree.

After every optimizer update the reference calls ``update(model, i)`` with ``i`` =
Lightning's ``global_step`` read after the update (1 for the first update; in the port: the
optimizer's update count after the update). With ``base`` = ``model.weight_averager.decay``:

    d(i) = base * exp(-(1 + i) / 2000) + (1 - base)    # weight of the NEW value
    ema  = ema * (1 - d) + value * d

(``d(1) = 0.99900070``, ``d(1000) = 0.60630622`` for base 0.9998: weights of the new
value.) It covers every parameter and buffer. Float leaves are averaged in their own dtype
(torch: float32 tensor times Python float). Integer leaves (``num_batches_tracked``) follow
torch's int64 rule: the average is computed in float32 and truncated toward zero when copied
back (quirk #8).

Precision: ``d`` and ``1 - d`` are computed in float32 within a few ulps of the reference's
double; XLA may contract ``ema * (1 - d) + value * d`` into fused multiply-adds. Results agree
with torch to ~1e-7 of the terms' magnitude ``|ema| (1 - d) + |value| d`` (bit-identical
outside ``jit`` on ``ema.npz``), not bit-for-bit where the two terms nearly cancel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nanodet_jax.config import ConfigError
from nanodet_jax.train.packed import PackedTree
from nanodet_jax.train.schedule import as_dict, choice, real

Array = jax.Array
Variables = Any  # pytree of arrays (float params / BN statistics, int counters)

DEFAULT_BASE = 0.9998


def ema_decay(step: Array | int, base: float = DEFAULT_BASE) -> Array:
    """Weight ``d(step)`` of the new value; shape of ``step``, default float dtype.

    float32 (a few ulps from the reference's double), float64 under ``jax.enable_x64``.
    """
    return base * jnp.exp(-(jnp.asarray(step) + 1) / 2000) + (1 - base)


def ema_keep(step: Array | int, base: float = DEFAULT_BASE) -> Array:
    """Weight ``1 - d(step)`` of the old average, as ``-base * expm1(-(1 + step) / 2000)``.

    Computed directly rather than as ``1 - ema_decay``, which loses up to ~1e-4 relative in
    float32 when ``d`` is near 1 (early steps).
    """
    return -base * jnp.expm1(-(jnp.asarray(step) + 1) / 2000)


def ema_init(variables: Variables) -> Variables:
    """The averager's state at fit start: a copy of ``variables`` (same tree, dtypes)."""
    return jax.tree.map(jnp.array, variables)


def _average_leaf(ema: Array, value: Array, keep: Array, new: Array) -> Array:
    """``ema * keep + value * new`` with torch's dtype rule (ints: float32, truncated)."""
    dt = ema.dtype if jnp.issubdtype(ema.dtype, jnp.inexact) else jnp.float32
    avg = ema.astype(dt) * keep.astype(dt) + value.astype(dt) * new.astype(dt)
    return avg.astype(ema.dtype)  # float -> int conversion truncates toward zero


def ema_update(ema: Variables | PackedTree, variables: Variables, step: Array | int,
               base: float = DEFAULT_BASE) -> Variables | PackedTree:
    """One reference ``update(model, step)``.

    Args:
      ema: the averaged variables: a tree of arrays, or a
        :class:`~nanodet_jax.train.packed.PackedTree` of one (updated buffer by buffer:
        one kernel per dtype instead of one per leaf; the same elementwise math).
      variables: the model's current variables, same tree, shapes and dtypes as ``ema``.
      step: int scalar, the counter the reference passes (updates done, 1 after the first).
      base: ``model.weight_averager.decay``.

    Returns:
      The new average, in the form of ``ema`` (same structure, shapes and dtypes).
    """
    keep, new = ema_keep(step, base), ema_decay(step, base)
    if isinstance(ema, PackedTree):
        return ema.replace(buffers=tuple(
            _average_leaf(e, v, keep, new)
            for e, v in zip(ema.buffers, ema.pack_values(variables), strict=True)))
    return jax.tree.map(lambda e, v: _average_leaf(e, v, keep, new), ema, variables)


def averager_base(cfg: Any) -> float:
    """``model.weight_averager.decay`` after checking ``name`` is ``ExpMovingAverager``."""
    path = "model.weight_averager"
    model = as_dict(as_dict(cfg, "<config>").get("model", {}), "model")
    node = as_dict(model.get("weight_averager", {}), path)
    choice(node.get("name"), f"{path}.name", ("ExpMovingAverager",))
    if "decay" not in node:
        raise ConfigError(f"missing field '{path}.decay'")
    base = real(node["decay"], f"{path}.decay", 0.0)
    if base > 1.0:
        raise ConfigError(f"field '{path}.decay' must be in [0, 1], got {base!r}")
    return base
