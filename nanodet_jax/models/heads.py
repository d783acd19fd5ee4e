"""Detection heads (spec §5, §6), NHWC.

Both heads return ``(B, P, C + 4*(reg_max+1))``: class logits then l/t/r/b distribution
logits, levels concatenated stride 8 -> 64, each flattened row-major.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanodet_jax.models.layers import (
    Conv2d,
    ConvModule,
    DepthwiseConvModule,
    ModuleList,
    activation_fn,
    normal,
)

Array = jax.Array

CLS_BIAS_INIT = -4.595  # ~ logit(0.01)


def flatten_levels(maps: Sequence[Array]) -> Array:
    """[(B, H_l, W_l, D)] -> (B, sum_l H_l*W_l, D), row-major within each level."""
    return jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


class NanoDetPlusHead(nn.Module):
    """Main head: per level (nothing shared) ``stacked_convs`` depthwise-separable convs
    then a 1x1 conv with bias to ``C + 4K`` (shared cls/reg output).

    Names: ``cls_convs.{level}.{i}.{depthwise,dwnorm,pointwise,pwnorm}``, ``gfl_cls.{level}``.
    """

    num_classes: int
    input_channel: int
    feat_channels: int = 96
    stacked_convs: int = 2
    kernel_size: int = 5
    strides: Sequence[int] = (8, 16, 32, 64)
    reg_max: int = 7
    activation: str = "LeakyReLU"
    conv_type: str = "DWConv"
    norm: str = "BN"

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"NanoDetPlusHead: num_classes must be >= 1, got {self.num_classes}")
        if self.conv_type not in ("DWConv", "Conv"):
            raise ValueError(f"NanoDetPlusHead: conv_type {self.conv_type!r} not in "
                             "('DWConv', 'Conv')")
        if self.norm != "BN":
            raise ValueError(f"NanoDetPlusHead: norm_cfg.type {self.norm!r} unsupported (BN)")
        activation_fn(self.activation)
        super().__post_init__()

    @property
    def out_channels(self) -> int:
        return self.num_classes + 4 * (self.reg_max + 1)

    @nn.compact
    def __call__(self, feats: Sequence[Array], train: bool = False) -> Array:
        if len(feats) != len(self.strides):
            raise ValueError(f"NanoDetPlusHead: got {len(feats)} maps for "
                             f"{len(self.strides)} strides")
        init = normal(0.01)

        def tower_conv(i: int, name: str) -> nn.Module:
            if self.conv_type == "DWConv":
                return DepthwiseConvModule(self.feat_channels, self.kernel_size, 1,
                                           self.activation, kernel_init=init, name=name)
            return ConvModule(self.feat_channels, self.kernel_size, activation=self.activation,
                              kernel_init=init, name=name)

        cls_convs = ModuleList(lambda lvl, name: ModuleList(tower_conv, name=name),
                               name="cls_convs")
        gfl_cls = ModuleList(lambda lvl, name: Conv2d(
            self.out_channels, 1, use_bias=True, kernel_init=init,
            bias_init=nn.initializers.constant(CLS_BIAS_INIT), name=name), name="gfl_cls")
        outs = []
        for lvl, x in enumerate(feats):
            for i in range(self.stacked_convs):
                x = cls_convs(lvl, i, x, train)
            outs.append(gfl_cls(lvl, x))
        return flatten_levels(outs)


class Scale(nn.Module):
    """A learnable scalar ``scale`` (init 1.0) multiplying its input."""

    init_value: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x * self.param("scale", nn.initializers.constant(self.init_value), ()).astype(
            x.dtype)


class SimpleConvHead(nn.Module):
    """Auxiliary head of the Assign Guidance Module (training only).

    Two towers of ``stacked_convs`` 3x3 ConvModules with GroupNorm(32), **shared across
    levels**; ``gfl_cls`` 3x3 -> C, ``gfl_reg`` 3x3 -> 4K times a per-level ``scales.{l}``.
    """

    num_classes: int
    input_channel: int
    feat_channels: int = 256
    stacked_convs: int = 4
    strides: Sequence[int] = (8, 16, 32, 64)
    reg_max: int = 7
    activation: str = "LeakyReLU"
    gn_groups: int = 32

    def __post_init__(self):
        if self.feat_channels % self.gn_groups:
            raise ValueError(f"SimpleConvHead: feat_channels {self.feat_channels} is not "
                             f"divisible by {self.gn_groups} GroupNorm groups")
        activation_fn(self.activation)
        super().__post_init__()

    @nn.compact
    def __call__(self, feats: Sequence[Array], train: bool = False) -> Array:
        if len(feats) != len(self.strides):
            raise ValueError(f"SimpleConvHead: got {len(feats)} maps for "
                             f"{len(self.strides)} strides")
        init = normal(0.01)

        def tower(i: int, name: str) -> nn.Module:
            return ConvModule(self.feat_channels, 3, norm="GN", activation=self.activation,
                              kernel_init=init, gn_groups=self.gn_groups, name=name)

        cls_convs = ModuleList(tower, name="cls_convs")
        reg_convs = ModuleList(tower, name="reg_convs")
        gfl_cls = Conv2d(self.num_classes, 3, use_bias=True, kernel_init=init,
                         bias_init=nn.initializers.constant(CLS_BIAS_INIT), name="gfl_cls")
        gfl_reg = Conv2d(4 * (self.reg_max + 1), 3, use_bias=True, kernel_init=init,
                         name="gfl_reg")
        scales = ModuleList(lambda lvl, name: Scale(name=name), name="scales")
        outs = []
        for lvl, x in enumerate(feats):
            c, r = x, x
            for i in range(self.stacked_convs):
                c = cls_convs(i, c, train)
                r = reg_convs(i, r, train)
            outs.append(jnp.concatenate([gfl_cls(c), scales(lvl, gfl_reg(r))], axis=-1))
        return flatten_levels(outs)

