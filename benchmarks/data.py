"""Benchmark: the training data loader alone (decode + augmentation + batching), images/s.

A synthetic COCO-format set (``nanodet_jax.data.synthetic``, 640x640 JPEGs, generated into a
temporary directory) is loaded through ``build_loader`` with the reference training pipeline
of ``configs/nanodet_plus_m_{320,416}.py`` at batch 8, with 0 (in-process threads), 1 and 2
worker processes. The loader starts and stops its worker processes with every epoch: the
wait for each epoch's first batch and after its last are reported apart from the steady
rate.
``warp_ms``: one image warp alone (640x480 -> 320x320 / 416x416, uint8 BGR), median milliseconds
per call: ``nanodet_jax.data.warp.warp_perspective`` (bit-identical to the reference on every
CPU) next to ``cv2.warpPerspective`` with OpenCV's run-time SIMD dispatch, for a scale-only
matrix (validation, and training with the default recipe) and a rotated one.
``--quick``: 24 images, one worker setting.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.timing import time_jitted
from nanodet_jax.config import load_config
from nanodet_jax.data.loader import build_loader
from nanodet_jax.data.readers import CocoDataset
from nanodet_jax.data.synthetic import SyntheticSpec, split_paths, write_synthetic_dataset
from nanodet_jax.data.warp import warp_perspective

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BATCH = 8


def _rate(loader, epochs: int) -> dict:
    """Per epoch: the first batch's wait (``first_batch_s``: worker processes start with
    every epoch) and the wait after the last batch until the epoch ends (``epoch_end_s``:
    workers stop); ``images_per_s``: the steady rate from each epoch's first batch to its
    last."""
    firsts, ends, n, steady = [], [], 0, 0.0
    for e in range(epochs):
        t0 = time.perf_counter()
        it = loader.epoch(e)
        next(it)
        t_first = time.perf_counter()
        firsts.append(round(t_first - t0, 3))
        t_last = t_first
        for b in it:
            n += len(b["image"])
            t_last = time.perf_counter()
        ends.append(round(time.perf_counter() - t_last, 3))
        steady += t_last - t_first
    return {"first_batch_s": firsts, "epoch_end_s": ends, "images": n,
            "images_per_s": round(n / steady, 1) if steady > 0 else None}


def _warp_ms(repeats: int) -> dict:
    """Per-call warp time (median ms) of ours vs OpenCV's SIMD code, side by side (same
    images)."""
    img = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out: dict = {}
    for size in (320, 416):
        scale = np.diag([size / 640, size / 480, 1.0])
        turn = np.array([[np.cos(0.1), -np.sin(0.1), 20.0], [np.sin(0.1), np.cos(0.1), -10.0],
                         [0.0, 0.0, 1.0]]) @ scale
        wh = (size, size)
        for name, m in (("scale", scale), ("rotated", turn)):
            out[f"{size}_{name}"] = {
                "nanodet_jax": time_jitted(warp_perspective, img, m, wh,
                                           repeats=repeats)["median_ms"],
                "opencv_simd": time_jitted(cv2.warpPerspective, img, m, wh,
                                           repeats=repeats)["median_ms"]}
    return out


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    num = 24 if quick else 96
    out: dict = {"cpu_count": os.cpu_count(),
                 "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
                 "batch": BATCH, "source_images": f"{num} synthetic 640x640 JPEGs",
                 "warp_ms": _warp_ms(20 if quick else 200), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_dataset(Path(tmp) / "syn", SyntheticSpec(
            seed=0, num_train=num, num_val=1, size=640))
        img_dir, ann = split_paths(root, "train")
        records = CocoDataset(str(img_dir), str(ann)).records
        for size in (320, 416):
            cfg = load_config(CONFIG_DIR / f"nanodet_plus_m_{size}.py")
            res = {}
            for workers in ((2,) if quick else (0, 1, 2)):
                loader = build_loader(cfg.data.train, records, batch_size=BATCH, seed=0,
                                      train=True, num_workers=workers)
                res[f"workers_{workers}"] = _rate(loader, 1 if quick else 2)
            out["sizes"][str(size)] = res
    return out
