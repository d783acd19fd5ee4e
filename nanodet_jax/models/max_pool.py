"""The backbone's 3x3 / stride 2 / pad 1 max pool (PyTorch ``MaxPool2d(3, 2, 1)``), NHWC,
with a backward made of elementwise ops.

Forward: ``y[n, h, w, c] = max_{i, j < 3} x_pad[n, 2h + i, 2w + j, c]`` with ``-inf``
padding (``lax.reduce_window``).

Backward: the cotangent of each output goes to the *first* window position (row-major
``(i, j)`` order) that holds the maximum: PyTorch's rule (its CPU kernel keeps the first
index on ties) and what autodiff of ``reduce_window`` (XLA ``select-and-scatter`` with a
``>=`` select) computes. XLA:CPU lowers ``select-and-scatter`` to an index iota, a variadic
``reduce-window`` and a scatter over the padded input; here the nine taps are compared with
``y`` in order and their masked cotangents are interleaved back with strided pads, which XLA
fuses into a few elementwise loops: forward + backward 2.7-3.2x faster on a 2-core CPU
(``scripts/benchmark.py --suite max_pool``: 47 -> 14 ms for the synthetic config's batch 16,
139 -> 48 ms for m_320 and 229 -> 86 ms for m_416 at batch 8). Tested equal to PyTorch's
and to autodiff of ``reduce_window`` in ``tests/test_max_pool.py``.

A ``NaN`` in a window makes its output ``NaN`` and routes no gradient (PyTorch routes it to
the ``NaN``); the train step skips non-finite updates anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_K, _S, _P = 3, 2, 1  # kernel, stride, padding


def _reduce_window_pool(x: Array) -> Array:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, _K, _K, 1),
                             (1, _S, _S, 1), ((0, 0), (_P, _P), (_P, _P), (0, 0)))


def _padded_taps(x: Array, ho: int, wo: int) -> tuple[Array, list[tuple[int, int, Array]]]:
    """``x`` padded with ``-inf`` (N, H+2, W+2, C) and its nine strided windows' taps
    ``(i, j, x_pad[:, i::2, j::2][:, :ho, :wo])`` in row-major order."""
    xp = jnp.pad(x, ((0, 0), (_P, _P), (_P, _P), (0, 0)), constant_values=-jnp.inf)
    n, c = x.shape[0], x.shape[3]
    taps = [(i, j, lax.slice(xp, (0, i, j, 0),
                             (n, i + _S * (ho - 1) + 1, j + _S * (wo - 1) + 1, c),
                             (1, _S, _S, 1)))
            for i in range(_K) for j in range(_K)]
    return xp, taps


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
    """3x3 / stride 2 / pad 1 max pool: x (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C)."""
    return _reduce_window_pool(x)


def _fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    y = _reduce_window_pool(x)
    return y, (x, y)


def _bwd(res: tuple[Array, Array], g: Array) -> tuple[Array]:
    x, y = res
    _, ho, wo, _ = y.shape
    xp, taps = _padded_taps(x, ho, wo)
    hp, wp = xp.shape[1], xp.shape[2]
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    for i, j, tap in taps:
        first = (tap == y) & ~taken
        taken = taken | first
        # place the tap's (ho, wo) values at rows i, i+2, ... and columns j, j+2, ... of x_pad
        dxp = dxp + lax.pad(jnp.where(first, g, zero), zero,
                            ((0, 0, 0), (i, hp - i - _S * (ho - 1) - 1, _S - 1),
                             (j, wp - j - _S * (wo - 1) - 1, _S - 1), (0, 0, 0)))
    return (dxp[:, _P:hp - _P, _P:wp - _P].astype(x.dtype),)


max_pool_3x3_s2.defvjp(_fwd, _bwd)
