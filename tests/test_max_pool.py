"""The backbone's max pool (elementwise backward) against PyTorch's ``max_pool2d(3, 2, 1)``
and against autodiff of ``lax.reduce_window``: value and gradient, ties included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.max_pool import value_and_vjp
from nanodet_jax.models.max_pool import _reduce_window_pool, max_pool_3x3_s2

SHAPES = [(2, 7, 6, 3), (2, 8, 8, 4), (1, 5, 9, 2)]  # odd and even H, W


def _inputs(shape, ties: bool, dtype=np.float64):
    rng = np.random.default_rng(sum(shape) + ties)
    # ties: values from {0, 1, 2} so most windows hold their maximum more than once
    x = rng.integers(0, 3, shape) if ties else rng.normal(size=shape)
    b, h, w, c = shape
    g = rng.normal(size=(b, (h + 1) // 2, (w + 1) // 2, c))
    return x.astype(dtype), g.astype(dtype)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_value_and_gradient_equal_torch(shape, ties):
    import torch
    x, g = _inputs(shape, ties)
    with jax.enable_x64(True):
        y, dx = value_and_vjp(max_pool_3x3_s2)(jnp.asarray(x), jnp.asarray(g))
        y, dx = np.asarray(y), np.asarray(dx)
    assert y.dtype == dx.dtype == np.float64
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ref = torch.nn.functional.max_pool2d(t, 3, 2, 1)
    ref.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(y, ref.detach().numpy().transpose(0, 2, 3, 1))
    # each input position sums at most 4 routed cotangents: float64 rounding only
    np.testing.assert_allclose(dx, t.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-12)
    if ties:  # the first maximum takes the cotangent: a tie never splits or duplicates it
        assert np.count_nonzero(dx) <= g.size
        np.testing.assert_allclose(dx.sum(), g.sum(), rtol=1e-12)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_autodiff_of_reduce_window_float32(shape, ties):
    x, g = _inputs(shape, ties, np.float32)
    y, dx = value_and_vjp(max_pool_3x3_s2)(x, g)
    y_ref, dx_ref = value_and_vjp(_reduce_window_pool)(x, g)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    # the same cotangents routed, summed in another order: <= 2 float32 roundings of |g| sums
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=0,
                               atol=1e-6 * (1 + 4 * np.abs(g).max()))


def test_keeps_low_precision_dtype():
    x, g = _inputs((2, 8, 8, 4), False, np.float32)
    y, dx = value_and_vjp(max_pool_3x3_s2)(jnp.asarray(x, jnp.bfloat16),
                                           jnp.asarray(g, jnp.bfloat16))
    assert y.dtype == dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(_reduce_window_pool(jnp.asarray(x, jnp.bfloat16)),
                                             np.float32))
