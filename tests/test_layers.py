"""Layer numerics that parity depends on: activation gradients at the kink, normalisation
statistics in the input's precision (float64 stays float64; bf16 is promoted to float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.models.layers import LEAKY_SLOPE, BatchNorm, ConvModule, activation_fn


@pytest.mark.parametrize("name", ["LeakyReLU", "ReLU"])
def test_activation_value_and_gradient_equal_torch_at_the_kink(name):
    import torch
    xs = np.array([-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0], np.float32)
    act = activation_fn(name)
    got_y = np.asarray(act(jnp.asarray(xs)))
    got_g = np.asarray(jax.grad(lambda x: jnp.sum(act(x)))(jnp.asarray(xs)))
    t = torch.tensor(xs, requires_grad=True)
    ref = (torch.nn.LeakyReLU(LEAKY_SLOPE) if name == "LeakyReLU" else torch.nn.ReLU())(t)
    ref.sum().backward()
    np.testing.assert_array_equal(got_y, ref.detach().numpy())
    np.testing.assert_array_equal(got_g, t.grad.numpy())
    if name == "LeakyReLU":
        assert got_g[3] == np.float32(LEAKY_SLOPE)  # exactly 0 takes the negative slope


def _two_pass(x: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    m = x.mean(axes, keepdims=True)
    return m, ((x - m) ** 2).mean(axes, keepdims=True)


def test_batchnorm_statistics_stay_float64():
    x = np.random.default_rng(0).normal(3.0, 1e-3, (2, 5, 5, 4))  # large mean, tiny spread
    bn = BatchNorm(use_running_average=False)
    with jax.enable_x64(True):
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if a.dtype == jnp.float32
                         else a, bn.init(jax.random.key(0), jnp.asarray(x)))
        y, new = bn.apply(v, jnp.asarray(x), mutable=["batch_stats"])
        assert y.dtype == jnp.float64 and new["batch_stats"]["var"].dtype == jnp.float64
        m, var = _two_pass(x, (0, 1, 2))
        np.testing.assert_allclose(np.asarray(y), (x - m) / np.sqrt(var + 1e-5), rtol=1e-12,
                                   atol=1e-12)


def test_batchnorm_bf16_statistics_in_float32():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 8)), jnp.bfloat16)
    bn = BatchNorm(use_running_average=False)
    v = bn.init(jax.random.key(0), x)
    y, new = bn.apply(v, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and new["batch_stats"]["mean"].dtype == jnp.float32


def test_groupnorm_two_pass_statistics():
    """GroupNorm variance is E[(x - E[x])^2] (PyTorch), exact in float64; the one-pass
    E[x^2] - E[x]^2 form loses every digit here (mean 1e4, spread 1e-2)."""
    rng = np.random.default_rng(2)
    x = 1e4 + rng.normal(0.0, 1e-2, (1, 3, 3, 64))
    mod = ConvModule(64, 1, norm="GN", activation=None, gn_groups=32)
    with jax.enable_x64(True):
        v = mod.init(jax.random.key(0), jnp.asarray(x))
        eye = jnp.eye(64, dtype=jnp.float64)[None, None]  # the 1x1 conv passes x through
        v = {"params": {"conv": {"kernel": eye},
                        "gn": jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                           v["params"]["gn"])}}
        y = np.asarray(mod.apply(v, jnp.asarray(x)))
    g = x.reshape(1, 3, 3, 32, 2)
    m, var = _two_pass(g, (1, 2, 4))
    ref = ((g - m) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-9, atol=1e-9)
