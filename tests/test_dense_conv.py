"""dense_conv (native / taps / auto) vs lax.conv_general_dilated and its autodiff.

Every branch is checked for the output ``y``, ``dx`` and ``dkernel`` (random cotangent)
against the plain convolution at ``precision=HIGHEST`` and its VJP, with the bounds of
``tests.conv_check.check``: the tap-wise weight gradient (maps of at least
``TAP_GRAD_MIN_POSITIONS`` output positions), the native one (smaller maps), the im2col
forward (few input channels) and the pointwise matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nanodet_jax.models import dense_conv as dc
from nanodet_jax.models.dense_conv import dense_conv, tap_weight_grad
from tests.conv_check import TOL, check, compare, value_and_vjp


def _reference(x, kernel, stride, padding):
    return lax.conv_general_dilated(x, kernel, (stride, stride),
                                    ((padding, padding), (padding, padding)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def _inputs(n, h, w, cin, cout, k, stride, padding, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin),
                         jnp.float32)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    cot = jnp.asarray(rng.standard_normal((n, ho, wo, cout)), jnp.float32)
    return x, kernel, cot


def _compare(impl, n, h, w, cin, cout, k, stride, padding):
    compare(lambda a, b: dense_conv(a, b, stride, padding, impl),
            lambda a, b: _reference(a, b, stride, padding),
            *_inputs(n, h, w, cin, cout, k, stride, padding), scales=("max", "max", "max"))


# (N, H, W, C_in, C_out, k, stride, padding) and which branch it exercises on CPU
CASES = {
    "taps_k3_s1": (2, 32, 32, 16, 24, 3, 1, 1),      # 2048 output positions: tap-wise dk
    "taps_k3_s2": (2, 64, 66, 16, 8, 3, 2, 1),       # stride 2, W odd after padding
    "taps_k5_s1_p0": (1, 50, 48, 12, 16, 5, 1, 0),   # no padding, 46 x 44 outputs
    "native_dk_small_map": (2, 10, 10, 16, 24, 3, 1, 1),  # below the threshold
    "im2col_stem": (2, 20, 20, 3, 8, 3, 2, 1),       # C_in * k * k <= IM2COL_MAX_DEPTH
    "pointwise": (2, 9, 9, 16, 24, 1, 1, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_taps_matches_conv_and_its_autodiff(case):
    _compare("taps", *CASES[case])


def _branch(case: str) -> str:
    """Which form ``dense_conv(..., "taps")`` traces for ``CASES[case]``."""
    n, h, w, cin, cout, k, s, p = CASES[case]
    x, kernel, _ = _inputs(n, h, w, cin, cout, k, s, p)
    jaxpr = str(jax.make_jaxpr(lambda a, b: dense_conv(a, b, s, p, "taps"))(x, kernel))
    return ("custom_vjp" if "custom_vjp_call" in jaxpr else
            "conv" if "conv_general_dilated" in jaxpr else "dot")


def test_branches_are_taken_as_documented():
    assert _branch("taps_k3_s1") == "custom_vjp"
    assert _branch("im2col_stem") == "dot"
    assert _branch("pointwise") == "dot"
    n, h, w, _, _, _, s, _ = CASES["taps_k3_s1"]
    assert n * h * w // (s * s) >= dc.TAP_GRAD_MIN_POSITIONS


@pytest.mark.parametrize("impl", ["native", "auto", None])
def test_native_and_auto_match_conv(impl):
    _compare(impl, *CASES["taps_k3_s2"])


def test_tap_weight_grad_equals_conv_weight_grad_float64():
    """The tap-wise formula itself, in float64 (exact math, not rounding luck)."""
    with jax.enable_x64():
        rng = np.random.default_rng(3)
        x = jnp.asarray(rng.standard_normal((2, 11, 9, 5)))
        g = jnp.asarray(rng.standard_normal((2, 6, 5, 7)))  # k 3, stride 2, padding 1
        kernel = jnp.zeros((3, 3, 5, 7), jnp.float64)
        _, vjp = jax.vjp(lambda k: _reference(x, k, 2, 1), kernel)
        np.testing.assert_allclose(np.asarray(tap_weight_grad(x, g, 3, 3, 2, 1)),
                                   np.asarray(vjp(g)[0]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["pointwise", "im2col_stem"])
def test_matmul_branches_differentiate_without_transposed_cotangent(case):
    """The matmul branches' weight gradient is one 2-D ``x2^T . g2``: the compiled backward of
    conv -> BatchNorm-like statistics holds no (C, N*H'*W') transposed copy of an activation
    or cotangent (XLA:CPU wrote one for an N-D ``jnp.dot``: 2-2.8x slower for the block)."""
    n, h, w, cin, cout, k, s, p = CASES[case]
    x, kernel, cot = _inputs(n, h, w, cin, cout, k, s, p)

    def loss(a, b):
        y = dense_conv(a, b, s, p, "taps")
        mean = y.mean((0, 1, 2))
        return jnp.sum((y - mean) * lax.rsqrt(jnp.square(y - mean).mean((0, 1, 2)) + 1e-5) * cot)

    rows = n * cot.shape[1] * cot.shape[2]
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernel).compile().as_text()
    transposed = [f"f32[{c},{rows}]" for c in (cin * k * k, cout) if f"f32[{c},{rows}]" in hlo]
    assert not transposed, f"transposed (C, rows) arrays in the compiled backward: {transposed}"


def test_grad_under_vmap_and_of_grad():
    x, kernel, _ = _inputs(4, 32, 32, 8, 8, 3, 1, 1, seed=1)

    def loss(impl):
        def inner(a, b):
            return jnp.sum(jnp.sin(dense_conv(a, b, 1, 1, impl)))
        return inner

    # vmapped over pairs of images: each pair is 2 x 32 x 32 = 2048 positions (tap-wise dk)
    xs = x.reshape(2, 2, 32, 32, 8)
    per_pair = lambda f: jax.jit(jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(0, None)))  # noqa: E731
    for g, r in zip(per_pair(loss("taps"))(xs, kernel), per_pair(loss("native"))(xs, kernel)):
        check(g, r, "vmap grad", "max")

    def gg(impl):
        outer = lambda a, b: sum(jnp.sum(t ** 2) for t in jax.grad(loss(impl), (0, 1))(a, b))  # noqa: E731
        return jax.jit(jax.grad(outer, argnums=(0, 1)))(x, kernel)

    for g, r in zip(gg("taps"), gg("native")):
        assert float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) <= TOL


def test_bfloat16_keeps_dtypes_and_is_close():
    x, kernel, cot = _inputs(2, 32, 32, 8, 8, 3, 1, 1, seed=4)
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    y, dx, dk = value_and_vjp(lambda a, b: dense_conv(a, b, 1, 1, "taps"))(
        xb, kb, cot.astype(jnp.bfloat16))
    assert y.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    _, _, dk_ref = value_and_vjp(lambda a, b: _reference(a, b, 1, 1))(
        xb.astype(jnp.float32), kb.astype(jnp.float32), cot.astype(jnp.bfloat16).astype(
            jnp.float32))
    err = float(jnp.max(jnp.abs(dk.astype(jnp.float32) - dk_ref)))
    assert err <= 2e-2 * float(jnp.max(jnp.abs(dk_ref)))


def test_rejects_bad_arguments():
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="kernel"):
        dense_conv(x, jnp.zeros((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="stride"):
        dense_conv(x, jnp.zeros((3, 3, 3, 2)), stride=0)
    with pytest.raises(ValueError, match="padding"):
        dense_conv(x, jnp.zeros((3, 3, 3, 2)), padding=-1)


def test_native_conv_gradients_traces_the_plain_conv_and_is_scoped():
    with dc.native_conv_gradients():
        assert _branch("taps_k3_s1") == "conv"
        assert _branch("im2col_stem") == "dot"  # the 3-channel stem keeps im2col
        with dc.native_conv_gradients(False):
            assert _branch("taps_k3_s1") == "custom_vjp"
        assert _branch("taps_k3_s1") == "conv"
    assert _branch("taps_k3_s1") == "custom_vjp"  # outside: the tap form again


@pytest.mark.parametrize("case", ["taps_k3_s1", "taps_k3_s2", "native_dk_small_map"])
def test_eigen_options_with_native_gradients_match_conv_and_its_autodiff(case):
    """What the train step compiles on CPU: the plain conv's values and gradients."""
    options = dc.eigen_conv_options()
    if jax.default_backend() == "cpu":
        assert options, "this jaxlib's XLA:CPU should accept the Eigen-convolution option"
    n, h, w, cin, cout, k, s, p = CASES[case]
    x, kernel, cot = _inputs(n, h, w, cin, cout, k, s, p)

    def run(a, b, g):
        with dc.native_conv_gradients(bool(options)):
            y, vjp = jax.vjp(lambda u, v: dense_conv(u, v, s, p, "taps"), a, b)
            return (y, *vjp(g))

    got = jax.jit(run, compiler_options=options)(x, kernel, cot)
    ref = value_and_vjp(lambda u, v: _reference(u, v, s, p))(x, kernel, cot)
    for name, g_, r_ in zip(("y", "dx", "dkernel"), got, ref):
        check(g_, r_, name, "max")
