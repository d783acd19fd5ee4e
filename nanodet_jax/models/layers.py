"""Building blocks shared by the backbone, neck and heads (NHWC throughout).

Module and parameter names mirror the reference's PyTorch module names (``conv``, ``bn``,
``gn``, ``depthwise``, ``dwnorm``, ``pointwise``, ``pwnorm``, Sequential indices ``"0"``,
``"1"``...), so a torch state-dict key maps to a Flax path by a plain rename
(see ``nanodet_jax/convert.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nanodet_jax.models.dense_conv import dense_conv
from nanodet_jax.models.depthwise import depthwise_conv
from nanodet_jax.models.normalization import batch_norm_train, group_norm

Array = jax.Array
Initializer = Callable[..., Array]

LEAKY_SLOPE = 0.1  # every LeakyReLU in NanoDet uses slope 0.1, not 0.01
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running <- (1 - m) * running + m * batch

def leaky_relu(x: Array, negative_slope: float = LEAKY_SLOPE) -> Array:
    """PyTorch's LeakyReLU, gradient included: the derivative at exactly 0 is the negative
    slope (torch takes the ``x > 0`` branch strictly), where ``jax.nn.leaky_relu`` gives 1."""
    return jnp.where(x > 0, x, x * jnp.asarray(negative_slope, x.dtype))


_ACTIVATIONS: dict[str, Callable[[Array], Array] | None] = {
    "ReLU": jax.nn.relu,
    "LeakyReLU": leaky_relu,
    "ReLU6": jax.nn.relu6,
    "SELU": jax.nn.selu,
    "ELU": jax.nn.elu,
    "GELU": lambda x: jax.nn.gelu(x, approximate=False),
    "SiLU": jax.nn.silu,
    "Hardswish": jax.nn.hard_swish,
    "HardSwish": jax.nn.hard_swish,
}


def activation_fn(name: str | None) -> Callable[[Array], Array]:
    """Activation by reference name (``"LeakyReLU"`` -> slope 0.1); ``None`` -> identity."""
    if name is None or name == "None":
        return lambda x: x
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; supported: {sorted(_ACTIVATIONS)} or None "
            "(PReLU is not supported)")
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------
# Initialisers (kernel layout (kh, kw, in/groups, out); see spec §2.1, §3.7, §4.4, §5.3)


def kaiming_fan_out() -> Initializer:
    """Kaiming-normal, fan_out mode, ReLU gain: std = sqrt(2 / (out * kh * kw)).

    For depthwise kernels PyTorch does not divide by groups, so fan_out = C * kh * kw.
    """

    def init(key, shape, dtype=jnp.float32):
        kh, kw, _, out = shape
        return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (out * kh * kw))

    return init


def torch_default_conv() -> Initializer:
    """PyTorch's default conv init: U(-b, b), b = 1 / sqrt(fan_in), fan_in = in/g * kh * kw."""

    def init(key, shape, dtype=jnp.float32):
        kh, kw, in_g, _ = shape
        b = 1.0 / math.sqrt(in_g * kh * kw)
        return jax.random.uniform(key, shape, dtype, -b, b)

    return init


def normal(std: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) * std

    return init


def inverse_in_channels() -> Initializer:
    """ShuffleNetV2 fallback init: std = 1 / (in channels per group) (1.0 for depthwise)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.normal(key, shape, dtype) / shape[2]

    return init


# ---------------------------------------------------------------------------------------
# Layers


class Conv2d(nn.Module):
    """2-D convolution with explicit symmetric padding, NHWC.

    ``depthwise=True`` is a grouped conv with ``groups = in_channels = features`` and runs
    through the project's single depthwise op (fast tap form on CPU, native elsewhere); other
    convs through the single dense op (``dense_conv``: fast weight gradient on CPU).
    Params: ``kernel (kh, kw, in/groups, out)``, optional ``bias (out,)``.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None  # None -> k // 2
    depthwise: bool = False
    use_bias: bool = False
    kernel_init: Initializer = kaiming_fan_out()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s = self.kernel_size, self.stride
        p = k // 2 if self.padding is None else self.padding
        cin = x.shape[-1]
        if self.depthwise:
            if self.features != cin:
                raise ValueError(f"{self.name}: depthwise conv needs features == in channels "
                                 f"({self.features} != {cin})")
            kernel = self.param("kernel", self.kernel_init, (k, k, 1, cin))
            y = depthwise_conv(x, kernel.astype(x.dtype), stride=s, padding=p)
        else:
            kernel = self.param("kernel", self.kernel_init, (k, k, cin, self.features))
            y = dense_conv(x, kernel.astype(x.dtype), stride=s, padding=p)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(y.dtype)
        return y


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics (spec §0, quirk #5).

    Train mode normalises with the biased batch variance and updates the running stats as
    ``r <- 0.9 r + 0.1 b`` using the **unbiased** variance ``n/(n-1) var`` (n = N*H*W);
    ``num_batches_tracked`` counts updates (kept so checkpoints round-trip exactly).
    Params ``scale``, ``bias``; batch_stats ``mean``, ``var``, ``num_batches_tracked``.
    """

    use_running_average: bool = True
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    bias_init_value: float = 0.0

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        use_ra = nn.merge_param("use_running_average", self.use_running_average,
                                use_running_average)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.constant(self.bias_init_value), (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked",
                              lambda: jnp.zeros((), jnp.int32))
        if use_ra:
            inv = lax.rsqrt(ra_var.value + self.epsilon) * scale
            return ((x - ra_mean.value.astype(x.dtype)) * inv.astype(x.dtype)
                    + bias.astype(x.dtype))
        # statistics in at least float32 (bf16 inputs), float64 stays float64; one op with a
        # closed-form backward (nanodet_jax/models/normalization.py: far fewer kernels)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            ra_mean.value = (1 - m) * ra_mean.value + m * mean
            ra_var.value = (1 - m) * ra_var.value + m * unbiased
            count.value = count.value + 1
        return y


class GroupNorm(nn.Module):
    """GroupNorm like PyTorch's and flax's: statistics per sample over the spatial axes and
    ``C / num_groups`` consecutive channels, two-pass (E[(x - E[x])^2], not E[x^2] - E[x]^2),
    in float32; output in the activation dtype (bf16 stays bf16). Params ``scale``, ``bias``
    (C,), as flax's ``nn.GroupNorm``. One op with a closed-form backward
    (:func:`nanodet_jax.models.normalization.group_norm`)."""

    num_groups: int = 32
    epsilon: float = BN_EPS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return group_norm(x, scale, bias, self.num_groups, self.epsilon)


class ConvModule(nn.Module):
    """conv -> norm -> act (reference ``ConvModule``; bias only when there is no norm).

    Children: ``conv`` and ``bn`` (BatchNorm) or ``gn`` (GroupNorm, 32 groups, eps 1e-5).
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None
    norm: str | None = "BN"  # "BN" | "GN" | None
    activation: str | None = "LeakyReLU"
    kernel_init: Initializer = kaiming_fan_out()
    gn_groups: int = 32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = Conv2d(self.features, self.kernel_size, self.stride, self.padding,
                   use_bias=self.norm is None, kernel_init=self.kernel_init, name="conv")(x)
        if self.norm == "BN":
            x = BatchNorm(use_running_average=not train, name="bn")(x)
        elif self.norm == "GN":
            x = GroupNorm(num_groups=self.gn_groups, name="gn")(x)
        elif self.norm is not None:
            raise ValueError(f"unsupported norm {self.norm!r} (use 'BN', 'GN' or None)")
        return activation_fn(self.activation)(x)


class DepthwiseConvModule(nn.Module):
    """depthwise kxk -> BN -> act -> pointwise 1x1 -> BN -> act (reference names)."""

    features: int
    kernel_size: int
    stride: int = 1
    activation: str | None = "LeakyReLU"
    kernel_init: Initializer = kaiming_fan_out()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        act = activation_fn(self.activation)
        cin = x.shape[-1]
        x = Conv2d(cin, self.kernel_size, self.stride, depthwise=True,
                   kernel_init=self.kernel_init, name="depthwise")(x)
        x = act(BatchNorm(use_running_average=not train, name="dwnorm")(x))
        x = Conv2d(self.features, 1, kernel_init=self.kernel_init, name="pointwise")(x)
        return act(BatchNorm(use_running_average=not train, name="pwnorm")(x))


def _upsample_axis(x: Array, axis: int) -> Array:
    """x2 linear upsampling along one axis, half-pixel centres, edge clamp.

    out[2i] = 0.75 x[i] + 0.25 x[i-1], out[2i+1] = 0.75 x[i] + 0.25 x[i+1] (clamped).
    """
    n = x.shape[axis]
    prev = jnp.concatenate([lax.slice_in_dim(x, 0, 1, axis=axis),
                            lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis),
                           lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    even = 0.75 * x + 0.25 * prev
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return out.reshape(shape)


def upsample_bilinear_2x(x: Array) -> Array:
    """Bilinear x2 upsampling with ``align_corners=False`` (PyTorch ``Upsample``), NHWC."""
    return _upsample_axis(_upsample_axis(x, 1), 2)


class ModuleList(nn.Module):
    """A torch ``ModuleList``/``Sequential`` stand-in whose children are named ``"0"``, ``"1"``...

    ``make(i, name)`` builds child ``i``; ``lst(i, *args)`` builds it on first use (inside this
    container's scope) and calls it, so interleaved use of several lists stays readable and
    parameter paths read ``<list>/<i>/...`` exactly like the torch state-dict keys.
    """

    make: Callable[[int, str], nn.Module]

    @nn.compact
    def __call__(self, i: int, *args, **kwargs):
        return self.make(i, str(i))(*args, **kwargs)
