"""Model construction: ``build_model(cfg)``, ``init_variables(model, rng, input_hw)`` and the
training start point ``init_train_variables(cfg, rng)`` (honours ``backbone.pretrain``)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from nanodet_jax.config import ConfigError, check_pretrain
from nanodet_jax.models.detector import NanoDetPlus
from nanodet_jax.models.ghost_pan import GhostPAN
from nanodet_jax.models.heads import NanoDetPlusHead, SimpleConvHead
from nanodet_jax.models.shufflenetv2 import STAGE_OUT_CHANNELS, ShuffleNetV2

__all__ = ["NanoDetPlus", "build_model", "init_variables", "init_train_variables", "GhostPAN",
           "NanoDetPlusHead", "SimpleConvHead", "ShuffleNetV2"]

PRETRAIN_FIELD = "model.arch.backbone.pretrain"
# torchvision ImageNet files the reference downloads for ``pretrain: True`` (None: no weights
# for that width, the reference keeps its random init)
REFERENCE_IMAGENET_FILES = {"0.5x": "shufflenetv2_x0.5-f707e7126e.pth",
                            "1.0x": "shufflenetv2_x1-5666bf0f80.pth", "1.5x": None, "2.0x": None}


def _arch(cfg: Any) -> Any:
    return cfg.model.arch if "model" in cfg else cfg


def build_model(cfg: Any, with_aux: bool = True) -> NanoDetPlus:
    """Build the Linen ``NanoDetPlus`` from a full config (or its ``model.arch`` node).

    ``with_aux=False`` omits the training-only AGM (inference / export).
    """
    arch = _arch(cfg)
    bb, fpn, head = arch.backbone, arch.fpn, arch.head
    backbone = ShuffleNetV2(model_size=bb.model_size, out_stages=tuple(bb.out_stages),
                            activation=bb.activation, with_last_conv=bb.get("with_last_conv",
                                                                            False))
    expected = [STAGE_OUT_CHANNELS[bb.model_size][s - 1] for s in bb.out_stages]
    if list(fpn.in_channels) != expected:
        raise ConfigError(f"model.arch.fpn.in_channels = {list(fpn.in_channels)} does not match "
                          f"the ShuffleNetV2 {bb.model_size} stage outputs {expected}")
    up = fpn.get("upsample_cfg", {"scale_factor": 2, "mode": "bilinear"})
    if up.get("scale_factor", 2) != 2 or up.get("mode", "bilinear") != "bilinear":
        raise ConfigError("model.arch.fpn.upsample_cfg: only scale_factor 2, mode 'bilinear'")
    if fpn.get("norm_cfg", {"type": "BN"}).get("type") != "BN":
        raise ConfigError("model.arch.fpn.norm_cfg.type: only 'BN' is supported")

    def make_fpn() -> GhostPAN:
        return GhostPAN(in_channels=tuple(fpn.in_channels), out_channels=fpn.out_channels,
                        use_depthwise=fpn.use_depthwise, kernel_size=fpn.kernel_size,
                        expand=fpn.get("expand", 1), num_blocks=fpn.get("num_blocks", 1),
                        use_res=fpn.get("use_res", False),
                        num_extra_level=fpn.num_extra_level, activation=fpn.activation)

    if head.input_channel != fpn.out_channels:
        raise ConfigError(f"model.arch.head.input_channel = {head.input_channel} but "
                          f"model.arch.fpn.out_channels = {fpn.out_channels}")
    n_levels = len(fpn.in_channels) + fpn.num_extra_level
    if len(head.strides) != n_levels:
        raise ConfigError(f"model.arch.head.strides has {len(head.strides)} entries but the "
                          f"neck produces {n_levels} levels")
    main_head = NanoDetPlusHead(
        num_classes=head.num_classes, input_channel=head.input_channel,
        feat_channels=head.feat_channels, stacked_convs=head.stacked_convs,
        kernel_size=head.kernel_size, strides=tuple(head.strides), reg_max=head.reg_max,
        activation=head.activation, conv_type=head.get("conv_type", "DWConv"),
        norm=head.get("norm_cfg", {"type": "BN"}).get("type", "BN"))
    aux_fpn = aux_head = None
    if with_aux and arch.get("aux_head") is not None:
        ah = arch.aux_head
        if ah.input_channel != 2 * fpn.out_channels:
            raise ConfigError(f"model.arch.aux_head.input_channel = {ah.input_channel} must be "
                              f"2 * fpn.out_channels = {2 * fpn.out_channels}")
        if ah.reg_max != head.reg_max or list(ah.strides) != list(head.strides):
            raise ConfigError("model.arch.aux_head: reg_max and strides must equal the head's")
        norm = ah.get("norm_cfg", {"type": "GN", "num_groups": 32})
        if norm.get("type", "GN") != "GN":
            raise ConfigError("model.arch.aux_head.norm_cfg.type: only 'GN' is supported")
        aux_fpn = make_fpn()
        aux_head = SimpleConvHead(
            num_classes=ah.num_classes, input_channel=ah.input_channel,
            feat_channels=ah.feat_channels, stacked_convs=ah.stacked_convs,
            strides=tuple(ah.strides), reg_max=ah.reg_max, activation=ah.activation,
            gn_groups=norm.get("num_groups", 32))
    return NanoDetPlus(backbone=backbone, fpn=make_fpn(), head=main_head, aux_fpn=aux_fpn,
                       aux_head=aux_head)


# The init program is ~200 random-number generators (one threefry hash per weight), no
# model compute (XLA drops the unused forward): LLVM optimisation buys nothing at run time
# (0.1 s) but costs ~9 s of its ~23 s compile on a CPU, so it is compiled at level 0.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=8)
def _jitted_init(model: NanoDetPlus, input_hw: tuple[int, int]) -> Callable:
    """``rng -> model.init(rng, zeros (1, H, W, 3), train=True)``, jitted."""
    shape = (1, *input_hw, 3)
    return jax.jit(lambda r: model.init(r, jnp.zeros(shape, jnp.float32), train=True))


@functools.lru_cache(maxsize=8)
def _compiled_init(model: NanoDetPlus, input_hw: tuple[int, int],
                   key: jax.ShapeDtypeStruct) -> Callable:
    """:func:`_jitted_init` compiled once per equal model, input size and key type."""
    return _jitted_init(model, input_hw).lower(key).compile(
        compiler_options=INIT_COMPILER_OPTIONS)


def init_variables(model: NanoDetPlus, rng: jax.Array,
                   input_hw: tuple[int, int] = (320, 320)) -> dict:
    """Initialise ``{'params', 'batch_stats'}`` with the reference schemes.

    Runs a train-mode trace so the AGM exists, then copies ``fpn`` into ``aux_fpn``
    (the reference deep-copies the initialised neck, so both start identical).
    """
    if isinstance(rng, jax.core.Tracer):  # traced (e.g. under jax.eval_shape)
        variables = _jitted_init(model, tuple(input_hw))(rng)
    else:
        key = jax.ShapeDtypeStruct(rng.shape, rng.dtype)
        variables = _compiled_init(model, tuple(input_hw), key)(rng)
    variables = jax.tree_util.tree_map(lambda a: a, variables)  # plain dicts, fresh leaves
    if model.has_aux:
        for col in ("params", "batch_stats"):
            variables[col]["aux_fpn"] = jax.tree_util.tree_map(jnp.copy, variables[col]["fpn"])
    return variables


def init_train_variables(cfg: Any, rng: jax.Array,
                         input_hw: tuple[int, int] | None = None) -> dict:
    """Starting weights for training: ``{'params', 'batch_stats'}`` of the full training
    model of the (full) config ``cfg`` (AGM included; conv kernels HWIO), following
    ``model.arch.backbone.pretrain``:

    * ``False``: the reference's random initialisation (``init_variables``);
    * a path: the same, then the backbone replaced by the torchvision ShuffleNetV2 ImageNet
      state dict in that ``.pth`` file (``convert.load_torchvision_backbone``; BGR input is
      kept, as in the reference); a missing file is a ``ConfigError``;
    * ``True`` (the reference default): for 0.5x/1.0x the reference downloads ImageNet
      weights, which is impossible here, so ``ConfigError`` saying what to set instead; for
      1.5x/2.0x the reference has no ImageNet weights and keeps its random init, and so does
      this (with a ``UserWarning`` saying so).

    ``input_hw`` ``(H, W)``, multiples of 32: size of the init trace (None: ``init_variables``'
    default); the variables do not depend on it.
    """
    bb = cfg.model.arch.backbone
    pretrain = bb.get("pretrain", False)
    check_pretrain(pretrain)
    path = None if isinstance(pretrain, bool) else Path(pretrain).expanduser()
    if pretrain is True and REFERENCE_IMAGENET_FILES.get(bb.model_size):
        raise ConfigError(
            f"{PRETRAIN_FIELD} is True: the reference downloads the torchvision ImageNet "
            f"ShuffleNetV2 {bb.model_size} weights here, but nothing is downloaded in "
            f"nanodet_jax. Set it to the path of that .pth file (e.g. "
            f"{REFERENCE_IMAGENET_FILES[bb.model_size]}), or to False to train from scratch.")
    if pretrain is True:
        warnings.warn(f"{PRETRAIN_FIELD} is True but the reference has no ImageNet weights for "
                      f"ShuffleNetV2 {bb.model_size} (model_urls entry None), so it trains "
                      "from its random init; so does this. Set it to False to silence this, "
                      "or to a torchvision .pth path to start from ImageNet weights.",
                      stacklevel=2)
    if path is not None and not path.is_file():
        raise ConfigError(f"{PRETRAIN_FIELD} = {pretrain!r}: file {path.resolve()} does not "
                          "exist (give the path of a torchvision ShuffleNetV2 .pth file, or "
                          "False to train from scratch)")
    model = build_model(cfg)
    variables = (init_variables(model, rng) if input_hw is None
                 else init_variables(model, rng, input_hw))
    if path is None:
        return variables
    from nanodet_jax.convert import load_torchvision_backbone  # convert imports this module

    return load_torchvision_backbone(path, variables, cfg)
