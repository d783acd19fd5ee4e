"""Synthetic shapes (the embedded default dataset): NanoDet-Plus-m 1.0x, 320x320, from scratch.

Five classes (circle, rectangle, triangle, star, ring; colour independent of class), 1000
training and 100 validation images generated from seed 0 by ``nanodet_jax.data.synthetic``.
Loading this config only computes the cache paths
(``$NANODET_DATA_DIR``/``~/.cache/nanodet_jax`` + ``synthetic_0_1000_100_320``); the data
is generated on first use by the training script
(``synthetic.ensure_synthetic_for_path(cfg.data.train.ann_path)``) or beforehand with
``python scripts/make_synthetic_dataset.py`` (about half a minute on 2 cores).

Schedule sized for a short CPU run: 31 steps/epoch at batch 32, 24 epochs (~750 steps),
warmup 100 steps, cosine over the 24 epochs, validation every 4 epochs.
"""

from dataclasses import asdict

import ml_collections

from nanodet_jax.config import nanodet_plus_recipe
from nanodet_jax.data.synthetic import (
    CLASS_NAMES,
    SyntheticSpec,
    split_paths,
    synthetic_dataset_dir,
)

SYNTHETIC = SyntheticSpec(seed=0, num_train=1000, num_val=100, size=320)
EPOCHS = 24


def get_config() -> ml_collections.ConfigDict:
    cfg = nanodet_plus_recipe(model_size="1.0x", input_size=SYNTHETIC.size,
                              name="nanodet-plus-m_synthetic")
    cfg["save_dir"] = "workspace/synthetic"
    cfg["class_names"] = list(CLASS_NAMES)
    arch = cfg["model"]["arch"]
    arch["head"]["num_classes"] = arch["aux_head"]["num_classes"] = len(CLASS_NAMES)
    arch["backbone"]["pretrain"] = False
    root = synthetic_dataset_dir(**asdict(SYNTHETIC))
    for split in ("train", "val"):
        img_dir, ann_file = split_paths(root, split)
        cfg["data"][split]["img_path"], cfg["data"][split]["ann_path"] = str(img_dir), str(
            ann_file)
    cfg["device"].update(batchsize_per_gpu=32, workers_per_gpu=2)
    cfg["schedule"].update(
        total_epochs=EPOCHS, val_intervals=4,
        warmup={"name": "linear", "steps": 100, "ratio": 0.0001},
        lr_schedule={"name": "CosineAnnealingLR", "T_max": EPOCHS, "eta_min": 0.00005})
    cfg["log"]["interval"] = 10
    return ml_collections.ConfigDict(cfg)
