"""Benchmark: NanoDet-Plus-m inference on CPU (forward; forward + on-device post-processing).

Per input size (320, 416; ``--quick``: 320 only, fewer repeats): batch-1 latency of the
forward pass and of forward + post-process (decode, NMS, inverse warp), compile time
reported separately; batch-16 throughput (images/s). Random weights (``init_variables``):
the head's class bias starts at -4.595 (sigmoid 0.01 < 0.05), so such a model has no
candidate and the NMS loop is empty; ``postprocess_1000_candidates`` therefore also times
the post-processing alone on synthetic head outputs that fill the pre-NMS top-k (1000
candidates above 0.05), the worst case of the fixed-shape NMS.

The machine may be shared: besides wall-clock times (``time_jitted``) every case reports
``cpu_ms`` = process CPU time (all threads) per call, which does not grow with other
processes' load; on an idle machine with ``n`` cores the wall time is at least
``cpu_ms / n``. The 1-minute load average before and after the run is recorded.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np

from benchmarks.timing import time_jitted
from nanodet_jax import postprocess as pp
from nanodet_jax.config import load_config
from nanodet_jax.inference import inference_variables
from nanodet_jax.models import build_model, init_variables

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # repository checkout

# Reference PyTorch numbers on a 2-core CPU (ms, batch 1): forward / forward + post-process.
REFERENCE_MS = {"320": {"forward": 26.9, "forward_post": 31.2},
                "416": {"forward": 34.0, "forward_post": 38.4}}


def _functions(cfg, size: int):
    variables = inference_variables(init_variables(build_model(cfg), jax.random.key(0),
                                                   (size, size)))
    model = build_model(cfg, with_aux=False)
    head = cfg.model.arch.head
    post = partial(pp.postprocess, input_hw=(size, size), strides=tuple(head.strides),
                   reg_max=int(head.reg_max), inverse_given=True)

    @jax.jit
    def forward(v, x):
        return model.apply(v, x, train=False)

    @jax.jit
    def forward_post(v, x, inv, hw):
        return post(model.apply(v, x, train=False), warp_matrices=inv, img_hw=hw)

    return variables, forward, forward_post, jax.jit(lambda p, inv, hw: post(
        p, warp_matrices=inv, img_hw=hw))


def _timed(fn, *args, repeats: int) -> dict:
    """``time_jitted`` plus ``cpu_ms``: process CPU time per call (after compilation)."""
    res = time_jitted(fn, *args, repeats=repeats)
    t0 = time.process_time()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return {**res, "cpu_ms": round((time.process_time() - t0) * 1e3 / repeats, 3)}


def _inputs(batch: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (batch, size, size, 3)).astype(np.float32)
    inv = np.tile(np.diag([1.25, 1.25, 1.0]).astype(np.float32), (batch, 1, 1))
    hw = np.full((batch, 2), int(size * 1.25), np.int32)
    return x, inv, hw


def _dense_preds(size: int, strides, num_classes: int = 80, reg_max: int = 7, seed: int = 1):
    """Head output with ~2000 candidates above 0.05 (so the pre-NMS top-k is full)."""
    from nanodet_jax.box_ops import center_priors

    p = center_priors(size, size, strides).shape[0]
    rng = np.random.default_rng(seed)
    preds = rng.normal(0, 1, (1, p, num_classes + 4 * (reg_max + 1))).astype(np.float32)
    preds[..., :num_classes] = -6.0
    idx = rng.choice(p * num_classes, 2000, replace=False)
    preds[0, idx // num_classes, idx % num_classes] = rng.uniform(-2.5, 2.0, 2000)
    return preds


def run(args) -> dict:
    """Latency / throughput table; see the module docstring."""
    quick = getattr(args, "quick", False)
    repeats = max(1, min(getattr(args, "repeats", 20), 5 if quick else 20))
    sizes = (320,) if quick else (320, 416)
    cpu = jax.devices("cpu")[0]
    out: dict = {"device": str(cpu), "cpu_count": os.cpu_count(),
                 "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
                 "model": "nanodet-plus-m (1.0x), random weights", "repeats": repeats,
                 "reference_pytorch_2core_ms": REFERENCE_MS, "sizes": {}}
    with jax.default_device(cpu):
        for size in sizes:
            cfg = load_config(CONFIG_DIR / f"nanodet_plus_m_{size}.py")
            variables, forward, forward_post, post = _functions(cfg, size)
            res: dict = {}
            x, inv, hw = (jax.device_put(a, cpu) for a in _inputs(1, size))
            res["batch1_forward"] = _timed(forward, variables, x, repeats=repeats)
            res["batch1_forward_post"] = _timed(forward_post, variables, x, inv, hw,
                                                repeats=repeats)
            dense = jax.device_put(_dense_preds(size, tuple(cfg.model.arch.head.strides)), cpu)
            res["postprocess_1000_candidates"] = _timed(post, dense, inv, hw, repeats=repeats)
            x, inv, hw = (jax.device_put(a, cpu) for a in _inputs(16, size))
            reps16 = max(1, repeats // 4)
            for name, fn, a in (("batch16_forward", forward, (variables, x)),
                                ("batch16_forward_post", forward_post, (variables, x, inv, hw))):
                t = _timed(fn, *a, repeats=reps16)
                res[name] = {**t, "images_per_s": round(16e3 / t["median_ms"], 1)}
            ref = REFERENCE_MS[str(size)]
            res["goal_ms_half_reference"] = {k: v / 2 for k, v in ref.items()}
            res["speedup_vs_reference"] = {
                "forward": round(ref["forward"] / res["batch1_forward"]["median_ms"], 2),
                "forward_post": round(ref["forward_post"]
                                      / res["batch1_forward_post"]["median_ms"], 2)}
            out["sizes"][str(size)] = res
    out["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    return out
