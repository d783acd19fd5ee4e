"""Benchmark: the training data loader alone (decode + augmentation + batching), images/s.

A synthetic COCO-format set (``nanodet_jax.data.synthetic``, 640x640 JPEGs, generated into a
temporary directory) is loaded through ``build_loader`` with the reference training pipeline
of ``configs/nanodet_plus_m_{320,416}.py`` at batch 8, with 0 (in-process threads), 1 and 2
worker processes. Worker start-up (the first batch) is reported apart from the steady rate.
``--quick``: 24 images, one worker setting.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from nanodet_jax.config import load_config
from nanodet_jax.data.loader import build_loader
from nanodet_jax.data.readers import CocoDataset
from nanodet_jax.data.synthetic import SyntheticSpec, split_paths, write_synthetic_dataset

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BATCH = 8


def _rate(loader, epochs: int) -> dict:
    t0 = time.perf_counter()
    it = loader.epoch(0)
    next(it)
    first_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += len(b["image"])
    for e in range(1, epochs):
        for b in loader.epoch(e):
            n += len(b["image"])
    dt = time.perf_counter() - t0
    return {"first_batch_s": round(first_s, 3), "images": n,
            "images_per_s": round(n / dt, 1) if dt > 0 else None}


def run(args) -> dict:
    quick = getattr(args, "quick", False)
    num = 24 if quick else 96
    out: dict = {"cpu_count": os.cpu_count(),
                 "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
                 "batch": BATCH, "source_images": f"{num} synthetic 640x640 JPEGs",
                 "sizes": {}}
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
