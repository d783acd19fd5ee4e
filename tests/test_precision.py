"""``device.precision: 16``: bfloat16 activations, float32 parameters, losses and updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.config import ConfigError, nanodet_plus_tiny, validate
from nanodet_jax.data.synthetic import CLASS_NAMES, make_scene, scene_rng
from nanodet_jax.models import build_model, init_train_variables
from nanodet_jax.precision import compute_dtype
from nanodet_jax.train.step import fresh_train_step
from tests.configs import light_tiny

SIZE = 96
BF16_REL = 2e-2  # relative-norm bound for bf16 outputs (8 mantissa bits: ~4e-3 per op)


def _cfg(precision: int):
    """The compile-light tiny model (``tests.configs.light_tiny``) at ``precision``."""
    raw = light_tiny(SIZE)
    raw["device"]["precision"] = precision
    raw["schedule"].update(optimizer={"name": "AdamW", "lr": 0.004, "weight_decay": 0.05},
                           warmup={"name": "linear", "steps": 5, "ratio": 0.1})
    return validate(raw, f"<precision {precision}>")


def _batch(n: int = 8, g: int = 12) -> dict:
    """``n`` synthetic scenes (normalised BGR) with their boxes padded to ``g``."""
    images, boxes = np.zeros((n, SIZE, SIZE, 3), np.float32), np.zeros((n, g, 4), np.float32)
    labels, mask = np.zeros((n, g), np.int32), np.zeros((n, g), bool)
    for i in range(n):
        s = make_scene(scene_rng(3, "train", i), SIZE)
        k = min(len(s.boxes), g)
        images[i] = (s.image.astype(np.float32) - 110.0) / 60.0
        boxes[i, :k], labels[i, :k], mask[i, :k] = s.boxes[:k], s.labels[:k], True
    return {"image": images, "gt_boxes": boxes, "gt_labels": labels, "gt_mask": mask}


def test_precision_values():
    assert compute_dtype(32) == jnp.float32 and compute_dtype(16) == jnp.bfloat16
    assert compute_dtype(_cfg(16)) == jnp.bfloat16
    with pytest.raises(ConfigError, match="device.precision"):
        validate({**nanodet_plus_tiny(SIZE, CLASS_NAMES), "device": {"precision": 8}})


def test_bf16_eval_outputs_within_bf16_tolerance_of_float32():
    cfg = _cfg(16)
    model = build_model(cfg)
    variables = init_train_variables(cfg, jax.random.PRNGKey(0))
    images = jnp.asarray(_batch(4)["image"])
    run = jax.jit(lambda v, x: model.apply(v, x, train=False))
    ref = np.asarray(run(variables, images))
    out = run(variables, images.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16  # the whole forward ran in bf16
    out = np.asarray(out.astype(jnp.float32))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= BF16_REL, rel


def test_bf16_trains_with_float32_state():
    """The loss falls over 30 steps on 8 synthetic scenes; params, optimizer state, EMA and
    BN statistics stay float32; the step's losses are float32."""
    cfg = _cfg(16)
    step, state = fresh_train_step(cfg, 100)
    batch = jax.device_put(_batch())
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch, False)
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert metrics["loss"].dtype == jnp.float32 and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
    for tree in (state.params, state.opt_state, state.ema, state.batch_stats):
        for leaf in jax.tree.leaves(tree):
            assert not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.dtype == jnp.float32
