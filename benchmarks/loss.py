"""Benchmark: DSLA assignment + NanoDet-Plus head loss with gradients (AGM), on CPU.

One jitted ``value_and_grad`` of :func:`nanodet_jax.head_loss.head_loss` w.r.t. ``preds`` and
``aux_preds`` for a batch at 416x416 (P = 3598 priors, 80 classes), GTs padded to 30 with
0-30 real boxes per image (seeded). ``--quick``: batch 8 instead of 96.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_jitted
from nanodet_jax.assigner import assign_and_build_targets_batch
from nanodet_jax.box_ops import center_priors
from nanodet_jax.head_loss import HeadLossConfig, head_loss, split_and_decode

# PyTorch reference timings quoted in the project brief (assignment + loss, per image).
REFERENCE = {
    "ms_per_image_range": [11.0, 28.0],
    "ms_per_batch_8_at_320": 91.0,
    "ms_per_batch_16_1.5x_at_416": 443.0,
}


def make_inputs(batch: int, hw: tuple[int, int] = (416, 416), num_classes: int = 80,
                g_max: int = 30, reg_max: int = 7, seed: int = 0):
    """Random head outputs ``(B, P, C + 4K)`` x 2 and padded GTs ``(B, G_max, ...)``."""
    rng = np.random.default_rng(seed)
    p = center_priors(*hw, (8, 16, 32, 64)).shape[0]
    ch = num_classes + 4 * (reg_max + 1)
    preds = rng.normal(0, 1, (batch, p, ch)).astype(np.float32)
    aux = rng.normal(0, 1, (batch, p, ch)).astype(np.float32)
    preds[..., :num_classes] -= 4.0
    aux[..., :num_classes] -= 4.0
    n = rng.integers(0, g_max + 1, batch)
    xy = rng.uniform(0, [hw[1] - 10, hw[0] - 10], (batch, g_max, 2))
    wh = rng.uniform(4, 220, (batch, g_max, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [hw[1], hw[0]])], -1).astype(np.float32)
    labels = rng.integers(0, num_classes, (batch, g_max)).astype(np.int32)
    mask = np.arange(g_max)[None, :] < n[:, None]
    return preds, aux, boxes, labels, mask, int(n.sum())


def run(args) -> dict:
    """Time assignment + loss + gradients; returns ms per batch and per image."""
    quick = getattr(args, "quick", False)
    batch = 8 if quick else 96
    repeats = getattr(args, "repeats", 20)
    repeats = max(1, repeats if quick else min(repeats, 5))  # a batch of 96 takes seconds
    hw = (416, 416)
    cfg = HeadLossConfig(num_classes=80)
    cpu = jax.devices("cpu")[0]
    preds, aux, boxes, labels, mask, n_gts = make_inputs(batch, hw)
    with jax.default_device(cpu):
        args_dev = [jax.device_put(x, cpu) for x in (preds, aux, boxes, labels, mask)]

        @jax.jit
        def step(p, a, b, l, m):
            def f(p, a):
                return head_loss(p, a, b, l, m, hw, cfg)
            return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, a)

        priors = jnp.asarray(center_priors(*hw, cfg.strides))

        @jax.jit
        def assign_only(a, b, l, m):
            cls, _, dec = split_and_decode(a, priors, cfg)
            return assign_and_build_targets_batch(cls, dec, priors, b, l, m, cfg.num_classes)

        full = time_jitted(step, *args_dev, repeats=repeats)
        assign = time_jitted(assign_only, *args_dev[1:], repeats=repeats)
    per_image = round(full["median_ms"] / batch, 3)
    return {
        "device": str(cpu), "batch": batch, "input_hw": list(hw), "num_priors": priors.shape[0],
        "num_classes": 80, "g_max": 30, "total_gts": n_gts, "repeats": repeats,
        "host_load_avg_1min": round(os.getloadavg()[0], 2),  # timings are load-sensitive
        "loss_and_grad": {**full, "ms_per_image": per_image},
        "assign_only": {**assign, "ms_per_image": round(assign["median_ms"] / batch, 3)},
        "reference_pytorch": REFERENCE,
        # < 1: faster than the reference's per-image time (its 11..28 ms range)
        "ms_per_image_over_reference": [round(per_image / r, 3)
                                        for r in REFERENCE["ms_per_image_range"]],
    }
