"""The project's single dense (groups = 1) 2-D convolution op (NHWC), with a fast weight
gradient on CPU.

``dense_conv(x, kernel, stride, padding, impl)`` equals ``lax.conv_general_dilated(x, kernel,
(s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))``:

    y[n, h, w, o] = sum_{i, j, c} x_pad[n, s*h + i, s*w + j, c] * kernel[i, j, c, o]

Implementations (``impl``):

* ``"native"``: that convolution and its autodiff (used on GPU/TPU, where all three of
  forward, input gradient and weight gradient are fast).
* ``"taps"``: XLA:CPU runs a dense conv's forward and input gradient near oneDNN speed, but
  the *weight* gradient (the conv of ``x`` with the cotangent over the batch axis) 4-5x slower
  than the forward. This form keeps the native forward and input gradient and computes the
  weight gradient per tap as one matmul,

      dk[i, j] = x_tap(i, j)^T . g        x_tap: (N*H'*W', C_in), g: (N*H'*W', C_out)

  with ``x_tap(i, j) = x_pad[:, i::s, j::s]`` (``kh*kw`` dot_generals contracting N, H', W').
  Convs with very few input channels (``C_in * kh * kw <= IM2COL_MAX_DEPTH``, the 3-channel
  stem) run their forward as im2col + one matmul instead (XLA:CPU is ~4x slower on them).
* ``None`` / ``"auto"``: ``"taps"`` if ``jax.default_backend() == "cpu"`` **at trace time**,
  else ``"native"``.

Autodiff of ``"taps"``: reverse mode (``grad``, ``vjp``) under ``jit``/``vmap``; the backward
is made of differentiable JAX ops, so grad-of-grad works too. Forward mode (``jvp``) is not
available for a ``custom_vjp``; use ``impl="native"`` there.

Dtypes: the products accumulate in float32 for low-precision inputs (bf16/f16); ``dx`` and
``dkernel`` are returned in the dtypes of ``x`` and ``kernel``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "native", "taps")
IM2COL_MAX_DEPTH = 64  # in*kh*kw at or below this: forward as im2col + matmul on CPU
_DIMS = ("NHWC", "HWIO", "NHWC")


def _acc_dtype(*dtypes) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _taps(xp: jax.Array, kh: int, kw: int, s: int, ho: int, wo: int) -> list[jax.Array]:
    """The ``kh*kw`` strided shifted slices ``xp[:, i::s, j::s][:, :ho, :wo]`` in (i, j) order."""
    n, c = xp.shape[0], xp.shape[3]
    return [lax.slice(xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                      (1, s, s, 1)) for i in range(kh) for j in range(kw)]


def _pad(x: jax.Array, p: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x


def _native(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (stride, stride),
                                    ((padding, padding), (padding, padding)),
                                    dimension_numbers=_DIMS)


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense conv as one matmul over stacked taps: (N, H, W, C) * (k, k, C, O) -> (N, H', W', O)."""
    kh, kw, cin, cout = kernel.shape
    ho, wo = _out_size(x.shape[1], kh, stride, padding), _out_size(x.shape[2], kw, stride, padding)
    patches = jnp.concatenate(_taps(_pad(x, padding), kh, kw, stride, ho, wo), axis=-1)
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout), precision=lax.Precision.HIGHEST)


def _forward(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    kh, kw, cin, _ = kernel.shape
    if kh * kw > 1 and cin * kh * kw <= IM2COL_MAX_DEPTH:
        return im2col_conv(x, kernel, stride, padding)
    return _native(x, kernel, stride, padding)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tap_grad_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return _forward(x, kernel, stride, padding)


def _fwd(x, kernel, stride, padding):
    return _forward(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, res, g):
    x, kernel = res
    kh, kw, _, _ = kernel.shape
    _, conv_vjp = jax.vjp(lambda v: _native(v, kernel, stride, padding), x)
    (dx,) = conv_vjp(g.astype(jnp.result_type(x.dtype, kernel.dtype)))
    acc = _acc_dtype(x.dtype, kernel.dtype)
    ho, wo = g.shape[1], g.shape[2]
    taps = _taps(_pad(x, padding), kh, kw, stride, ho, wo)
    contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
    dk = jnp.stack([lax.dot_general(t, g, contract, precision=lax.Precision.HIGHEST,
                                    preferred_element_type=acc) for t in taps])
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_tap_grad_conv.defvjp(_fwd, _bwd)


def resolve_impl(impl: str | None = None) -> str:
    """``"native"`` or ``"taps"`` for ``impl`` in ``None | "auto" | "native" | "taps"``."""
    if impl is None or impl == "auto":
        return "taps" if jax.default_backend() == "cpu" else "native"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    return impl


def dense_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0,
               impl: str | None = None) -> jax.Array:
    """Dense 2-D convolution, NHWC: x (N, H, W, C_in), kernel (kh, kw, C_in, C_out) ->
    (N, H', W', C_out), ``H' = (H + 2*padding - kh) // stride + 1`` (same for W)."""
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"need x (N,H,W,C) and kernel (kh,kw,C,O); got {x.shape}, {kernel.shape}")
    stride, padding = int(stride), int(padding)
    if stride < 1 or padding < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0; got {stride}, {padding}")
    if resolve_impl(impl) == "native":
        return _native(x, kernel, stride, padding)
    return _tap_grad_conv(x, kernel, stride, padding)
