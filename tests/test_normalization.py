"""The normalisation ops with hand-written VJPs equal autodiff of their plain forms.

Bounds:

* float64: values and gradients (x, scale, bias) ``<= 1e-12`` relative to ``1 + |ref|``
  (the closed-form backward drops autodiff's ``sum(x - mean)`` term, zero up to round-off).
* float32 against the float64 plain form: ``<= 2e-5`` relative to ``1 + |ref|`` (sums of
  ~1e3 float32 terms in any order, on any instruction set, stay far below that).
* the GroupNorm module equals flax's ``nn.GroupNorm(use_fast_variance=False)`` (the layer
  it replaces, same parameter names) to the same float32 bound, values and gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.models.layers import GroupNorm
from nanodet_jax.models.normalization import (
    batch_norm_train,
    batch_norm_train_plain,
    group_norm,
    group_norm_plain,
)

EPS = 1e-5
# name -> (op, plain form, x shape, extra args)
CASES = {
    "bn_nhwc": (batch_norm_train, batch_norm_train_plain, (3, 5, 7, 8), ()),
    "bn_rank2": (batch_norm_train, batch_norm_train_plain, (9, 6), ()),
    "bn_one_pixel": (batch_norm_train, batch_norm_train_plain, (4, 1, 1, 5), ()),
    "gn_32_groups": (group_norm, group_norm_plain, (2, 4, 3, 64), (32,)),
    "gn_one_group": (group_norm, group_norm_plain, (3, 5, 2, 6), (1,)),
    "gn_per_channel": (group_norm, group_norm_plain, (2, 3, 3, 4), (4,)),
}


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(2.0, 3.0, shape)  # an offset mean: the centring matters
    scale, bias = rng.normal(1.0, 0.5, c), rng.normal(0.0, 0.5, c)
    ct = rng.normal(size=shape)
    return [jnp.asarray(a, dtype) for a in (x, scale, bias, ct)]


def _y_only(fn, args):
    """``(x, scale, bias) -> y`` of a norm op (batch_norm_train also returns statistics)."""
    def y(x, scale, bias):
        out = fn(x, scale, bias, *args, EPS)
        return out[0] if isinstance(out, tuple) else out
    return y


def _value_and_vjp(fn, x, scale, bias, ct, args):
    out = fn(x, scale, bias, *args, EPS)
    _, vjp = jax.vjp(_y_only(fn, args), x, scale, bias)
    return [np.asarray(a, np.float64) for a in (*(out if isinstance(out, tuple) else (out,)),
                                                *vjp(ct))]


def _assert_close(got, ref, bound, what):
    for i, (g, r) in enumerate(zip(got, ref)):
        err = np.max(np.abs(g - r) / (1 + np.abs(r)))
        assert err <= bound, f"{what}: output {i} off by {err:.3g} (bound {bound})"


@pytest.mark.parametrize("case", CASES)
def test_custom_vjp_equals_autodiff_float64(case):
    op, plain, shape, args = CASES[case]
    with jax.enable_x64(True):
        inputs = _inputs(shape, jnp.float64)
        got = _value_and_vjp(jax.jit(op, static_argnums=tuple(range(3, 4 + len(args)))),
                             *inputs, args)
        ref = _value_and_vjp(plain, *inputs, args)
    _assert_close(got, ref, 1e-12, case)


@pytest.mark.parametrize("case", CASES)
def test_custom_vjp_float32_within_bound_of_float64(case):
    op, plain, shape, args = CASES[case]
    got = _value_and_vjp(op, *_inputs(shape, jnp.float32), args)
    with jax.enable_x64(True):
        ref = _value_and_vjp(plain, *_inputs(shape, jnp.float64), args)
    _assert_close(got, ref, 2e-5, case)


@pytest.mark.parametrize("case", ["bn_nhwc", "gn_32_groups"])
def test_bf16_input_float32_statistics(case):
    op, _, shape, args = CASES[case]
    x, scale, bias, ct = _inputs(shape, jnp.float32)
    xb = x.astype(jnp.bfloat16)
    out = op(xb, scale, bias, *args, EPS)
    y = out[0] if isinstance(out, tuple) else out
    assert y.dtype == jnp.bfloat16
    if isinstance(out, tuple):
        assert out[1].dtype == out[2].dtype == jnp.float32
    _, vjp = jax.vjp(_y_only(op, args), xb, scale, bias)
    dx, ds, db = vjp(ct.astype(jnp.bfloat16))
    assert (dx.dtype, ds.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    # float32 on the bf16-rounded input: y differs by the bf16 rounding of the output
    ref = _value_and_vjp(op, xb.astype(jnp.float32), scale, bias, ct, args)
    assert np.max(np.abs(np.asarray(y, np.float32) - ref[0])) < 0.1


def test_statistics_carry_no_gradient():
    """mean and var are for the running averages: gradients through them are zero, as for
    the plain form's stop_gradient."""
    x, scale, bias, _ = _inputs((2, 3, 3, 4), jnp.float32)
    def statistics_sum(fn):
        def f(x):
            _, mean, var = fn(x, scale, bias, EPS)
            return jnp.sum(mean) + jnp.sum(var)
        return f

    for fn in (batch_norm_train, batch_norm_train_plain):
        assert not np.any(np.asarray(jax.grad(statistics_sum(fn))(x)))


def test_group_norm_rejects_groups_not_dividing_channels():
    x, scale, bias, _ = _inputs((1, 2, 2, 6), jnp.float32)
    with pytest.raises(ValueError, match="4 groups do not divide 6 channels"):
        group_norm(x, scale, bias, 4, EPS)


def test_group_norm_module_equals_flax_group_norm():
    x, _, _, ct = _inputs((2, 5, 4, 64), jnp.float32, seed=3)
    ours = GroupNorm(num_groups=32)
    flax_gn = nn.GroupNorm(num_groups=32, epsilon=EPS, use_fast_variance=False)
    v = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape,
                                                      flax_gn.init(jax.random.key(0), x))
    rng = np.random.default_rng(4)
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(1.0, 0.3, a.shape), a.dtype), v)
    got = _value_and_vjp(lambda x, s, b, eps: ours.apply({"params": {"scale": s, "bias": b}},
                                                         x),
                         x, v["params"]["scale"], v["params"]["bias"], ct, ())
    ref = _value_and_vjp(lambda x, s, b, eps: flax_gn.apply({"params": {"scale": s,
                                                                         "bias": b}}, x),
                         x, v["params"]["scale"], v["params"]["bias"], ct, ())
    _assert_close(got, ref, 2e-5, "GroupNorm vs flax")
