"""Model unit tests: output shapes for every size/activation, bad arguments, init schemes,
the AGM detach semantics and the PyTorch-style layers (BatchNorm, upsample, shuffle)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.config import ConfigError, load_config, nanodet_plus_recipe, validate
from nanodet_jax.models import (
    GhostPAN,
    NanoDetPlusHead,
    ShuffleNetV2,
    SimpleConvHead,
    build_model,
    init_train_variables,
    init_variables,
)
from nanodet_jax.models.layers import BatchNorm, upsample_bilinear_2x
from nanodet_jax.models.shufflenetv2 import STAGE_OUT_CHANNELS, channel_shuffle
from tests.fixtures import REPO_ROOT

KEY = jax.random.key(0)


def _shapes(module, *args, **kwargs):
    """Output shapes of ``module`` without compiling (abstract evaluation)."""

    def run():
        v = module.init(KEY, *args, **kwargs)
        return module.apply(v, *args, **kwargs)

    return jax.tree_util.tree_map(lambda s: tuple(s.shape), jax.eval_shape(run))


@pytest.mark.parametrize("size", sorted(STAGE_OUT_CHANNELS))
@pytest.mark.parametrize("act", ["ReLU", "LeakyReLU", "ReLU6", "SELU", "ELU", "GELU", "SiLU"])
def test_shufflenet_shapes(size, act):
    x = jnp.zeros((2, 96, 160, 3))
    out = _shapes(ShuffleNetV2(size, (2, 3, 4), act), x)
    c = STAGE_OUT_CHANNELS[size]
    assert out == ((2, 12, 20, c[1]), (2, 6, 10, c[2]), (2, 3, 5, c[3]))


def test_shufflenet_out_stages_subset():
    out = _shapes(ShuffleNetV2("1.0x", (3,), "ReLU"), jnp.zeros((1, 64, 64, 3)))
    assert out == ((1, 4, 4, 232),)


@pytest.mark.parametrize("kwargs", [
    {"model_size": "3.0x"}, {"out_stages": (1, 2)}, {"out_stages": ()},
    {"activation": "Swishy"}, {"with_last_conv": True}])
def test_shufflenet_bad_args(kwargs):
    with pytest.raises(ValueError):
        ShuffleNetV2(**{"model_size": "1.0x", **kwargs})


def test_channel_shuffle_permutation():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    np.testing.assert_array_equal(channel_shuffle(x).reshape(-1), [0, 4, 1, 5, 2, 6, 3, 7])


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("act", ["LeakyReLU", "ReLU"])
def test_ghost_pan_shapes(depthwise, act):
    feats = [jnp.zeros((1, 12, 20, 116)), jnp.zeros((1, 6, 10, 232)), jnp.zeros((1, 3, 5, 464))]
    out = _shapes(GhostPAN((116, 232, 464), 64, depthwise, 5, num_extra_level=1,
                           activation=act), feats)
    assert out == ((1, 12, 20, 64), (1, 6, 10, 64), (1, 3, 5, 64), (1, 2, 3, 64))


def test_ghost_pan_bad_args():
    with pytest.raises(ValueError):
        GhostPAN((116, 232, 464), 96, num_blocks=2)
    with pytest.raises(ValueError):
        GhostPAN((116,), 96)
    feats = [jnp.zeros((1, 8, 8, 100)), jnp.zeros((1, 4, 4, 232)), jnp.zeros((1, 2, 2, 464))]
    with pytest.raises(ValueError, match="in_channels"):
        _shapes(GhostPAN((116, 232, 464), 96), feats)


@pytest.mark.parametrize("conv_type", ["DWConv", "Conv"])
def test_heads_shapes(conv_type):
    feats = [jnp.zeros((2, s, s + 1, 64)) for s in (8, 4, 2, 1)]
    p = sum(s * (s + 1) for s in (8, 4, 2, 1))
    out = _shapes(NanoDetPlusHead(20, 64, 64, 2, 5, (8, 16, 32, 64), 7, conv_type=conv_type),
                  feats)
    assert out == (2, p, 20 + 32)
    dual = [jnp.zeros((2, s, s + 1, 128)) for s in (8, 4, 2, 1)]
    assert _shapes(SimpleConvHead(20, 128, 64, 2, (8, 16, 32, 64), 7), dual) == (2, p, 52)


def test_head_module_defaults_are_the_references():
    """Flax module defaults equal the reference config values (spec §5/§6)."""
    for head in (NanoDetPlusHead(80, 96), SimpleConvHead(80, 192)):
        assert tuple(head.strides) == (8, 16, 32, 64) and head.reg_max == 7
    feats = [jnp.zeros((1, s, s, 32)) for s in (8, 4, 2, 1)]
    assert _shapes(NanoDetPlusHead(3, 32, 32), feats) == (1, 85, 3 + 32)


def test_init_train_variables_pretrain_true_without_reference_weights():
    """1.5x: the reference has no ImageNet weights (random init), so True warns and keeps
    the random init instead of refusing."""
    raw = nanodet_plus_recipe("1.5x", 320)
    cfg = validate(raw)
    assert cfg.model.arch.backbone.pretrain is True
    with pytest.warns(UserWarning, match="no ImageNet weights"):
        got = jax.eval_shape(lambda: init_train_variables(cfg, KEY, (64, 64)))
    ref = jax.eval_shape(lambda: init_variables(build_model(cfg), KEY, (64, 64)))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)


def test_heads_bad_args():
    with pytest.raises(ValueError):
        NanoDetPlusHead(0, 96)
    with pytest.raises(ValueError):
        NanoDetPlusHead(80, 96, conv_type="Deformable")
    with pytest.raises(ValueError):
        SimpleConvHead(80, 192, feat_channels=100)
    with pytest.raises(ValueError, match="maps"):
        _shapes(NanoDetPlusHead(3, 8, 8, 1, 3, (8, 16), 7), [jnp.zeros((1, 4, 4, 8))])


def _small_cfg(**head):
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["model"]["arch"]["backbone"]["model_size"] = "0.5x"
    arch = raw["model"]["arch"]
    arch["fpn"].update(in_channels=[48, 96, 192], out_channels=32)
    arch["head"].update(input_channel=32, feat_channels=32, **head)
    arch["aux_head"].update(input_channel=64, feat_channels=64)
    return validate(raw)


@pytest.mark.parametrize("hw", [(320, 320), (320, 416), (416, 256)])
def test_detector_shapes_any_multiple_of_32(hw):
    cfg = load_config(REPO_ROOT / "configs" / "nanodet_plus_m_320.py")
    model = build_model(cfg)
    x = jnp.zeros((1, *hw, 3))
    p = sum(math.ceil(hw[0] / s) * math.ceil(hw[1] / s) for s in (8, 16, 32, 64))

    def run():
        v = init_variables(model, KEY, hw)
        return model.apply(v, x), model.apply(v, x, train=True, mutable=["batch_stats"])[0]

    ev, (tr_main, tr_aux) = jax.eval_shape(run)
    assert ev.shape == tr_main.shape == tr_aux.shape == (1, p, 112)


def test_detector_rejects_bad_input():
    model = build_model(_small_cfg())
    v = jax.eval_shape(lambda: init_variables(model, KEY, (64, 64)))
    with pytest.raises(ValueError, match="multiples of 32"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 80, 3))), v)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 3, 64, 64))), v)
    no_aux = build_model(_small_cfg(), with_aux=False)
    with pytest.raises(ValueError, match="aux"):
        jax.eval_shape(lambda v: no_aux.apply(v, jnp.zeros((1, 64, 64, 3)), train=True,
                                              mutable=["batch_stats"]), v)


def test_build_model_config_errors():
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["model"]["arch"]["fpn"]["in_channels"] = [176, 352, 704]
    with pytest.raises(ConfigError, match="fpn.in_channels"):
        build_model(validate(raw))
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["model"]["arch"]["aux_head"]["input_channel"] = 96
    with pytest.raises(ConfigError, match="aux_head.input_channel"):
        build_model(validate(raw))


@pytest.mark.parametrize("size,expected", [("1.0x", 1_197_924), ("1.5x", 2_477_792)])
def test_inference_parameter_counts(size, expected):
    model = build_model(validate(nanodet_plus_recipe(size, 320)))
    v = jax.eval_shape(lambda: init_variables(model, KEY, (64, 64)))
    count = sum(x.size for k in ("backbone", "fpn", "head")
                for x in jax.tree_util.tree_leaves(v["params"][k]))
    assert count == expected


def test_init_schemes():
    model = build_model(_small_cfg())
    v = init_variables(model, KEY, (64, 64))
    p, s = v["params"], v["batch_stats"]
    # AGM neck starts as an exact copy of the main neck (reference deep-copies it)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p["aux_fpn"], p["fpn"])
    np.testing.assert_allclose(p["head"]["gfl_cls"]["0"]["bias"], -4.595)
    np.testing.assert_allclose(p["aux_head"]["gfl_cls"]["bias"], -4.595)
    np.testing.assert_allclose(p["aux_head"]["gfl_reg"]["bias"], 0.0)
    np.testing.assert_allclose(p["aux_head"]["scales"]["2"]["scale"], 1.0)
    np.testing.assert_allclose(p["backbone"]["conv1"]["1"]["bias"], 1e-4)
    np.testing.assert_allclose(s["backbone"]["conv1"]["1"]["var"], 1.0)
    # head convs N(0, 0.01); backbone depthwise std 1.0; reduce layer Kaiming fan_out
    assert abs(np.std(p["head"]["cls_convs"]["0"]["0"]["pointwise"]["kernel"]) - 0.01) < 2e-3
    dw = p["backbone"]["stage2"]["0"]["branch2"]["3"]["kernel"]
    assert 0.7 < np.std(dw) < 1.3
    red = p["fpn"]["reduce_layers"]["0"]["conv"]["kernel"]
    assert abs(np.std(red) - math.sqrt(2 / 32)) < 0.05
    ghost = np.asarray(p["fpn"]["top_down_blocks"]["0"]["blocks"]["0"]["ghost1"]
                       ["primary_conv"]["0"]["kernel"])
    assert np.abs(ghost).max() <= 1 / math.sqrt(64) + 1e-7


def test_detach_stops_aux_gradient_into_backbone_and_fpn():
    model = build_model(_small_cfg())
    v = init_variables(model, KEY, (64, 64))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))

    def aux_loss(params, detach):
        (main, aux), _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                     train=True, detach=detach, mutable=["batch_stats"])
        return jnp.sum(aux ** 2), (main, aux)

    grad = jax.grad(aux_loss, has_aux=True)
    # both variants in one program: one compilation, the shared forward computed once
    (g_on, out_on), (g_off, out_off) = jax.jit(lambda p: (grad(p, True), grad(p, False)))(
        v["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, out_on, out_off)  # forward unchanged
    norm = lambda t: float(sum(jnp.sum(jnp.abs(a)) for a in jax.tree_util.tree_leaves(t)))  # noqa: E731
    for k in ("backbone", "fpn", "head"):
        assert norm(g_on[k]) == 0.0, k
    assert norm(g_off["backbone"]) > 0 and norm(g_off["fpn"]) > 0
    for k in ("aux_fpn", "aux_head"):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                       atol=1e-7),
                               g_on[k], g_off[k])


def test_batchnorm_matches_pytorch_rule():
    x = jax.random.normal(jax.random.key(2), (3, 4, 5, 6)) * 2 + 1
    bn = BatchNorm(use_running_average=False)
    v = bn.init(KEY, x)
    v = {"params": v["params"], "batch_stats": {**v["batch_stats"],
                                                "mean": jnp.full(6, 0.5)}}
    y, new = bn.apply(v, x, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64).reshape(-1, 6)
    mean, var = xn.mean(0), xn.var(0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), (xn - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-4, atol=1e-5)
    n = xn.shape[0]
    np.testing.assert_allclose(new["batch_stats"]["mean"], 0.9 * 0.5 + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1),
                               rtol=1e-5)
    assert int(new["batch_stats"]["num_batches_tracked"]) == 1


def test_upsample_matches_torch():
    import torch
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                          scale_factor=2, mode="bilinear", align_corners=False)
    got = np.asarray(upsample_bilinear_2x(jnp.asarray(x))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)
