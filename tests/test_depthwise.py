"""depthwise_conv (native / taps / auto) vs lax.conv_general_dilated(feature_group_count=C).

Reference: the grouped convolution at ``precision=HIGHEST`` (float32), its VJP for gradients.
Asserted for the output ``y``, ``dx`` and ``dkernel`` (random cotangent):
* relative norm ``||d|| / ||ref|| <= 1e-5`` for all three;
* elementwise ``max|d| <= 1e-5 * (1 + |ref|)`` for ``y`` and ``dx`` (sums of <= k*k terms);
* for ``dkernel`` (sums of N*H'*W' terms, where float32 rounding of the reference itself is
  ~4e-5 relative elementwise against a float64 sum) elementwise
  ``max|d| <= 1e-5 * (1 + max|ref|)``.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nanodet_jax.models.depthwise import depthwise_conv, resolve_impl
from tests.conv_check import TOL, compare
from tests.conv_check import check as _check


def _reference(x, kernel, stride, padding):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        precision=lax.Precision.HIGHEST)


def _inputs(n, h, w, c, kh, kw, stride, padding, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kh, kw, 1, c)), jnp.float32)
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    cot = jnp.asarray(rng.standard_normal((n, ho, wo, c)), jnp.float32)
    return x, kernel, cot


def _compare(impl, n, h, w, c, kh, kw, stride, padding):
    compare(lambda a, b: depthwise_conv(a, b, stride, padding, impl),
            lambda a, b: _reference(a, b, stride, padding),
            *_inputs(n, h, w, c, kh, kw, stride, padding), scales=("elem", "elem", "max"))


# (N, H, W, C, k, stride): every k in {3, 5} x stride in {1, 2} x size in {7x9, 10x10, 13x13,
# 40x40}; (batch, C) cycles through {1, 2} x {24, 96} (rotated per (k, stride)); padding k // 2.
_NC = ((1, 24), (2, 96), (2, 24), (1, 96))
GRID = [(*_NC[(i + i // 4) % 4][:1], h, w, _NC[(i + i // 4) % 4][1], k, s)
        for i, (k, s, (h, w)) in enumerate(itertools.product(
            (3, 5), (1, 2), ((7, 9), (10, 10), (13, 13), (40, 40))))]


@pytest.mark.parametrize("n,h,w,c,k,s", GRID,
                         ids=[f"n{n}_{h}x{w}_c{c}_k{k}_s{s}" for n, h, w, c, k, s in GRID])
def test_taps_matches_grouped_conv(n, h, w, c, k, s):
    _compare("taps", n, h, w, c, k, k, s, k // 2)


@pytest.mark.parametrize("impl,k,s", [("native", 5, 2), ("auto", 3, 1), (None, 5, 2)])
def test_native_and_auto_match_grouped_conv(impl, k, s):
    _compare(impl, 2, 13, 11, 24, k, k, s, k // 2)


@pytest.mark.parametrize("n,h,w,c,kh,kw,s,p", [
    (1, 8, 11, 8, 3, 3, 2, 0),   # no padding, even/odd sizes
    (2, 9, 6, 8, 5, 5, 1, 3),    # padding > k // 2
    (1, 12, 9, 8, 5, 5, 2, 4),   # padding > k - 1 with stride 2
    (2, 10, 7, 8, 3, 5, 2, 2),   # non-square kernel
    (1, 11, 11, 8, 3, 3, 3, 1),  # stride 3
    (1, 5, 5, 8, 5, 5, 2, 0),    # single output pixel
])
def test_taps_general_padding_and_stride(n, h, w, c, kh, kw, s, p):
    _compare("taps", n, h, w, c, kh, kw, s, p)


def test_auto_resolves_by_backend():
    expected = "taps" if jax.default_backend() == "cpu" else "native"
    assert resolve_impl(None) == resolve_impl("auto") == expected
    assert resolve_impl("native") == "native" and resolve_impl("taps") == "taps"
    with pytest.raises(ValueError):
        resolve_impl("im2col")


def test_vmap_grad_matches():
    x, kernel, _ = _inputs(4, 9, 10, 8, 3, 3, 2, 1, seed=1)
    xs, ks = x.reshape(2, 2, 9, 10, 8), jnp.stack([kernel, 2.0 * kernel])

    def loss(impl):
        f = jax.vmap(lambda a, b: depthwise_conv(a, b, 2, 1, impl))
        return jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1)))

    for g, r in zip(loss("taps")(xs, ks), loss("native")(xs, ks)):
        _check(g, r, "vmap grad", "max")


def test_checkpointed_grad_matches():
    x, kernel, cot = _inputs(2, 10, 9, 8, 5, 5, 2, 2, seed=6)

    def grad(impl):
        f = jax.checkpoint(lambda a, b: depthwise_conv(a, b, 2, 2, impl))
        return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * cot), argnums=(0, 1)))(x, kernel)

    for name, g, r, scale in zip(("dx", "dkernel"), grad("taps"), grad("native"), ("elem", "max")):
        _check(g, r, name, scale)


class _DWBlock(nn.Module):
    """Tiny Linen block: depthwise conv -> LeakyReLU -> depthwise conv (stride 2)."""

    impl: str

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        init = nn.initializers.normal(1.0)
        k1 = self.param("dw1", init, (5, 5, 1, c))
        k2 = self.param("dw2", init, (3, 3, 1, c))
        y = nn.leaky_relu(depthwise_conv(x, k1, 1, 2, self.impl), 0.1)
        return depthwise_conv(y, k2, 2, 1, self.impl)


def test_flax_module_grad():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 12, 12, 16)), jnp.float32)
    params = _DWBlock("native").init(jax.random.PRNGKey(0), x)

    def grads(impl):
        def loss(p, xx):
            return jnp.mean(_DWBlock(impl).apply(p, xx) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (v_t, (gp_t, gx_t)), (v_n, (gp_n, gx_n)) = grads("taps"), grads("native")
    assert abs(float(v_t) - float(v_n)) <= TOL * abs(float(v_n))
    for name in ("dw1", "dw2"):
        _check(gp_t["params"][name], gp_n["params"][name], name, "max")
    _check(gx_t, gx_n, "dx", "elem")


def test_second_order_reverse_and_no_forward_mode():
    x, kernel, _ = _inputs(2, 9, 7, 5, 3, 3, 2, 1, seed=3)

    def gg(impl):
        def inner(a, b):
            return jnp.sum(jnp.sin(depthwise_conv(a, b, 2, 1, impl)))
        outer = lambda a, b: sum(jnp.sum(t ** 2) for t in jax.grad(inner, (0, 1))(a, b))  # noqa: E731
        return jax.jit(jax.grad(outer, argnums=(0, 1)))(x, kernel)

    for g, r in zip(gg("taps"), gg("native")):
        rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
        assert rel <= TOL, rel
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda a: depthwise_conv(a, kernel, 2, 1, "taps"), (x,), (x,))


def test_bfloat16_runs_and_is_close():
    x, kernel, cot = _inputs(1, 10, 10, 8, 3, 3, 1, 1, seed=4)
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    y = jax.jit(lambda a, b: depthwise_conv(a, b, 1, 1, "taps"))(xb, kb)
    assert y.dtype == jnp.bfloat16
    ref = _reference(xb.astype(jnp.float32), kb.astype(jnp.float32), 1, 1)
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)))
    assert err <= 2e-2 * float(jnp.max(jnp.abs(ref)))
    dx, dk = jax.grad(lambda a, b: jnp.sum(depthwise_conv(a, b, 1, 1, "taps").astype(jnp.float32)),
                      argnums=(0, 1))(xb, kb)
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16


def test_nonfinite_inputs_propagate_like_native():
    x, kernel, _ = _inputs(1, 9, 9, 4, 3, 3, 1, 1, seed=5)
    x = x.at[0, 2, 3, 0].set(jnp.inf).at[0, 6, 6, 1].set(jnp.nan).at[0, 2, 4, 0].set(-jnp.inf)
    for s in (1, 2):
        got = np.asarray(jax.jit(lambda a, b, s=s: depthwise_conv(a, b, s, 1, "taps"))(x, kernel))
        ref = np.asarray(_reference(x, kernel, s, 1))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
        fin = np.isfinite(ref)
        assert fin.any() and np.abs(got[fin] - ref[fin]).max() <= TOL * (1 + np.abs(ref[fin]).max())


def test_rejects_bad_arguments():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 2)))
    with pytest.raises(ValueError):
        depthwise_conv(x, jnp.zeros((5, 5, 1, 3)), padding=0)
    with pytest.raises(ValueError):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 3)), padding=-1)
