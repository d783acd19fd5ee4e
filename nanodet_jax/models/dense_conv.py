"""The project's single dense (groups = 1) 2-D convolution op (NHWC), fast to train on CPU.

``dense_conv(x, kernel, stride, padding, impl)`` equals ``lax.conv_general_dilated(x, kernel,
(s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))``:

    y[n, h, w, o] = sum_{i, j, c} x_pad[n, s*h + i, s*w + j, c] * kernel[i, j, c, o]

Implementations (``impl``):

* ``"native"``: that convolution and its autodiff (GPU/TPU, where forward, input gradient and
  weight gradient are all fast).
* ``"taps"``: jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK by default: forward and
  input gradient at ~170 GFLOP/s, but the *weight* gradient (a convolution of ``x`` with the
  cotangent over the batch axis) 3-4x slower (3x3, 192->192, batch 8, 40x40 on a 2-core
  AVX-512 Xeon: forward 49 ms, input gradient 50 ms, weight gradient 178 ms). This form keeps
  the native forward and input gradient and, when the output has at least
  ``TAP_GRAD_MIN_POSITIONS`` positions ``N*H'*W'``, computes the weight gradient per tap as
  one matmul (78 ms in the case above)::

      dk[i, j] = x_tap(i, j)^T . g        x_tap: (N*H'*W', C_in), g: (N*H'*W', C_out)

  with ``x_tap(i, j) = x_pad[:, i::s, j::s]`` cut to the output size. Smaller maps keep the
  native weight gradient. Convs with very few input channels (``C_in*kh*kw <=
  IM2COL_MAX_DEPTH``, the 3-channel stem) run as im2col + one matmul (XLA:CPU is ~4x slower
  on them as convolutions), which autodiff turns into matmuls as well.
* **Eigen convolutions** (:func:`eigen_conv_options`, what the train step compiles with on
  CPU): XLA:CPU's Eigen convolutions are faster on every part -- same case: forward 39 ms,
  input gradient 38 ms, weight gradient 43 ms -- so there the native weight gradient is
  the fast one: inside :func:`native_conv_gradients` (a trace-time context), ``"taps"``
  traces the plain native convolution (the im2col stem stays).
* ``None`` / ``"auto"``: ``"taps"`` if ``jax.default_backend() == "cpu"`` **at trace time**,
  else ``"native"``.

Autodiff of ``"taps"``: reverse mode (``grad``, ``vjp``) under ``jit``/``vmap``; the backward
is made of differentiable JAX ops, so grad-of-grad works too. Forward mode (``jvp``) is not
available for a ``custom_vjp``; use ``impl="native"`` there.

Dtypes: the weight-gradient products accumulate in float32 for low-precision inputs
(bf16/f16); ``dx`` and ``dkernel`` come back in the dtypes of ``x`` and ``kernel``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import cache, partial

import jax
import jax.numpy as jnp
from jax import lax

from nanodet_jax.models.depthwise import _out_size, resolve_impl

IM2COL_MAX_DEPTH = 64  # C_in*kh*kw at or below this: im2col + matmul on CPU
TAP_GRAD_MIN_POSITIONS = 2048  # N*H'*W' from which the tap-wise weight gradient is faster
_DIMS = ("NHWC", "HWIO", "NHWC")

# YNNPACK keeps dots and reductions (its default list minus INDIVIDUAL_CONVOLUTION)
_EIGEN_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
_native_grads = threading.local()


@cache
def eigen_conv_options() -> dict:
    """XLA compiler options that run XLA:CPU's convolutions on Eigen instead of YNNPACK.

    Empty where they do not apply: a non-CPU default backend, or a jaxlib whose XLA lacks the
    option (checked once by compiling a small convolution with it). Compile a program with
    these options *and* trace it inside :func:`native_conv_gradients`; the m_320 train step
    (batch 8, 2-core Xeon) took 0.944x the time of YNNPACK + tap-wise weight gradients,
    10 interleaved rounds."""
    if jax.default_backend() != "cpu":
        return {}
    x = jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 2, 2), jnp.float32)
    try:
        jax.jit(lambda a, b: _native(a, b, 1, 1)).lower(x, k).compile(
            compiler_options=_EIGEN_CONV_OPTIONS)
    except Exception:  # an XLA without the option: keep its defaults (and the tap form)
        return {}
    return dict(_EIGEN_CONV_OPTIONS)


@contextlib.contextmanager
def native_conv_gradients(active: bool = True) -> Iterator[None]:
    """While tracing inside this context, ``"taps"`` dense convs trace the native conv
    (native weight gradient): the fast form under :func:`eigen_conv_options`."""
    before = getattr(_native_grads, "active", False)
    _native_grads.active = active
    try:
        yield
    finally:
        _native_grads.active = before


def _pad(x: jax.Array, p: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x


def _taps(xp: jax.Array, kh: int, kw: int, s: int, ho: int, wo: int) -> list[jax.Array]:
    """The ``kh*kw`` strided shifted slices ``xp[:, i::s, j::s][:, :ho, :wo]``, (i, j) order."""
    n, c = xp.shape[0], xp.shape[3]
    return [lax.slice(xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                      (1, s, s, 1)) for i in range(kh) for j in range(kw)]


def _native(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (stride, stride),
                                    ((padding, padding), (padding, padding)),
                                    dimension_numbers=_DIMS)


def matmul_rows(x: jax.Array, w: jax.Array,
                precision: lax.Precision | None = None) -> jax.Array:
    """``x @ w`` over the last axis as ONE 2-D matmul: x (..., K), w (K, O) -> (..., O).

    Same values as ``jnp.dot(x, w)``, but its autodiff stays 2-D: the weight gradient is
    ``x2^T . g2`` over the flattened rows. With an N-D ``x``, XLA:CPU computed that gradient
    from a transposed copy of the cotangent written by the (single-threaded) fusion that
    produces it: a 1x1 conv + BatchNorm block took 2-2.8x as long, forward + backward.
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, precision=precision)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense conv as one matmul over stacked taps: (N, H, W, C) * (k, k, C, O) -> (N, H', W', O)."""
    kh, kw, cin, cout = kernel.shape
    ho, wo = _out_size(x.shape[1], kh, stride, padding), _out_size(x.shape[2], kw, stride, padding)
    patches = jnp.concatenate(_taps(_pad(x, padding), kh, kw, stride, ho, wo), axis=-1)
    return matmul_rows(patches, kernel.reshape(kh * kw * cin, cout), lax.Precision.HIGHEST)


def tap_weight_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, stride: int,
                    padding: int) -> jax.Array:
    """Weight gradient of the conv, tap by tap: x (N, H, W, C_in), g (N, H', W', C_out) ->
    (kh, kw, C_in, C_out), accumulated in at least float32."""
    n, ho, wo, cout = g.shape
    acc = jnp.promote_types(jnp.result_type(x.dtype, g.dtype), jnp.float32)
    g2 = g.reshape(n * ho * wo, cout)
    dk = [jnp.dot(t.reshape(n * ho * wo, -1).T, g2, precision=lax.Precision.HIGHEST,
                  preferred_element_type=acc)
          for t in _taps(_pad(x, padding), kh, kw, stride, ho, wo)]
    return jnp.stack(dk).reshape(kh, kw, x.shape[3], cout)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap_grad_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return _native(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding):
    return _native(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    g = g.astype(jnp.result_type(x.dtype, kernel.dtype))
    n, ho, wo, _ = g.shape
    if n * ho * wo >= TAP_GRAD_MIN_POSITIONS:
        _, vjp_x = jax.vjp(lambda v: _native(v, kernel, stride, padding), x)
        (dx,) = vjp_x(g)
        dk = tap_weight_grad(x, g, kh, kw, stride, padding)
    else:
        _, vjp_xk = jax.vjp(lambda v, k: _native(v, k, stride, padding), x, kernel)
        dx, dk = vjp_xk(g)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_tap_grad_conv.defvjp(_fwd, _bwd)


def dense_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0,
               impl: str | None = None) -> jax.Array:
    """Dense 2-D convolution, NHWC: x (N, H, W, C_in), kernel (kh, kw, C_in, C_out) ->
    (N, H', W', C_out), ``H' = (H + 2*padding - kh) // stride + 1`` (same for W)."""
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"need x (N,H,W,C) and kernel (kh,kw,C,O); got {x.shape}, {kernel.shape}")
    stride, padding = int(stride), int(padding)
    if stride < 1 or padding < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0; got {stride}, {padding}")
    kh, kw, cin, _ = kernel.shape
    if kh == kw == 1 and stride == 1 and padding == 0:  # pointwise: a matmul over channels
        return matmul_rows(x, kernel[0, 0])
    if resolve_impl(impl) == "native":  # same rule as the depthwise op
        return _native(x, kernel, stride, padding)
    if kh * kw > 1 and cin * kh * kw <= IM2COL_MAX_DEPTH:
        return im2col_conv(x, kernel, stride, padding)
    if getattr(_native_grads, "active", False):
        return _native(x, kernel, stride, padding)
    return _tap_grad_conv(x, kernel, stride, padding)
