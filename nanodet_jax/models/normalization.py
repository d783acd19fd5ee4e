"""Train-mode BatchNorm and GroupNorm as ops with a hand-written VJP (NHWC).

Both normalise ``x`` over some axes with per-channel affine parameters:

    mean = E[x],  var = E[(x - mean)^2]      (biased, two passes, over the statistic axes)
    y    = (x - mean) * (rsqrt(var + eps) * scale) + bias

* :func:`batch_norm_train` ``(x (..., C), scale (C,), bias (C,), eps)`` -> ``(y, mean (C,),
  var (C,))``: statistics over every axis but the last (the module updates its running
  averages from ``mean`` and ``var``).
* :func:`group_norm` ``(x (N, ..., C), scale (C,), bias (C,), num_groups, eps)`` -> ``y``:
  statistics per sample and group of ``C / num_groups`` consecutive channels (flax's and
  PyTorch's ``GroupNorm``).

Statistics and ``y`` are computed in ``promote(x.dtype, float32)`` and ``y`` is returned in
``x.dtype`` (bf16 activations keep float32 statistics). ``mean`` and ``var`` carry no
gradient (the plain forms, :func:`batch_norm_train_plain` and :func:`group_norm_plain`, return
them through ``stop_gradient``).

Why custom VJPs: autodiff of the plain forms left ~16 kernels per BatchNorm and ~15 per
GroupNorm call in a compiled XLA:CPU train step (the mean, the variance path, the rsqrt and
their transposes each in its own small loop). NanoDet-Plus m has ~140 BatchNorms and 32
GroupNorm calls, so they were about two thirds of the step's kernels, and XLA's compile time
grows with the kernel count. The backward is the closed form (``xhat = (x - mean) * inv``,
``inv = rsqrt(var + eps)``, ``gh = g * scale``, sums over the statistic axes, ``n`` elements
each; ``dscale``, ``dbias`` sum over the axes ``scale`` is broadcast along)

    dbias  = sum(g)             dscale = sum(g * xhat)
    dx     = inv * (gh - sum(gh) / n - xhat * sum(gh * xhat) / n)

which for BatchNorm (statistic axes = broadcast axes) is ``scale * inv * (g - dbias / n -
xhat * dscale / n)``: two reductions and one elementwise pass (GroupNorm: four reductions).
It equals autodiff of the plain form (tested in float64: autodiff's extra term ``sum(x -
mean)`` is exactly zero in exact arithmetic).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _moments(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Mean and biased variance over ``axes`` (kept as size-1 dims), two passes, in at least
    float32."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    return mean, jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)


def _affine(x: Array, mean: Array, inv: Array, scale: Array, bias: Array) -> Array:
    return ((x.astype(mean.dtype) - mean) * (inv * scale) + bias).astype(x.dtype)


def _forward(x, scale, bias, axes, epsilon):
    mean, var = _moments(x, axes)
    inv = lax.rsqrt(var + epsilon)
    return _affine(x, mean, inv, scale, bias), mean, var, inv


def _normalize_plain(x, scale, bias, axes, epsilon):
    y, mean, var, _ = _forward(x, scale, bias, axes, epsilon)
    return y, lax.stop_gradient(mean), lax.stop_gradient(var)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x: Array, scale: Array, bias: Array, axes: tuple[int, ...],
               epsilon: float) -> tuple[Array, Array, Array]:
    """``x`` normalised over ``axes``; ``scale``, ``bias`` broadcast to ``x`` (size-1 dims
    where they are shared). Returns ``(y, mean, var)``, statistics with ``axes`` kept."""
    y, mean, var, _ = _forward(x, scale, bias, axes, epsilon)
    return y, mean, var


def _fwd(x, scale, bias, axes, epsilon):
    y, mean, var, inv = _forward(x, scale, bias, axes, epsilon)
    return (y, mean, var), (x, mean, inv, scale, bias)


def _bwd(axes, epsilon, res, cts):
    del epsilon
    x, mean, inv, scale, bias = res
    g = cts[0].astype(mean.dtype)  # mean and var carry no gradient
    xhat = (x.astype(mean.dtype) - mean) * inv
    shared = tuple(i for i in range(x.ndim) if scale.shape[i] == 1)
    dbias = jnp.sum(g, axis=shared, keepdims=True)
    dscale = jnp.sum(g * xhat, axis=shared, keepdims=True)  # the reduction's own output
    n = math.prod(x.shape[i] for i in axes)
    s = scale.astype(mean.dtype)
    if shared == tuple(axes):  # BatchNorm: the dx sums are dbias and dscale times scale
        dx = (s * inv) * (g - dbias / n - xhat * (dscale / n))
    else:
        gh = g * s
        sum_gh = jnp.sum(gh, axis=axes, keepdims=True)
        sum_ghx = jnp.sum(gh * xhat, axis=axes, keepdims=True)
        dx = inv * (gh - sum_gh / n - xhat * (sum_ghx / n))
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_normalize.defvjp(_fwd, _bwd)


def _bn_args(x: Array, scale: Array, bias: Array):
    c = x.shape[-1]
    shape = (1,) * (x.ndim - 1) + (c,)
    return scale.reshape(shape), bias.reshape(shape), tuple(range(x.ndim - 1))


def batch_norm_train(x: Array, scale: Array, bias: Array,
                     epsilon: float) -> tuple[Array, Array, Array]:
    """Train-mode BatchNorm of ``x (..., C)`` with ``scale``, ``bias (C,)``: ``(y (..., C) in
    x.dtype, mean (C,), var (C,))``, biased variance (see the module docstring)."""
    s, b, axes = _bn_args(x, scale, bias)
    y, mean, var = _normalize(x, s, b, axes, epsilon)
    return y, mean.reshape(-1), var.reshape(-1)


def batch_norm_train_plain(x: Array, scale: Array, bias: Array,
                           epsilon: float) -> tuple[Array, Array, Array]:
    """The autodiff form of :func:`batch_norm_train` (the reference for its tests)."""
    s, b, axes = _bn_args(x, scale, bias)
    y, mean, var = _normalize_plain(x, s, b, axes, epsilon)
    return y, mean.reshape(-1), var.reshape(-1)


def _gn_args(x: Array, scale: Array, bias: Array, num_groups: int):
    c = x.shape[-1]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"GroupNorm: {num_groups} groups do not divide {c} channels")
    grouped = (x.shape[0], math.prod(x.shape[1:-1]), num_groups, c // num_groups)
    shape = (1, 1, num_groups, c // num_groups)
    return x.reshape(grouped), scale.reshape(shape), bias.reshape(shape), (1, 3)


def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
    """GroupNorm of ``x (N, ..., C)`` with ``scale``, ``bias (C,)``: ``y`` like ``x``,
    statistics per sample over the spatial axes and ``C / num_groups`` channels."""
    xg, s, b, axes = _gn_args(x, scale, bias, num_groups)
    return _normalize(xg, s, b, axes, epsilon)[0].reshape(x.shape)


def group_norm_plain(x: Array, scale: Array, bias: Array, num_groups: int,
                     epsilon: float) -> Array:
    """The autodiff form of :func:`group_norm` (the reference for its tests)."""
    xg, s, b, axes = _gn_args(x, scale, bias, num_groups)
    return _normalize_plain(xg, s, b, axes, epsilon)[0].reshape(x.shape)
