"""Checkpoint conversion: file readers, prefix rules, strictness, torchvision backbone, CLI."""

from __future__ import annotations

import functools
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from nanodet_jax.checkpoint import INIT_HW, load_variables, save_variables
from nanodet_jax.config import ConfigError, load_config_text, validate
from nanodet_jax.convert import (
    PROJECT_BUFFER_SUFFIX,
    CheckpointMismatchError,
    CheckpointMismatchWarning,
    flax_to_torch,
    load_torch_checkpoint,
    torch_to_flax,
    torchvision_backbone_to_flax,
)
from nanodet_jax.models import (
    REFERENCE_IMAGENET_FILES,
    build_model,
    init_train_variables,
    init_variables,
)
from tests.fixtures import REPO_ROOT, fixture_params, group, load_npz

MODEL_FIXTURES = fixture_params("model_*.npz")


@functools.lru_cache(maxsize=1)
def _fixture(path):
    data = load_npz(path)
    cfg = load_config_text(str(data["config_yaml"]))
    return cfg, group(data, "state_dict")


def _torch(sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def _equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_ckpt_prefers_ema_and_pth_plain(path, tmp_path):
    cfg, sd = _fixture(path)
    ema = {k: (v + 1 if v.dtype.kind == "f" else v) for k, v in sd.items()}
    lightning = {"epoch": 3, "global_step": 10,
                 "state_dict": {**{f"model.{k}": v for k, v in _torch(sd).items()},
                                **{f"avg_model.{k}": v for k, v in _torch(ema).items()}}}
    torch.save(lightning, tmp_path / "model_best.ckpt")
    _equal(load_torch_checkpoint(tmp_path / "model_best.ckpt"), ema)
    _equal(load_torch_checkpoint(tmp_path / "model_best.ckpt", prefer_ema=False), sd)
    torch.save({"state_dict": _torch(sd)}, tmp_path / "w.pth")
    _equal(load_torch_checkpoint(tmp_path / "w.pth"), sd)
    torch.save({f"module.{k}": v for k, v in _torch(sd).items()}, tmp_path / "ddp.pth")
    _equal(load_torch_checkpoint(tmp_path / "ddp.pth"), sd)
    v = load_variables(tmp_path / "w.pth", cfg)
    _equal(flax_to_torch(v, reg_max=int(cfg.model.arch.head.reg_max)), sd)


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "obj": functools.partial(print)},
               tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        load_torch_checkpoint(tmp_path / "bad.ckpt")
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_mismatches_are_named(path):
    cfg, sd = _fixture(path)
    bad = dict(sd)
    del bad["fpn.reduce_layers.0.conv.weight"]
    bad["head.extra_thing.weight"] = np.zeros(3, np.float32)
    bad["head.gfl_cls.0.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        torch_to_flax(bad, cfg)
    msg = str(e.value)
    for name in ("fpn.reduce_layers.0.conv.weight", "head.extra_thing.weight",
                 "head.gfl_cls.0.bias"):
        assert name in msg
    # non-strict: fill from base variables, skip the rest (reference fine-tuning behaviour)
    base = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7, s.dtype), jax.eval_shape(
        lambda: init_variables(build_model(cfg), jax.random.key(0), (64, 64))))
    v = torch_to_flax(bad, cfg, strict=False, base_variables=base)
    assert np.all(v["params"]["head"]["gfl_cls"]["0"]["bias"] == 7)
    assert np.all(v["params"]["fpn"]["reduce_layers"]["0"]["conv"]["kernel"] == 7)
    np.testing.assert_array_equal(v["params"]["head"]["gfl_cls"]["1"]["bias"],
                                  sd["head.gfl_cls.1.bias"])


def _torchvision_sd(sd):
    """torchvision ShuffleNetV2 state dict (no ``backbone.`` prefix, with conv5/fc) made from
    the backbone entries of a NanoDet state dict."""
    tv = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    tv["conv5.0.weight"] = np.zeros((1024, 464, 1, 1), np.float32)
    tv["fc.weight"] = np.zeros((1000, 1024), np.float32)
    return tv


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_torchvision_backbone(path):
    cfg, sd = _fixture(path)
    tv = _torchvision_sd(sd)
    base = init_variables(build_model(cfg), jax.random.key(0), (64, 64))
    v = torchvision_backbone_to_flax(tv, base, cfg)
    got = flax_to_torch({c: {"backbone": v[c]["backbone"]} for c in v})
    _equal(got, {k: v for k, v in sd.items() if k.startswith("backbone.")})
    jax.tree_util.tree_map(np.testing.assert_array_equal, v["params"]["head"],
                           base["params"]["head"])
    tv["stage2.0.branch1.0.weight"] = np.zeros((3, 1, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError, match="stage2.0.branch1.0.weight"):
        torchvision_backbone_to_flax(tv, base, cfg)


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_orbax_round_trip_and_cli(path, tmp_path):
    cfg, sd = _fixture(path)
    yml = tmp_path / "cfg.yml"
    yml.write_text(str(load_npz(path)["config_yaml"]))
    torch.save({"state_dict": _torch(sd)}, tmp_path / "ref.pth")
    run = [sys.executable, str(REPO_ROOT / "scripts" / "convert_checkpoint.py"), "--config",
           str(yml)]
    subprocess.run(run + ["--checkpoint", str(tmp_path / "ref.pth"), "--out",
                          str(tmp_path / "flax")], check=True, capture_output=True)
    subprocess.run(run + ["--checkpoint", str(tmp_path / "flax"), "--out",
                          str(tmp_path / "back.pth")], check=True, capture_output=True)
    _equal(load_torch_checkpoint(tmp_path / "back.pth"), sd)
    r = subprocess.run(run + ["--checkpoint", str(tmp_path / "ref.pth"), "--out",
                              str(tmp_path / "flax")], capture_output=True, text=True)
    assert r.returncode != 0 and "exists" in r.stderr  # nothing already written is lost
    with pytest.raises(FileExistsError):
        save_variables(tmp_path / "flax", load_variables(tmp_path / "flax", cfg))


def _with(path, num_classes=None, pretrain=None):
    """The fixture's config with ``num_classes`` classes and/or backbone ``pretrain``."""
    raw = yaml.safe_load(str(load_npz(path)["config_yaml"]))
    arch = raw["model"]["arch"]
    if num_classes is not None:
        raw["class_names"] = [f"class{i}" for i in range(num_classes)]
        arch["head"]["num_classes"] = arch["aux_head"]["num_classes"] = num_classes
    if pretrain is not None:
        arch["backbone"]["pretrain"] = pretrain
    return validate(raw)


def _mismatch_warnings(fn):
    """``fn()`` and the ``CheckpointMismatchWarning`` messages it emitted."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in rec if issubclass(w.category,
                                                            CheckpointMismatchWarning)]


def _check_finetune_tree(v, base, sd):
    """``v`` has the tree of ``base``; fitting entries equal ``sd``, the others ``base``.
    Returns the torch names taken from ``base``."""
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(base)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)),
                           v, base)
    got, fresh = flax_to_torch(v), flax_to_torch(base)
    replaced = set()
    for k, ref in sd.items():
        if k.endswith(PROJECT_BUFFER_SUFFIX):
            continue
        if got[k].shape == ref.shape:
            np.testing.assert_array_equal(got[k], ref, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], fresh[k], err_msg=k)
            replaced.add(k)
    return replaced


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_finetune_other_num_classes(path, tmp_path):
    """Reference fine-tuning load (spec §14.2): an 80-class state dict into a 5-class config
    gives a complete tree; gfl_cls entries come from the base, all named in one warning."""
    _, sd = _fixture(path)
    cfg5 = _with(path, num_classes=5)
    model = build_model(cfg5)
    base = init_variables(model, jax.random.key(1), INIT_HW)
    v, msgs = _mismatch_warnings(lambda: torch_to_flax(sd, cfg5, strict=False,
                                                       base_variables=base))
    replaced = _check_finetune_tree(v, base, sd)
    gfl = [f"head.gfl_cls.{lvl}.{n}" for lvl in range(len(cfg5.model.arch.head.strides))
           for n in ("weight", "bias")] + ["aux_head.gfl_cls.weight", "aux_head.gfl_cls.bias"]
    assert replaced == set(gfl)
    assert len(msgs) == 1
    for name in gfl:
        assert name in msgs[0]
    k4, d = 4 * (cfg5.model.arch.head.reg_max + 1), cfg5.model.arch.head.feat_channels
    assert (f"head.gfl_cls.0.weight: checkpoint ({80 + k4}, {d}, 1, 1) vs model "
            f"({5 + k4}, {d}, 1, 1)") in msgs[0]
    # the forward runs, eval and train mode (AGM)
    x = jnp.zeros((1, 64, 64, 3), jnp.float32)
    out = model.apply(v, x)
    (main, aux), _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    assert out.shape == main.shape == aux.shape and out.shape[-1] == 5 + k4
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(aux)))
    # strict: the existing error; non-strict without a base: says to pass base_variables
    with pytest.raises(CheckpointMismatchError, match="head.gfl_cls.0.weight"):
        torch_to_flax(sd, cfg5)
    with pytest.raises(CheckpointMismatchError, match="base_variables"):
        torch_to_flax(sd, cfg5, strict=False)
    # the same through load_variables on a .pth file (base: fresh init drawn with rng)
    torch.save({"state_dict": _torch(sd)}, tmp_path / "coco.pth")
    v2, msgs2 = _mismatch_warnings(lambda: load_variables(
        tmp_path / "coco.pth", cfg5, strict=False, rng=jax.random.key(1)))
    assert len(msgs2) == 1 and "head.gfl_cls.0.weight" in msgs2[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, v2, v)
    # and from an orbax directory
    save_variables(tmp_path / "coco_flax", torch_to_flax(sd, _fixture(path)[0]))
    v3, msgs3 = _mismatch_warnings(lambda: load_variables(
        tmp_path / "coco_flax", cfg5, strict=False, rng=jax.random.key(1)))
    assert len(msgs3) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, v3, v)


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_non_strict_unexpected_only(path):
    """Unexpected keys alone need no base: ignored, named in one warning, rest exact."""
    cfg, sd = _fixture(path)
    extra = {**sd, "head.extra_thing.weight": np.zeros(3, np.float32)}
    v, msgs = _mismatch_warnings(lambda: torch_to_flax(extra, cfg, strict=False))
    assert len(msgs) == 1 and "head.extra_thing.weight" in msgs[0]
    _equal(flax_to_torch(v, reg_max=int(cfg.model.arch.head.reg_max)), sd)
    _, msgs = _mismatch_warnings(lambda: torch_to_flax(sd, cfg, strict=False))
    assert msgs == []


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_init_train_variables_pretrain(path, tmp_path):
    """``backbone.pretrain``: False -> random init; a torchvision .pth path -> that backbone
    on the random init; True -> ConfigError (the reference would download)."""
    _, sd = _fixture(path)
    key = jax.random.key(3)
    fresh = init_variables(build_model(_with(path, pretrain=False)), key, INIT_HW)
    v = init_train_variables(_with(path, pretrain=False), key, INIT_HW)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v, fresh)

    tv = _torchvision_sd(sd)
    del tv["conv1.1.num_batches_tracked"]  # older torchvision files lack the counters
    torch.save(_torch(tv), tmp_path / "shufflenetv2.pth")
    v = init_train_variables(_with(path, pretrain=str(tmp_path / "shufflenetv2.pth")), key,
                             INIT_HW)
    got = flax_to_torch({c: {"backbone": v[c]["backbone"]} for c in v})
    bb_fresh = flax_to_torch({c: {"backbone": fresh[c]["backbone"]} for c in fresh})
    _equal(got, {k: (bb_fresh[k] if k == "backbone.conv1.1.num_batches_tracked" else a)
                 for k, a in sd.items() if k.startswith("backbone.")})
    for part in ("fpn", "head", "aux_fpn", "aux_head"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, v["params"][part],
                               fresh["params"][part])

    with pytest.raises(ConfigError, match="model.arch.backbone.pretrain") as e:
        init_train_variables(_with(path, pretrain=str(tmp_path / "nope.pth")), key, INIT_HW)
    assert "nope.pth" in str(e.value)
    cfg_true = _with(path, pretrain=True)
    imagenet_file = REFERENCE_IMAGENET_FILES[cfg_true.model.arch.backbone.model_size]
    if imagenet_file is None:  # 1.5x/2.0x: the reference has no ImageNet weights either
        with pytest.warns(UserWarning, match="no ImageNet weights"):
            v = init_train_variables(cfg_true, key, INIT_HW)
        jax.tree_util.tree_map(np.testing.assert_array_equal, v, fresh)
        return
    with pytest.raises(ConfigError, match="model.arch.backbone.pretrain") as e:
        init_train_variables(cfg_true, key, INIT_HW)
    msg = str(e.value)
    assert "downloads" in msg and imagenet_file in msg and "False" in msg
