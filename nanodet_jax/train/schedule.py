"""Learning rate of the reference trainer as a pure function of the optimizer step counter.

Reference behaviour (``nanodet/trainer/task.py`` under PyTorch Lightning 1.9). Notation:
``g`` = optimizer step counter (0 for the first update), ``S`` = steps per epoch (``drop_last``),
``W`` = ``schedule.warmup.steps``, ``r`` = ``schedule.warmup.ratio``, ``base`` =
``schedule.optimizer.lr`` (the param group's ``initial_lr``):

* before each update with ``g <= W`` the warmup overwrites the group lr with ``base * k(g)``:
  ``constant`` k = r; ``linear`` k = 1 - (1 - g/W)(1 - r); ``exp`` k = r ** (1 - g/W);
* any other update uses the group lr as it is;
* the ``torch.optim.lr_scheduler`` class named by ``schedule.lr_schedule.name`` steps once at
  every epoch end (after update ``(e+1)S - 1``), during warmup too. All four supported
  schedulers are PyTorch's *recursive* forms: the new lr is computed from the group lr of that
  moment, i.e. from the warmup value when the epoch ended inside the warmup.

Consequences: the updates ``W < g < (e+1)S`` of the epoch ``e`` in which the warmup ends use
``base * k(W)`` (``base`` for linear/exp, ``base * r`` for constant), and the recursion
continues from that value. With COCO (S = 1232, W = 500) this is spec §13's closed-form
cosine; when the warmup spans epoch ends (tiny datasets) the schedule is shifted.
``warmup.steps: 0`` or ``warmup.name: null`` means no warmup (the reference would divide by
zero for linear/exp and apply ``r`` at step 0 for constant).

Evaluation uses two tables computed at build time in float64 with the reference's own
expressions -- the warmup lr of steps ``0..W`` and the post-warmup lr of epochs
``0..total_epochs`` -- stored in float32, so every value is the float32 rounding of the
reference's double lr. Steps of epochs past ``total_epochs`` keep the last table entry.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax.config import REQUIRED, ConfigError

Array = jax.Array
Schedule = Callable[[Array], Array]
SchedulerStep = Callable[[float, int], float]  # (group lr, new last_epoch) -> new group lr

WARMUPS = ("constant", "linear", "exp")
# torch.optim.lr_scheduler constructor fields (besides optimizer / last_epoch) and defaults
SCHEDULERS: dict[str, dict[str, Any]] = {
    "CosineAnnealingLR": {"T_max": REQUIRED, "eta_min": 0.0},
    "MultiStepLR": {"milestones": REQUIRED, "gamma": 0.1},
    "StepLR": {"step_size": REQUIRED, "gamma": 0.1},
    "ExponentialLR": {"gamma": REQUIRED},
}


# ---------------------------------------------------------------------------------------------
# config reading (shared with nanodet_jax.train.optim)


def as_dict(node: Any, path: str) -> dict:
    """A config node (``ConfigDict`` or mapping) as a plain dict; ``ConfigError`` otherwise."""
    if hasattr(node, "to_dict"):
        node = node.to_dict()
    if not isinstance(node, Mapping):
        raise ConfigError(f"field '{path}' must be a mapping, got {node!r}")
    return dict(node)


def choice(value: Any, path: str, accepted: tuple) -> Any:
    """``value`` if it is one of ``accepted``; else a ``ConfigError`` naming the field."""
    if value not in accepted:
        raise ConfigError(f"field '{path}' = {value!r} is not supported "
                          f"(accepted: {', '.join(repr(a) for a in accepted)})")
    return value


def fields(node: dict, path: str, owner: str, spec: dict[str, Any],
           ignore: tuple[str, ...] = ("name",)) -> dict:
    """The fields of ``spec`` read from ``node`` with defaults filled.

    ``spec`` maps each accepted field to its default or ``REQUIRED``; keys in ``ignore`` are
    skipped. Unknown or missing fields raise ``ConfigError`` naming ``path.field``.
    """
    unknown = sorted(k for k in node if k not in spec and k not in ignore)
    if unknown:
        raise ConfigError(f"unknown field '{path}.{unknown[0]}' for {owner} "
                          f"(accepted: {', '.join(sorted(spec))})")
    missing = [k for k, v in spec.items() if v is REQUIRED and k not in node]
    if missing:
        raise ConfigError(f"missing field '{path}.{missing[0]}' (required by {owner})")
    return {k: node.get(k, v) for k, v in spec.items()}


def real(value: Any, path: str, low: float | None = None) -> float:
    """``value`` as a float (bools refused), at least ``low`` when given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ConfigError(f"field '{path}' must be a finite number{bound}, got {value!r}")
    return float(value)


def integer(value: Any, path: str, low: int) -> int:
    """``value`` as an int (bools and floats refused), at least ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"field '{path}' must be an integer >= {low}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# warmup


@dataclass(frozen=True)
class Warmup:
    """Parsed ``schedule.warmup``; ``name`` None means no warmup (then ``steps`` is 0)."""

    name: str | None
    steps: int
    ratio: float


def parse_warmup(node: Any) -> Warmup:
    """Validate ``schedule.warmup {name, steps, ratio}``."""
    path = "schedule.warmup"
    f = fields(as_dict(node, path), path, "warmup",
               {"name": None, "steps": 0, "ratio": None}, ignore=())
    name = choice(f["name"], f"{path}.name", (None, *WARMUPS))
    steps = integer(f["steps"], f"{path}.steps", 0)
    if name is None or steps == 0:
        return Warmup(None, 0, 1.0)
    if f["ratio"] is None:
        raise ConfigError(f"missing field '{path}.ratio' (required by the {name!r} warmup)")
    return Warmup(name, steps, real(f["ratio"], f"{path}.ratio", 0.0))


def warmup_factor(warmup: Warmup, g: int) -> float:
    """The reference's factor ``k(g)`` (float64) for a step ``0 <= g <= warmup.steps``."""
    if warmup.name == "constant":
        return warmup.ratio
    if warmup.name == "linear":
        return 1 - (1 - g / warmup.steps) * (1 - warmup.ratio)
    return warmup.ratio ** (1 - g / warmup.steps)


# ---------------------------------------------------------------------------------------------
# per-epoch schedulers (torch.optim.lr_scheduler recursive forms)


def parse_lr_schedule(node: Any) -> tuple[str, dict]:
    """Validate ``schedule.lr_schedule``; returns ``(name, constructor fields)``."""
    path = "schedule.lr_schedule"
    d = as_dict(node, path)
    name = choice(d.get("name"), f"{path}.name", tuple(SCHEDULERS))
    f = fields(d, path, name, SCHEDULERS[name])
    if "T_max" in f:
        f["T_max"] = integer(f["T_max"], f"{path}.T_max", 1)
    if "step_size" in f:
        f["step_size"] = integer(f["step_size"], f"{path}.step_size", 1)
    if "milestones" in f:
        ms = f["milestones"]
        if not isinstance(ms, (list, tuple)):
            raise ConfigError(f"field '{path}.milestones' must be a list of epochs, got {ms!r}")
        f["milestones"] = [integer(m, f"{path}.milestones", 0) for m in ms]
    if "eta_min" in f:
        f["eta_min"] = real(f["eta_min"], f"{path}.eta_min")
    if "gamma" in f:
        f["gamma"] = real(f["gamma"], f"{path}.gamma")
    return name, f


def scheduler_step(name: str, f: dict, base_lr: float) -> SchedulerStep:
    """PyTorch's ``get_lr`` of scheduler ``name``: ``(group lr, new last_epoch >= 1) -> lr``.

    Expressions are written in torch's operation order so the float64 results are identical.
    """
    if name == "CosineAnnealingLR":
        t_max, eta = f["T_max"], f["eta_min"]

        def cosine(lr: float, epoch: int) -> float:
            if (epoch - 1 - t_max) % (2 * t_max) == 0:
                return lr + (base_lr - eta) * (1 - math.cos(math.pi / t_max)) / 2
            return ((1 + math.cos(math.pi * epoch / t_max))
                    / (1 + math.cos(math.pi * (epoch - 1) / t_max)) * (lr - eta) + eta)
        return cosine
    if name == "MultiStepLR":
        counts, gamma = Counter(f["milestones"]), f["gamma"]
        return lambda lr, epoch: lr * gamma ** counts[epoch] if epoch in counts else lr
    if name == "StepLR":
        size, gamma = f["step_size"], f["gamma"]
        return lambda lr, epoch: lr * gamma if epoch % size == 0 else lr
    gamma = f["gamma"]
    return lambda lr, epoch: lr * gamma


# ---------------------------------------------------------------------------------------------
# tables and the schedule


def warmup_lrs(warmup: Warmup, base_lr: float) -> np.ndarray:
    """float64 ``(W + 1,)``: the lr the reference applies at steps ``0..W`` (``(0,)`` if none)."""
    if warmup.name is None:
        return np.zeros((0,), np.float64)
    return np.array([base_lr * warmup_factor(warmup, g) for g in range(warmup.steps + 1)])


def epoch_lrs(warmup: Warmup, base_lr: float, step: SchedulerStep, steps_per_epoch: int,
              total_epochs: int) -> np.ndarray:
    """float64 ``(total_epochs + 1,)``: the lr of the updates ``g > W`` in each epoch.

    Simulates the reference's group lr: at each epoch end the scheduler recurses from the group
    lr of that moment (the last warmup value while the epoch still had warmup steps).
    """
    w = warmup.steps if warmup.name is not None else -1
    lr, table = base_lr, []
    for e in range(total_epochs + 1):
        first, last = e * steps_per_epoch, (e + 1) * steps_per_epoch - 1
        if first <= w:  # this epoch has warmup steps: the group lr is the last overwrite
            table.append(base_lr * warmup_factor(warmup, w))
            at_end = base_lr * warmup_factor(warmup, min(w, last))
        else:
            table.append(lr)
            at_end = lr
        lr = step(at_end, e + 1)
    return np.array(table, np.float64)


def lr_tables(schedule_cfg: Any, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(warmup_lrs (W+1,), epoch_lrs (total_epochs+1,))`` in float64 for ``schedule_cfg``."""
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
    cfg = as_dict(schedule_cfg, "schedule")
    opt = as_dict(cfg.get("optimizer", {}), "schedule.optimizer")
    if "lr" not in opt:
        raise ConfigError("missing field 'schedule.optimizer.lr'")
    base_lr = real(opt["lr"], "schedule.optimizer.lr", 0.0)
    total = integer(cfg.get("total_epochs"), "schedule.total_epochs", 1)
    warmup = parse_warmup(cfg.get("warmup", {}))
    name, f = parse_lr_schedule(cfg.get("lr_schedule", {}))
    step = scheduler_step(name, f, base_lr)
    return (warmup_lrs(warmup, base_lr),
            epoch_lrs(warmup, base_lr, step, steps_per_epoch, total))


def make_lr_schedule(schedule_cfg: Any, steps_per_epoch: int) -> Schedule:
    """The reference lr as an optax-style schedule of the optimizer step counter.

    Args:
      schedule_cfg: the ``schedule`` config node (``optimizer.lr``, ``warmup``,
        ``lr_schedule``, ``total_epochs``).
      steps_per_epoch: optimizer steps per epoch (static).

    Returns:
      ``schedule(step)``: ``step`` integer array of any shape (0 for the first update) ->
      float32 lr of the same shape. Pure and jit-traceable (the tables are constants).
    """
    warm64, epochs64 = lr_tables(schedule_cfg, steps_per_epoch)
    warm, epochs = warm64.astype(np.float32), epochs64.astype(np.float32)
    last_warm, last_epoch = warm.shape[0] - 1, epochs.shape[0] - 1

    def schedule(step: Array) -> Array:
        step = jnp.asarray(step)
        e = jnp.clip(step // steps_per_epoch, 0, last_epoch)
        lr = jnp.asarray(epochs)[e]
        if last_warm < 0:
            return lr
        w = jnp.asarray(warm)[jnp.clip(step, 0, last_warm)]
        return jnp.where(step <= last_warm, w, lr)

    return schedule
