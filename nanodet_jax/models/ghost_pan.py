"""Ghost-PAN neck (spec §4), NHWC.

Torch names: ``reduce_layers.{i}``, ``top_down_blocks.{j}.blocks.0.{ghost1,ghost2,shortcut}``,
``downsamples.{j}``, ``bottom_up_blocks.{j}.blocks.0...``, ``extra_lvl_in_conv.{k}``,
``extra_lvl_out_conv.{k}``; Flax paths use the same names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanodet_jax.models.layers import (
    BatchNorm,
    Conv2d,
    ConvModule,
    DepthwiseConvModule,
    ModuleList,
    activation_fn,
    torch_default_conv,
    upsample_bilinear_2x,
)

Array = jax.Array


class _ConvBN(nn.Module):
    """Sequential(conv, BN[, act]) with indices ``0`` (conv) and ``1`` (bn); torch default init."""

    features: int
    kernel_size: int
    depthwise: bool = False
    activation: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = Conv2d(self.features, self.kernel_size, depthwise=self.depthwise,
                   kernel_init=torch_default_conv(), name="0")(x)
        x = BatchNorm(use_running_average=not train, name="1")(x)
        return activation_fn(self.activation)(x)


class GhostModule(nn.Module):
    """Primary 1x1 conv to ceil(oup/2) channels + cheap 3x3 depthwise conv, concatenated.

    Children ``primary_conv.{0,1}`` and ``cheap_operation.{0,1}``; ``activation=None`` is the
    identity. Output has 2*ceil(oup/2) channels (the reference does not slice to ``oup``).
    """

    out_channels: int
    activation: str | None = "LeakyReLU"
    dw_size: int = 3

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        init_ch = math.ceil(self.out_channels / 2)
        prim = _ConvBN(init_ch, 1, activation=self.activation, name="primary_conv")(x, train)
        cheap = _ConvBN(init_ch, self.dw_size, depthwise=True, activation=self.activation,
                        name="cheap_operation")(prim, train)
        return jnp.concatenate([prim, cheap], axis=-1)


class _Shortcut(nn.Module):
    """dw kxk -> BN -> 1x1 -> BN, no activation (indices 0..3)."""

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        kinit = torch_default_conv()
        x = Conv2d(x.shape[-1], self.kernel_size, depthwise=True, kernel_init=kinit, name="0")(x)
        x = BatchNorm(use_running_average=not train, name="1")(x)
        x = Conv2d(self.features, 1, kernel_init=kinit, name="2")(x)
        return BatchNorm(use_running_average=not train, name="3")(x)


class GhostBottleneck(nn.Module):
    """Stride-1 GhostBottleneck without SE: ``ghost2(ghost1(x)) + shortcut(x)``, no final act.

    The shortcut is the identity when in == out channels (never the case in GhostPAN).
    """

    mid_channels: int
    out_channels: int
    dw_kernel_size: int = 5
    activation: str = "LeakyReLU"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = GhostModule(self.mid_channels, self.activation, name="ghost1")(x, train)
        y = GhostModule(self.out_channels, None, name="ghost2")(y, train)
        if x.shape[-1] == self.out_channels:
            return y + x
        return y + _Shortcut(self.out_channels, self.dw_kernel_size, name="shortcut")(x, train)


class GhostBlocks(nn.Module):
    """``num_blocks=1, use_res=False``: a single GhostBottleneck stored at ``blocks.0``."""

    out_channels: int
    kernel_size: int = 5
    expand: float = 1.0
    activation: str = "LeakyReLU"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        blocks = ModuleList(lambda i, name: GhostBottleneck(
            int(self.out_channels * self.expand), self.out_channels, self.kernel_size,
            self.activation, name=name), name="blocks")
        return blocks(0, x, train)


class GhostPAN(nn.Module):
    """Path aggregation neck with Ghost blocks.

    ``feats``: backbone maps (B, H_i, W_i, in_channels[i]) at strides 8/16/32 ->
    ``len(in_channels) + num_extra_level`` maps (B, H_l, W_l, out_channels), strides 8..64.
    """

    in_channels: Sequence[int]
    out_channels: int
    use_depthwise: bool = False
    kernel_size: int = 5
    expand: float = 1.0
    num_blocks: int = 1
    use_res: bool = False
    num_extra_level: int = 0
    activation: str = "LeakyReLU"

    def __post_init__(self):
        if self.num_blocks != 1 or self.use_res:
            raise ValueError("GhostPAN: only num_blocks=1 and use_res=False (the NanoDet-Plus "
                             "setting) are implemented")
        if len(self.in_channels) < 2:
            raise ValueError("GhostPAN: in_channels needs at least two levels")
        activation_fn(self.activation)
        super().__post_init__()

    @nn.compact
    def __call__(self, feats: Sequence[Array], train: bool = False) -> tuple[Array, ...]:
        n = len(self.in_channels)
        if len(feats) != n:
            raise ValueError(f"GhostPAN: expected {n} input maps, got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.shape[-1] != c:
                raise ValueError(f"GhostPAN: input {i} has {f.shape[-1]} channels but "
                                 f"in_channels[{i}] = {c}")
        d, k, act = self.out_channels, self.kernel_size, self.activation

        def down(i: int, name: str) -> nn.Module:
            if self.use_depthwise:
                return DepthwiseConvModule(d, k, 2, act, name=name)
            return ConvModule(d, k, 2, activation=act, name=name)

        def ghost(i: int, name: str) -> nn.Module:
            return GhostBlocks(d, k, self.expand, act, name=name)

        reduce_layers = ModuleList(lambda i, name: ConvModule(d, 1, activation=act, name=name),
                                   name="reduce_layers")
        top_down = ModuleList(ghost, name="top_down_blocks")
        downsamples = ModuleList(down, name="downsamples")
        bottom_up = ModuleList(ghost, name="bottom_up_blocks")
        extra_in = ModuleList(down, name="extra_lvl_in_conv")
        extra_out = ModuleList(down, name="extra_lvl_out_conv")

        reduced = [reduce_layers(i, f, train) for i, f in enumerate(feats)]
        inner = [reduced[-1]]  # top-down, coarsest first
        for j, lateral in enumerate(reversed(reduced[:-1])):
            up = upsample_bilinear_2x(inner[0])
            inner.insert(0, top_down(j, jnp.concatenate([up, lateral], axis=-1), train))
        outs = [inner[0]]  # bottom-up
        for j in range(n - 1):
            x = jnp.concatenate([downsamples(j, outs[-1], train), inner[j + 1]], axis=-1)
            outs.append(bottom_up(j, x, train))
        for j in range(self.num_extra_level):
            outs.append(extra_in(j, reduced[-1], train) + extra_out(j, outs[-1], train))
        return tuple(outs)
