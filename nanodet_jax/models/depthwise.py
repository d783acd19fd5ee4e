"""The project's single depthwise 2-D convolution op (NHWC), fast on CPU, native elsewhere.

``depthwise_conv(x, kernel, stride, padding, impl)`` computes, for every channel ``c``,

    y[n, h, w, c] = sum_{i, j} x_pad[n, s*h + i, s*w + j, c] * kernel[i, j, 0, c]

with ``x_pad`` = ``x`` zero-padded by ``padding`` on both sides of H and W. It equals
``lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC",
"HWIO", "NHWC"), feature_group_count=C)``.

Implementations (``impl``):

* ``"native"``: that grouped convolution (used on GPU/TPU, where it is fast).
* ``"taps"``: the sum of the ``kh*kw`` strided, shifted slices of the padded input times the
  per-channel tap weights (one fused elementwise loop on XLA:CPU, where the grouped convolution
  is 30-50x slower). It has a ``jax.custom_vjp`` whose backward is also tap-form:

  - ``dx``: transposed convolution by output phase. For stride ``s`` each of the ``s*s``
    phases ``(h mod s, w mod s)`` of ``dx`` is a stride-1 correlation of the (edge-padded)
    cotangent with the sub-kernel of taps that hit that phase; the phases are interleaved with
    a stack + reshape. No multiplications by the zeros of a dilated cotangent.
  - ``dkernel``: ``dk[i, j, c] = sum_{n,h,w} x_pad[n, s*h+i, s*w+j, c] * g[n, h, w, c]`` as ONE
    variadic ``lax.reduce`` over the W axis whose ``kh*kw`` operands are the fused tap
    products (a single pass over ``x`` and ``g`` instead of ``kh*kw`` materialised slices),
    followed by a plain sum over (N, H'). Row sums of at most W' terms, then a tree-like sum,
    keep the float32 error at or below the native convolution's (vs a float64 sum).
  - ``y``, ``dx`` and the incoming cotangent pass through ``_fence`` (an exact identity) so
    that XLA:CPU computes each once in its own loop instead of re-computing the tap sums
    inside consumer fusions (BatchNorm, the ``dkernel`` reduce, YNNPACK reductions).

* ``None`` / ``"auto"``: ``"taps"`` if ``jax.default_backend() == "cpu"`` **at trace time**,
  else ``"native"``. (A computation traced on a CPU-default process but placed on another
  device would still use taps; pass ``impl`` explicitly in that case.)

Autodiff of ``"taps"``: reverse mode (``jax.grad``, ``jax.vjp``, ``value_and_grad``) under
``jit``, ``vmap`` and ``jax.checkpoint``; reverse-over-reverse (grad of grad) also works, as
the backward is made of differentiable JAX ops (tested against native). Forward mode
(``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) is not available for a ``custom_vjp`` and
raises ``TypeError``; use ``impl="native"`` there.

Dtypes: float32 is the target; lower-precision floats (bf16/f16) are accumulated in float32
and the results cast back (``y`` to the promoted input dtype, ``dx``/``dkernel`` to the dtypes
of ``x``/``kernel``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "native", "taps")


def _out_size(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _acc_dtype(*dtypes) -> jnp.dtype:
    """float32 for low-precision floats, else the promoted dtype (float32/float64 stay)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _pad_hw(x: jax.Array, lo_h: int, hi_h: int, lo_w: int, hi_w: int) -> jax.Array:
    """Zero-pad (or crop, for negative amounts) the H and W axes of an NHWC array."""
    zero = jnp.zeros((), x.dtype)
    return lax.pad(x, zero, ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))


# The tap loops below use lax primitives, not jnp indexing/operators: the same HLO, but a
# train step traces ~60 depthwise convs x 25 taps x 3 (forward, dx, dkernel), and jnp's
# per-call overhead there was a sizeable part of the step's lowering time.


def _tap(xp: jax.Array, i: int, j: int, s: int, ho: int, wo: int) -> jax.Array:
    """``xp[:, i + s*h, j + s*w, :]`` for ``h < ho``, ``w < wo``: (N, ho, wo, C)."""
    n, _, _, c = xp.shape
    return lax.slice(xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                     (1, s, s, 1))


def _tap_weights(kernel: jax.Array) -> list[list[jax.Array]]:
    """``kernel[i, j, 0]`` (C,) for every tap: kernel (kh, kw, 1, C)."""
    kh, kw, _, c = kernel.shape
    flat = kernel.reshape(kh * kw, c)
    return [[lax.index_in_dim(flat, i * kw + j, keepdims=False) for j in range(kw)]
            for i in range(kh)]


def _times(t: jax.Array, w: jax.Array) -> jax.Array:
    """(N, H, W, C) times per-channel (C,)."""
    return lax.mul(t, lax.broadcast_in_dim(w, t.shape, (3,)))


def _fence(y: jax.Array) -> jax.Array:
    """Exact identity that makes XLA:CPU compute ``y`` once, in its own loop fusion.

    XLA:CPU otherwise (1) re-computes a cheap-looking tap sum inside every consumer fusion
    (BatchNorm statistics and normalisation, the other backward terms, ...), even once per
    tap inside the ``dkernel`` reduction, and (2) pulls it into YNNPACK reduction fusions that
    materialise every shifted slice: 10-50x slowdowns. ``lax.optimization_barrier`` does not
    help (the CPU pipeline removes it). Division by an all-ones array computed from ``y``
    itself (a float division is an "expensive" op that fusion never duplicates; a scalar or
    broadcast divisor would be rewritten into a cheap multiplication) stops (1);
    ``reduce_precision`` to the own precision, which YNNPACK fusions do not take, stops (2).
    Both are exact (x / 1 == x, also for inf, nan and -0).
    """
    ones = ((y == y) | (y != y)).astype(y.dtype)  # 1 everywhere, nan included
    fi = jnp.finfo(y.dtype)
    return lax.reduce_precision(y / ones, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _native(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _taps_forward(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Tap-form forward. x (N, H, W, C), kernel (kh, kw, 1, C) -> (N, H', W', C)."""
    kh, kw = kernel.shape[:2]
    ho, wo = (_out_size(n, k, stride, padding) for n, k in zip(x.shape[1:3], (kh, kw)))
    acc = _acc_dtype(x.dtype, kernel.dtype)
    xp = _pad_hw(x.astype(acc), padding, padding, padding, padding)
    k = _tap_weights(kernel.astype(acc))
    # Sequential accumulation in tap order: XLA:CPU fuses the whole sum into one loop.
    y = None
    for i in range(kh):
        for j in range(kw):
            t = _times(_tap(xp, i, j, stride, ho, wo), k[i][j])
            y = t if y is None else lax.add(y, t)
    return _fence(y.astype(jnp.result_type(x.dtype, kernel.dtype)))


def _taps_dx(g: jax.Array, kernel: jax.Array, stride: int, padding: int, h: int,
             w: int) -> jax.Array:
    """Cotangent of x: g (N, H', W', C) (accumulation dtype), kernel (kh, kw, 1, C) -> (N, h, w, C).

    ``dx[s*u + a] = sum_{i = a+p (mod s)} g[u + (a+p-i)/s] * k[i]`` (per axis), so phase
    ``(a, b)`` of ``dx`` is a stride-1 tap sum over slices of the edge-padded cotangent.
    """
    s, p = stride, padding
    kh, kw = kernel.shape[:2]
    n, ho, wo, c = g.shape
    hs, ws = -(-h // s), -(-w // s)  # rows/cols per phase (ceil)

    def offsets(k_len: int) -> dict[int, list[tuple[int, int]]]:
        """phase a -> [(tap i, cotangent offset d)] with d = (a + p - i) / s."""
        return {a: [(i, (a + p - i) // s) for i in range(k_len) if (a + p - i) % s == 0]
                for a in range(s)}

    oh, ow = offsets(kh), offsets(kw)
    dh = [d for v in oh.values() for _, d in v] or [0]
    dw = [d for v in ow.values() for _, d in v] or [0]
    lo_h, lo_w = max(0, -min(dh)), max(0, -min(dw))
    gp = _pad_hw(g, lo_h, max(0, hs + max(dh) - ho), lo_w, max(0, ws + max(dw) - wo))
    k = _tap_weights(kernel.astype(g.dtype))
    rows = []
    for a in range(s):
        cols = []
        for b in range(s):
            acc = None
            for i, di in oh[a]:
                for j, dj in ow[b]:
                    t = _times(lax.slice(gp, (0, di + lo_h, dj + lo_w, 0),
                                         (n, di + lo_h + hs, dj + lo_w + ws, c)), k[i][j])
                    acc = t if acc is None else lax.add(acc, t)
            cols.append(jnp.zeros((n, hs, ws, c), g.dtype) if acc is None else acc)
        rows.append(cols[0] if s == 1 else jnp.stack(cols, axis=3))  # (N, hs, ws, s, C)
    if s == 1:
        return _fence(rows[0][:, :h, :w])
    dx = jnp.stack(rows, axis=2)  # (N, hs, s, ws, s, C)
    return _fence(dx.reshape(n, hs * s, ws * s, c)[:, :h, :w])


def _taps_dkernel(x: jax.Array, g: jax.Array, kh: int, kw: int, stride: int,
                  padding: int) -> jax.Array:
    """Cotangent of the kernel: x (N, H, W, C), g (N, H', W', C) -> (kh, kw, 1, C)."""
    n, ho, wo, c = g.shape
    xp = _pad_hw(x, padding, padding, padding, padding)
    prods = tuple(lax.mul(_tap(xp, i, j, stride, ho, wo), g) for i in range(kh)
                  for j in range(kw))
    zeros = tuple(jnp.zeros((), g.dtype) for _ in prods)
    # One variadic reduce over W: XLA:CPU emits a single loop computing all kh*kw row sums.
    rows = lax.reduce(prods, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (2,))
    return jnp.stack(rows).sum(axis=(1, 2)).reshape(kh, kw, 1, c)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _taps(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return _taps_forward(x, kernel, stride, padding)


def _taps_fwd(x, kernel, stride, padding):
    return _taps_forward(x, kernel, stride, padding), (x, kernel)


def _taps_bwd(stride, padding, res, g):
    x, kernel = res
    acc = _acc_dtype(x.dtype, kernel.dtype)
    g = _fence(g.astype(acc))  # computed once, not inside each of the kh*kw products
    kh, kw = kernel.shape[:2]
    dx = _taps_dx(g, kernel, stride, padding, x.shape[1], x.shape[2])
    dk = _taps_dkernel(x.astype(acc), g, kh, kw, stride, padding)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_taps.defvjp(_taps_fwd, _taps_bwd)


def resolve_impl(impl: str | None = None) -> str:
    """``"native"`` or ``"taps"`` for ``impl`` in ``None | "auto" | "native" | "taps"``."""
    if impl is None or impl == "auto":
        return "taps" if jax.default_backend() == "cpu" else "native"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0,
                   impl: str | None = None) -> jax.Array:
    """Depthwise 2-D convolution, NHWC.

    x: (N, H, W, C); kernel: (kh, kw, 1, C) (Flax HWIO with feature_group_count=C);
    stride: same on H and W; padding: symmetric explicit zero padding (>= 0) on H and W.
    impl: ``None``/``"auto"`` (taps on a CPU default backend at trace time, else native),
    ``"native"`` or ``"taps"`` (see the module docstring). Returns (N, H', W', C) with
    ``H' = (H + 2*padding - kh) // stride + 1`` (same for W).
    """
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
        raise ValueError(f"need x (N,H,W,C) and kernel (kh,kw,1,C); got {x.shape}, {kernel.shape}")
    stride, padding = int(stride), int(padding)
    if stride < 1 or padding < 0:
        raise ValueError(f"need stride >= 1 and padding >= 0; got {stride}, {padding}")
    if any(n + 2 * padding < k for n, k in zip(x.shape[1:3], kernel.shape[:2])):
        raise ValueError(f"kernel {kernel.shape[:2]} larger than padded input {x.shape[1:3]}")
    if resolve_impl(impl) == "native":
        return _native(x, kernel, stride, padding)
    return _taps(x, kernel, stride, padding)
