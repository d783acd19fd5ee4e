"""The reference optimizer (``schedule.optimizer``) as an optax transformation, torch semantics.

``make_optimizer(cfg, steps_per_epoch)`` chains, per update:

1. ``clip_by_global_norm_torch(grad_clip)`` when ``grad_clip`` is set (Lightning's
   ``gradient_clip_val`` -> ``torch.nn.utils.clip_grad_norm_``: every gradient is multiplied by
   ``min(1, max_norm / (norm + 1e-6))``, ``norm`` the global L2 norm); ``null``/0 = no clip;
2. the optimizer named by ``schedule.optimizer.name`` with torch's fields and defaults:

   * ``AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False)``: decoupled
     decay ``p <- p - lr * (adam + weight_decay * p)`` on **every** leaf (no exclusions);
   * ``Adam(lr, betas, eps, weight_decay=0, amsgrad=False)``: L2 added to the gradient;
   * ``SGD(lr, momentum=0, dampening=0, weight_decay=0, nesterov=False)``: L2 added to the
     gradient, buffer ``b <- g`` at the first step then ``b <- mu b + (1 - dampening) g``,
     direction ``g + mu b`` (nesterov) or ``b``.

   The reference's parameter-group options ``no_norm_decay`` / ``no_bias_decay`` /
   ``param_level_cfg`` are accepted only when false/empty.

The lr is ``make_lr_schedule(cfg.schedule, steps_per_epoch)`` of the update counter, injected
with ``optax.inject_hyperparams``: the state's ``inner`` is an
``InjectStatefulHyperparamsState`` whose ``count`` is the number of updates done and whose
``hyperparams['learning_rate']`` is the lr of the latest update (``current_lr``).

The optimizer is meant for the **float** parameters only (``params``; BatchNorm statistics
are not optimized); ``update(grads, state, params)`` requires ``params`` (weight decay).

The whole chain runs on **one flat vector** (:func:`flat`: the parameters and gradients
concatenated, the updates sliced back at runtime offsets): its math is elementwise plus one
global norm, so the values are the ones leaf by leaf, but XLA:CPU compiles a handful of
kernels for it instead of several per parameter leaf (~460 leaves in NanoDet-Plus: the
m_320 train step's update had ~1,400 kernels, a third of the program).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanodet_jax.config import ConfigError
from nanodet_jax.train.packed import leaf_starts, unravel_at
from nanodet_jax.train.schedule import as_dict, choice, fields, make_lr_schedule, real
from nanodet_jax.train.tree_reduce import concat_leaves, global_norm

Array = jax.Array

_GROUP_OPTIONS = {"no_norm_decay": False, "no_bias_decay": False, "param_level_cfg": {}}
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "AdamW": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
              "amsgrad": False},
    "Adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
             "amsgrad": False},
    "SGD": {"lr": 0.001, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
            "nesterov": False},
}


# ---------------------------------------------------------------------------------------------
# transformations


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``clip_grad_norm_``: scale all updates by ``min(1, max_norm / (global_norm + 1e-6))``."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (global_norm(updates) + 1e-6))
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class TorchAdamState(NamedTuple):
    """Moments of ``scale_by_torch_adam``: ``mu``, ``nu`` (and ``nu_max`` with amsgrad, else
    ``()``) shaped like the parameters (one flat vector under :func:`flat`)."""

    count: Array
    mu: Any
    nu: Any
    nu_max: Any


class FlatState(NamedTuple):
    """State of :func:`flat`: ``inner`` (the wrapped transformation's state over the flat
    vector) and ``starts`` (int32 ``()`` per parameter leaf: where it starts in the vector;
    runtime values, :func:`~nanodet_jax.train.packed.unravel_at`)."""

    inner: Any
    starts: tuple[Array, ...]


def flat(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to all leaves at once, as one ``(N,)`` vector.

    ``update(grads, state, params)`` concatenates ``grads`` and ``params``
    (:func:`~nanodet_jax.train.tree_reduce.concat_leaves`, their promoted dtype), runs
    ``inner`` on the vectors and slices the updates back into the tree of ``grads`` (shapes
    and dtypes of its leaves). For transformations whose math is elementwise or over the
    whole tree (norms), the values equal ``inner`` applied leaf by leaf.
    """

    def init(params):
        return FlatState(inner.init(concat_leaves(params)), leaf_starts(params))

    def update(updates, state, params=None):
        p = None if params is None else concat_leaves(params)
        out, inner_state = inner.update(concat_leaves(updates), state.inner, p)
        return unravel_at(out, state.starts, updates), FlatState(inner_state, state.starts)

    return optax.GradientTransformation(init, update)


def _bias_correction(beta: float, t: Array) -> Array:
    """``1 - beta ** t`` as ``-expm1(t log beta)`` (float32 has no cancellation there)."""
    return -jnp.expm1(t * math.log(beta)) if beta > 0 else jnp.ones_like(t)


def scale_by_torch_adam(b1: float, b2: float, eps: float,
                        amsgrad: bool) -> optax.GradientTransformation:
    """torch's Adam direction ``(m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    With ``amsgrad`` the running maximum of the *uncorrected* ``v`` is used (torch; optax's
    ``scale_by_amsgrad`` takes the maximum of the corrected one, which differs).
    """

    def init(params):
        def zeros():  # separate buffers per moment: a train state is donated leaf by leaf
            return jax.tree.map(jnp.zeros_like, params)

        return TorchAdamState(jnp.zeros([], jnp.int32), zeros(), zeros(),
                              zeros() if amsgrad else ())

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * (g * g), state.nu, updates)
        nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else ()
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = _bias_correction(b1, t), jnp.sqrt(_bias_correction(b2, t))
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v) / c2 + eps), mu,
                           nu_max if amsgrad else nu)
        return out, TorchAdamState(count, mu, nu, nu_max)

    return optax.GradientTransformation(init, update)


class TorchMomentumState(NamedTuple):
    """Momentum buffer of ``torch_momentum``; ``count`` = updates done."""

    count: Array
    buf: Any


def torch_momentum(momentum: float, dampening: float,
                   nesterov: bool) -> optax.GradientTransformation:
    """torch SGD momentum: ``b <- g`` (first step) or ``mu b + (1 - dampening) g``."""

    def init(params):
        return TorchMomentumState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        first = state.count == 0
        buf = jax.tree.map(lambda b, g: jnp.where(first, g, momentum * b + (1 - dampening) * g),
                           state.buf, updates)
        out = (jax.tree.map(lambda g, b: g + momentum * b, updates, buf) if nesterov else buf)
        return out, TorchMomentumState(optax.safe_increment(state.count), buf)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# config


def parse_optimizer(node: Any) -> tuple[str, dict]:
    """Validate ``schedule.optimizer``; returns ``(name, torch fields with defaults)``."""
    path = "schedule.optimizer"
    d = as_dict(node, path)
    name = choice(d.get("name"), f"{path}.name", tuple(OPTIMIZERS))
    f = fields(d, path, name, {**OPTIMIZERS[name], **_GROUP_OPTIONS})
    for key in _GROUP_OPTIONS:
        if f.pop(key):
            raise ConfigError(f"field '{path}.{key}' = {d[key]!r} is not supported "
                              "(parameter groups are not implemented; use false / {})")
    f["lr"] = real(f["lr"], f"{path}.lr", 0.0)
    f["weight_decay"] = real(f["weight_decay"], f"{path}.weight_decay", 0.0)
    if name == "SGD":
        _check_sgd(f, path)
    else:
        _check_adam(f, path)
    return name, f


def _check_adam(f: dict, path: str) -> None:
    betas = f["betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
        raise ConfigError(f"field '{path}.betas' must be [beta1, beta2], got {betas!r}")
    f["betas"] = tuple(real(b, f"{path}.betas", 0.0) for b in betas)
    if max(f["betas"]) >= 1.0:
        raise ConfigError(f"field '{path}.betas' must be in [0, 1), got {betas!r}")
    f["eps"] = real(f["eps"], f"{path}.eps", 0.0)
    if not isinstance(f["amsgrad"], bool):
        raise ConfigError(f"field '{path}.amsgrad' must be true or false, got {f['amsgrad']!r}")


def _check_sgd(f: dict, path: str) -> None:
    f["momentum"] = real(f["momentum"], f"{path}.momentum", 0.0)
    f["dampening"] = real(f["dampening"], f"{path}.dampening")
    if not isinstance(f["nesterov"], bool):
        raise ConfigError(f"field '{path}.nesterov' must be true or false, "
                          f"got {f['nesterov']!r}")
    if f["nesterov"] and (f["momentum"] <= 0 or f["dampening"] != 0):
        raise ConfigError(f"field '{path}.nesterov': Nesterov momentum requires a momentum "
                          "> 0 and zero dampening (as torch.optim.SGD)")


def parse_grad_clip(value: Any) -> float | None:
    """``grad_clip``: the max global norm, or None when unset/0 (no clipping)."""
    if value is None or value == 0:
        return None
    return real(value, "grad_clip", 0.0)


def _core(name: str, f: dict, learning_rate: Array) -> optax.GradientTransformation:
    """The optimizer ``name`` (without clipping) at ``learning_rate``."""
    wd = f["weight_decay"]
    decay = [optax.add_decayed_weights(wd)] if wd else []
    if name == "SGD":
        mom = ([torch_momentum(f["momentum"], f["dampening"], f["nesterov"])]
               if f["momentum"] else [])
        return optax.chain(*decay, *mom, optax.scale_by_learning_rate(learning_rate))
    adam = scale_by_torch_adam(*f["betas"], f["eps"], f["amsgrad"])
    steps = [adam, *decay] if name == "AdamW" else [*decay, adam]
    return optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))


def reference_chain(cfg: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """The reference optimizer of ``cfg`` as an optax chain applied leaf by leaf (clip, the
    optimizer, lr injected by ``optax.inject_hyperparams``); :func:`make_optimizer` runs it
    on one flat vector."""
    root = as_dict(cfg, "<config>")
    schedule_cfg = as_dict(root.get("schedule", {}), "schedule")
    name, f = parse_optimizer(schedule_cfg.get("optimizer", {}))
    max_norm = parse_grad_clip(root.get("grad_clip"))
    lr_schedule = make_lr_schedule(schedule_cfg, steps_per_epoch)

    def build(learning_rate):
        clip = [clip_by_global_norm_torch(max_norm)] if max_norm is not None else []
        return optax.chain(*clip, _core(name, f, learning_rate))

    return optax.inject_hyperparams(build)(learning_rate=lr_schedule)


def make_optimizer(cfg: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """The reference optimizer for config ``cfg`` (uses ``cfg.schedule`` and ``cfg.grad_clip``).

    Args:
      cfg: the full config (``ConfigDict`` or mapping).
      steps_per_epoch: optimizer steps per epoch (static; drives the per-epoch scheduler).

    Returns:
      An optax transformation over a pytree of float parameters (:func:`flat` around
      :func:`reference_chain`); ``update(grads, state, params)`` returns updates to add to
      ``params`` (same tree and shapes).
    """
    return flat(reference_chain(cfg, steps_per_epoch))


def current_lr(opt_state: Any) -> Array:
    """float32 ``()``: the lr of the latest update (before any update: the first one's lr)."""
    return opt_state.inner.hyperparams["learning_rate"]


def update_count(opt_state: Any) -> Array:
    """int32 ``()``: number of updates done (the warmup/schedule step counter ``g``)."""
    return opt_state.inner.count
