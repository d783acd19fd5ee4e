"""Resolving LeakyReLU kink ties between two float32 implementations, for gradient parity.

Why: a few pre-activations of the fixture model (tens out of ~10^7) lie within float32
rounding noise of 0. There the reference (torch, float32) and JAX take LeakyReLU branches
that depend on the last bits of the forward pass. Each such element changes one cotangent by
``0.9 * g``, which moves whole upstream gradient tensors by up to a few percent. Our own
float32 and float64 runs disagree the same way. No float32 implementation can match another
bit for bit there.

What this helper does: it does not loosen the comparison. It identifies which of the
near-zero elements (``|pre| < TAU``) the reference put on the other side of the kink, using
the reference's own BatchNorm/GroupNorm *bias* gradients of that layer. A bias gradient is
the sum over positions of the pre-activation cotangent, so a flip at element i shifts
channel c by exactly ``(slope_new - slope_old) * g_i``. It then moves those elements across
zero by mirroring them (a forward change below ``2 * TAU``; gradient unchanged:
``y + stop_gradient``)
and recomputes. The caller then requires every parameter tensor to match at the issue's
tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanodet_jax.models.layers import LEAKY_SLOPE, BatchNorm

DEBUG = False
TAU = 1e-4          # |pre-activation| below this is within rounding reach of the kink
MAX_FLIPS = 256     # tens are expected (flat image regions flip as groups); more = a bug
EXPLAINED = 0.97    # a flip set must explain >= 97% of a channel's bias-gradient gap
SIGNIFICANT = 1e-5  # ...and the gap must matter: > 1e-5 * ||ref bias grad of that layer||

_NUDGES: list[dict] = []


def followed_by_activation(path: tuple[str, ...]) -> bool:
    """Norm layers of NanoDet-Plus whose output goes straight into the activation."""
    last, parent = path[-1], path[-2]
    if last in ("bn", "gn", "dwnorm", "pwnorm"):
        return True
    if (parent, last) in (("conv1", "1"), ("branch1", "3"), ("branch2", "1"), ("branch2", "6")):
        return True
    return parent in ("primary_conv", "cheap_operation") and last == "1" and path[-3] == "ghost1"


def bias_zero_by_construction(path: tuple[str, ...]) -> bool:
    """Train-mode norm layers feeding conv1x1 -> train-mode BN with no activation between:
    their bias only shifts a channel by a constant, which the next BN removes, so the exact
    gradient is 0 and both implementations hold only rounding noise there."""
    return (path[-2], path[-1]) in (("branch2", "4"), ("branch1", "1"), ("shortcut", "1"))


def _interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, (BatchNorm, nn.GroupNorm)):
        return y
    path = tuple(m.scope.path)
    if not followed_by_activation(path):
        return y
    state = _NUDGES[-1] if _NUDGES else {"nudges": {}, "calls": {}}
    k = state["calls"][path] = state["calls"].get(path, -1) + 1  # shared layers: one per call
    key = "/".join(path) + f"/{k}"
    if key in state["nudges"]:  # +1 / -1: put the element on that side of 0; 0: leave it
        side = state["nudges"][key]
        target = side * jnp.maximum(jnp.abs(y), 1e-20)
        y = y + lax.stop_gradient(jnp.where(side != 0, target - y, 0.0))
    m.sow("intermediates", f"pre{k}", y)
    return m.perturb(f"pre{k}", y)


def instrumented(apply_fn: Callable) -> Callable:
    """Wrap ``apply_fn(variables, *args, **kwargs)`` so norm outputs feeding an activation
    are recorded (``intermediates``), perturbable (``perturbations``) and nudgeable."""

    def fn(variables, nudges, *args, **kwargs):
        _NUDGES.append({"nudges": nudges, "calls": {}})
        try:
            with nn.intercept_methods(_interceptor):
                return apply_fn(variables, *args, **kwargs)
        finally:
            _NUDGES.pop()

    return fn


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(str(getattr(k, "key", k)) for k in p):
            v if isinstance(v, jax.ShapeDtypeStruct) else np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _best_subset(gap: float, preds: np.ndarray) -> tuple[tuple[int, ...], float]:
    """Subset (size <= 2) of candidate effects whose sum best matches ``gap``."""
    best, best_res = (), abs(gap)
    for r in range(1, min(2, len(preds)) + 1):
        for s in itertools.combinations(range(len(preds)), r):
            res = abs(gap - float(preds[list(s)].sum()))
            if res < best_res:
                best, best_res = s, res
    return best, best_res


def _entries(tree) -> dict[tuple[str, ...], list[np.ndarray]]:
    """``{module path: [array per call]}`` from a tree whose leaves sit at ``.../pre{k}``."""
    out: dict[tuple[str, ...], list] = {}
    for path, v in sorted(_flat(tree).items(), key=lambda kv: kv[0]):
        leaf = [i for i, n in enumerate(path) if n.startswith("pre") and n[3:].isdigit()][-1]
        mod, k = path[:leaf], int(path[leaf][3:])
        lst = out.setdefault(mod, [])
        lst.extend([None] * (k + 1 - len(lst)))
        lst[k] = v
    return out


def resolve(run: Callable, ref_bias: dict[tuple[str, ...], np.ndarray],
            pre_shapes: dict[tuple[str, ...], list[tuple[int, ...]]], max_rounds: int = 24):
    """Iteratively match the reference's kink branches.

    ``run(nudges) -> (bias_grads, pre_values, pre_cotangents, *extra)``: ``bias_grads`` keyed by
    norm module path, ``pre_*`` as ``{path: [array per call]}`` (see ``_entries``);
    ``nudges`` maps ``"<path>/<call>"`` to a dense side array of that call's shape (+1/-1:
    force the element to that side of the kink by mirroring it, 0: untouched; same structure
    every call, so a jitted ``run`` compiles once). ``ref_bias[path]`` is the reference's
    bias gradient of that norm layer. Returns ``(n_flips, out, first)``: ``out`` is the last
    result, ``first`` the one without any nudge.
    """
    nud = {(p, k): np.zeros(s, np.float32) for p, shapes in pre_shapes.items()
           for k, s in enumerate(shapes)}
    flips: dict[tuple[str, ...], set[tuple[int, int]]] = {p: set() for p in pre_shapes}

    def call():
        return run({"/".join(p) + f"/{k}": jnp.asarray(v) for (p, k), v in nud.items()})

    out = first = call()
    for _ in range(max_rounds):
        grads, pre, cot = out[:3]
        new = 0
        for path, ys in pre.items():
            if path not in ref_bias or path not in grads:
                continue
            ref = ref_bias[path]
            gap = ref - grads[path]
            scale = SIGNIFICANT * max(float(np.linalg.norm(ref)), 1e-30)
            ch = ys[0].shape[-1]
            # candidates: (call k, flat index i) with |pre| < TAU, per channel
            for c in np.nonzero(np.abs(gap) > scale)[0]:
                # candidates, grouped by identical value: positions in flat image regions
                # carry bit-identical values and cross the kink together
                groups: dict[tuple[int, float], list[tuple[int, int]]] = {}
                info: dict[tuple[int, float], list[float]] = {}
                for k, (y, g) in enumerate(zip(ys, cot[path])):
                    fy, fg = y.reshape(-1, ch)[:, c], g.reshape(-1, ch)[:, c]
                    for r in np.nonzero(np.abs(fy) < TAU)[0]:
                        key = (k, float(fy[r]))
                        groups.setdefault(key, []).append((k, int(r) * ch + int(c)))
                        info.setdefault(key, []).append(float(fg[r]))
                if not groups:
                    continue
                keys = list(groups)
                yv = np.array([kk[1] for kk in keys], np.float64)
                cv = np.array([sum(info[kk]) for kk in keys], np.float64)
                # effect on this channel's bias gradient of toggling each group's branch
                # (toggling a group flipped earlier puts it back)
                slope = np.where(yv >= 0, 1.0, LEAKY_SLOPE)
                preds = (np.where(yv >= 0, LEAKY_SLOPE, 1.0) - slope) * (cv / slope)
                subset, res = _best_subset(float(gap[c]), preds)
                if subset and res <= (1 - EXPLAINED) * abs(float(gap[c])):
                    for j in subset:
                        for k, i in groups[keys[j]]:
                            flips[path] ^= {(k, i)}
                            side = nud[(path, k)].reshape(-1)
                            side[i] = 0.0 if side[i] else (1.0 if yv[j] < 0 else -1.0)
                    new += 1
                    if DEBUG:
                        print("toggle", "/".join(path), int(c),
                              [len(groups[keys[j]]) for j in subset],
                              f"gap {gap[c]:.3e} pred {preds[list(subset)].sum():.3e} "
                              f"|y| {[f'{abs(yv[j]):.1e}' for j in subset]}")
        n = sum(len(s) for s in flips.values())
        if n > MAX_FLIPS:
            raise AssertionError(f"{n} kink flips needed (> {MAX_FLIPS}): not rounding ties")
        if not new:
            break
        out = call()
    return sum(len(s) for s in flips.values()), out, first
