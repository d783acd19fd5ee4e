"""Forward parity of the Flax model with the reference, data-driven over model_*.npz.

Each fixture describes itself (``config_yaml``, ``input_hw``): the model is built from the
YAML, the reference ``state_dict/*`` is converted, and backbone / neck / head outputs, the
train-mode BatchNorm running-stat update and the state-dict round trip are compared.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.config import load_config_text
from nanodet_jax.convert import flax_to_torch, match_report, torch_to_flax
from nanodet_jax.models import build_model
from tests.fixtures import assert_close, fixture_params, group, load_npz

MODEL_FIXTURES = fixture_params("model_*.npz")
TOL = 1e-4  # max |jax - ref| <= TOL * (1 + |ref|), elementwise


@functools.lru_cache(maxsize=2)
def _load(path):
    data = load_npz(path)
    cfg = load_config_text(str(data["config_yaml"]), source=f"{path.name}:config_yaml")
    variables = torch_to_flax(group(data, "state_dict"), cfg)
    images = jnp.asarray(data["input_images"].transpose(0, 2, 3, 1))
    return data, cfg, variables, images


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_state_dict_matches_model(path):
    data, cfg, _, images = _load(path)
    report = match_report(group(data, "state_dict"), cfg)
    assert report == {"unexpected": [], "missing": [], "mismatched": []}
    assert tuple(images.shape[1:3]) == tuple(int(v) for v in data["input_hw"])


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_eval_forward_parity(path):
    data, cfg, variables, images = _load(path)
    model = build_model(cfg)
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False,
                                          capture_intermediates=lambda m, _: m.name in (
                                              "backbone", "fpn"), mutable=["intermediates"]))
    head_out, state = fn({"params": variables["params"],
                          "batch_stats": variables["batch_stats"]}, images)
    inter = state["intermediates"]
    errs = {}
    backbone = inter["backbone"]["__call__"][0]
    assert len(backbone) == len([k for k in data if k.startswith("eval/backbone_out")])
    for i, f in enumerate(backbone):
        errs[f"backbone_out{i}"] = assert_close(f"backbone_out{i}", _nchw(f),
                                                data[f"eval/backbone_out{i}"])
    n_fpn = len([k for k in data if k.startswith("eval/fpn_out")])
    fpn = inter["fpn"]["__call__"][0]
    assert len(fpn) == n_fpn
    for i, f in enumerate(fpn):
        errs[f"fpn_out{i}"] = assert_close(f"fpn_out{i}", _nchw(f), data[f"eval/fpn_out{i}"])
    errs["head_out"] = assert_close("head_out", head_out, data["eval/head_out"])
    print(f"\n{path.name} eval max abs errors:", {k: f"{v:.2e}" for k, v in errs.items()})


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_train_forward_and_bn_update(path):
    data, cfg, variables, images = _load(path)
    model = build_model(cfg)
    fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    (head_out, aux_out), new_state = fn(variables, images)
    assert_close("train/head_out", head_out, data["train/head_out"])
    assert_close("train/aux_head_out", aux_out, data["train/aux_head_out"])
    after = group(data, "state_dict_after_train")
    assert after, "fixture has no state_dict_after_train/*"
    got = flax_to_torch({"batch_stats": new_state["batch_stats"]})
    for name, ref in after.items():
        assert name in got, f"{name} not produced by the Flax BatchNorm"
        if name.endswith("num_batches_tracked"):
            assert int(got[name]) == int(ref), name
        else:
            # running stats are O(1) quantities: same elementwise bound as activations
            assert_close(name, got[name], ref)


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_state_dict_round_trip_exact(path):
    data, cfg, variables, _ = _load(path)
    sd = group(data, "state_dict")
    back = flax_to_torch(variables, reg_max=int(cfg.model.arch.head.reg_max))
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_parameter_count_matches_reference(path):
    data, _, variables, _ = _load(path)
    sd = group(data, "state_dict")
    buffers = ("running_mean", "running_var", "num_batches_tracked", "project")
    ref = sum(v.size for k, v in sd.items() if not k.endswith(buffers))
    ours = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    assert ours == ref
