"""ShuffleNetV2 backbone (spec §3), NHWC.

Torch names: ``conv1.{0: conv, 1: bn}``, ``stage{2,3,4}.{i}.branch1.{0..3}`` (first block
only) and ``stage{2,3,4}.{i}.branch2.{0,1,3,4,5,6}``; Flax paths are the same names.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanodet_jax.models.layers import (
    BatchNorm,
    Conv2d,
    activation_fn,
    inverse_in_channels,
)
from nanodet_jax.models.max_pool import max_pool_3x3_s2

Array = jax.Array

# stem, stage2, stage3, stage4, conv5 (conv5 unused: with_last_conv=False)
STAGE_OUT_CHANNELS = {
    "0.5x": (24, 48, 96, 192, 1024),
    "1.0x": (24, 116, 232, 464, 1024),
    "1.5x": (24, 176, 352, 704, 1024),
    "2.0x": (24, 244, 488, 976, 2048),
}
STAGE_REPEATS = (4, 8, 4)
_BN_BIAS = 1e-4  # backbone fallback init (spec §3.7)


def channel_shuffle(x: Array, groups: int = 2) -> Array:
    """(N, H, W, C) -> interleave the channel groups: out[2i] = in[i], out[2i+1] = in[C/2+i]."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(-1, -2).reshape(n, h, w, c)


def _bn(name: str, train: bool) -> BatchNorm:
    return BatchNorm(use_running_average=not train, bias_init_value=_BN_BIAS, name=name)


def _conv(features: int, k: int, name: str, stride: int = 1, depthwise: bool = False) -> Conv2d:
    return Conv2d(features, k, stride, depthwise=depthwise, kernel_init=inverse_in_channels(),
                  name=name)


class _Branch1(nn.Module):
    """Stride-2 shortcut: dw3x3 s2 -> BN -> 1x1 -> BN -> act (Sequential indices 0..4)."""

    features: int
    activation: str

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = _bn("1", train)(_conv(x.shape[-1], 3, "0", stride=2, depthwise=True)(x))
        x = _bn("3", train)(_conv(self.features, 1, "2")(x))
        return activation_fn(self.activation)(x)


class _Branch2(nn.Module):
    """1x1 -> BN -> act -> dw3x3 (stride) -> BN -> 1x1 -> BN -> act (indices 0..7)."""

    features: int
    stride: int
    activation: str

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        act = activation_fn(self.activation)
        x = act(_bn("1", train)(_conv(self.features, 1, "0")(x)))
        x = _bn("4", train)(_conv(self.features, 3, "3", stride=self.stride, depthwise=True)(x))
        return act(_bn("6", train)(_conv(self.features, 1, "5")(x)))


class ShuffleV2Block(nn.Module):
    """One ShuffleNetV2 unit; stride 2 uses both branches, stride 1 splits channels."""

    out_channels: int
    stride: int
    activation: str

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        c = self.out_channels // 2
        if self.stride == 1:
            if x.shape[-1] != self.out_channels:
                raise ValueError("stride-1 ShuffleV2Block needs in_channels == out_channels")
            x1, x2 = x[..., :c], x[..., c:]
            out = jnp.concatenate(
                [x1, _Branch2(c, 1, self.activation, name="branch2")(x2, train)], axis=-1)
        else:
            out = jnp.concatenate(
                [_Branch1(c, self.activation, name="branch1")(x, train),
                 _Branch2(c, self.stride, self.activation, name="branch2")(x, train)], axis=-1)
        return channel_shuffle(out, 2)


class _Stem(nn.Module):
    activation: str

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = _bn("1", train)(Conv2d(24, 3, 2, kernel_init=inverse_in_channels(), name="0")(x))
        return activation_fn(self.activation)(x)


class _Stage(nn.Module):
    out_channels: int
    repeats: int
    activation: str

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for i in range(self.repeats):
            x = ShuffleV2Block(self.out_channels, 2 if i == 0 else 1, self.activation,
                               name=str(i))(x, train)
        return x


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 feature extractor: (B, H, W, 3) -> stage outputs (strides 8, 16, 32).

    ``out_stages`` selects among stages 2, 3, 4 (in that order). ``with_last_conv`` (conv5)
    is not supported: NanoDet-Plus never uses it.
    """

    model_size: str = "1.5x"
    out_stages: Sequence[int] = (2, 3, 4)
    activation: str = "ReLU"
    with_last_conv: bool = False

    def __post_init__(self):
        if self.model_size not in STAGE_OUT_CHANNELS:
            raise ValueError(f"ShuffleNetV2: model_size {self.model_size!r} not in "
                             f"{sorted(STAGE_OUT_CHANNELS)}")
        if not set(self.out_stages) <= {2, 3, 4} or len(self.out_stages) == 0:
            raise ValueError(f"ShuffleNetV2: out_stages must be a non-empty subset of "
                             f"(2, 3, 4), got {tuple(self.out_stages)}")
        if self.with_last_conv:
            raise ValueError("ShuffleNetV2: with_last_conv=True is not supported")
        activation_fn(self.activation)  # validates the name
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, ...]:
        chans = STAGE_OUT_CHANNELS[self.model_size]
        x = max_pool_3x3_s2(_Stem(self.activation, name="conv1")(x, train))
        outs = []
        for stage, (c, r) in enumerate(zip(chans[1:4], STAGE_REPEATS), start=2):
            x = _Stage(c, r, self.activation, name=f"stage{stage}")(x, train)
            if stage in self.out_stages:
                outs.append(x)
        return tuple(outs)
