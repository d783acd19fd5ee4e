"""A picture of what the network will see: a grid of loader samples (augmented for the
training split) with their GT boxes and class names, written as one PNG."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from nanodet_jax.data.augment import normalize_stats
from nanodet_jax.data.loader import build_loader
from nanodet_jax.data.readers import build_dataset


def denormalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(H, W, 3)`` normalised float32 BGR -> uint8 BGR (inverse of ``normalize``)."""
    out = img * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def class_color(label: int, num_classes: int) -> tuple[int, int, int]:
    """A distinct BGR colour per class (evenly spaced hues)."""
    r, g, b = colorsys.hsv_to_rgb((label % max(num_classes, 1)) / max(num_classes, 1), 0.9, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_boxes(img: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
               class_names: Sequence[str]) -> np.ndarray:
    """Draw ``(N, 4)`` xyxy ``boxes`` with their class names on a copy of uint8 ``img``."""
    out = img.copy()
    for (x1, y1, x2, y2), lab in zip(np.asarray(boxes), np.asarray(labels)):
        color = class_color(int(lab), len(class_names))
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, color, 1, cv2.LINE_AA)
        name = class_names[int(lab)] if 0 <= int(lab) < len(class_names) else str(int(lab))
        (tw, th), _ = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)
        ty = max(p1[1], th + 2)
        cv2.rectangle(out, (p1[0], ty - th - 2), (p1[0] + tw + 2, ty), color, -1)
        cv2.putText(out, name, (p1[0] + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


def tile(images: Sequence[np.ndarray], cols: int, gap: int = 4) -> np.ndarray:
    """Equal-size ``(H, W, 3)`` images -> one grid image, ``cols`` per row, white gaps."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // cols)
    grid = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[gap + r * (h + gap):gap + r * (h + gap) + h,
             gap + c * (w + gap):gap + c * (w + gap) + w] = im
    return grid


def save_sample_grid(cfg: Any, split: str, path: str | Path, num: int = 16,
                     seed: int = 0) -> Path:
    """Write a PNG grid of ``num`` loader samples of ``data.<split>`` (training split:
    augmented exactly as in epoch 0 of a run with ``seed``) with boxes and class names.

    Refuses to overwrite an existing file.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose another --save-grid path")
    node = cfg.data[split]
    dataset = build_dataset(node, list(cfg.class_names), where=f"data.{split}")
    num = min(num, len(dataset))
    loader = build_loader(node, dataset.records, batch_size=num, seed=seed,
                          train=split == "train", field=f"data.{split}")
    batch = next(iter(loader.epoch(0)))
    mean, std = normalize_stats(node.get("pipeline"))
    pictures = [draw_boxes(denormalize(batch["image"][i], mean, std),
                           batch["gt_boxes"][i][batch["gt_mask"][i]],
                           batch["gt_labels"][i][batch["gt_mask"][i]], dataset.class_names)
                for i in range(num) if batch["valid"][i]]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), tile(pictures, cols=min(4, len(pictures)))):
        raise OSError(f"could not write {path}")
    return path
