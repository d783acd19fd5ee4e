"""Checkpoint conversion: file readers, prefix rules, strictness, torchvision backbone, CLI."""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from nanodet_jax.checkpoint import load_variables, save_variables
from nanodet_jax.config import load_config_text
from nanodet_jax.convert import (
    CheckpointMismatchError,
    flax_to_torch,
    load_torch_checkpoint,
    torch_to_flax,
    torchvision_backbone_to_flax,
)
from nanodet_jax.models import build_model, init_variables
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
    base = jax.tree_util.tree_map(np.asarray, jax.eval_shape(
        lambda: init_variables(build_model(cfg), jax.random.key(0), (64, 64))))
    base = jax.tree_util.tree_map(lambda s: np.full(s.shape, 7, s.dtype), base)
    v = torch_to_flax(bad, cfg, strict=False, base_variables=base)
    assert np.all(v["params"]["head"]["gfl_cls"]["0"]["bias"] == 7)
    assert np.all(v["params"]["fpn"]["reduce_layers"]["0"]["conv"]["kernel"] == 7)
    np.testing.assert_array_equal(v["params"]["head"]["gfl_cls"]["1"]["bias"],
                                  sd["head.gfl_cls.1.bias"])


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_torchvision_backbone(path):
    cfg, sd = _fixture(path)
    tv = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    tv["conv5.0.weight"] = np.zeros((1024, 464, 1, 1), np.float32)
    tv["fc.weight"] = np.zeros((1000, 1024), np.float32)
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
