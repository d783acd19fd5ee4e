"""YOLO txt reader (``YoloDataset``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nanodet_jax.data.readers.base import (
    CLASS_OUT_OF_RANGE,
    MALFORMED,
    NO_IMAGE,
    Dataset,
    DropLog,
    files_under,
    image_hw,
    size_reason,
)
from nanodet_jax.data.record import ImageRecord

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tiff")


def yolo_boxes(lines: Sequence[str], height: int, width: int, num_classes: int,
               where: str, drops: DropLog) -> tuple[np.ndarray, np.ndarray]:
    """YOLO lines ``cls cx cy w h`` (normalised) -> ``boxes (N, 4)`` xyxy integer pixels,
    ``labels (N,)``; the top-left corner and the size are rounded as in the reference."""
    boxes, labels = [], []
    for k, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        at = f"{where} (line {k + 1}: {line.strip()!r})"
        try:
            cls, cx, cy, w, h = (float(v) for v in parts)
        except ValueError:
            drops.add(at, MALFORMED)
            continue
        if not (np.isfinite(cls) and cls == int(cls) and 0 <= cls < num_classes):
            drops.add(at, CLASS_OUT_OF_RANGE)
            continue
        x1, y1 = float(np.round((cx - w / 2) * width)), float(np.round((cy - h / 2) * height))
        bw, bh = float(np.round(w * width)), float(np.round(h * height))
        reason = size_reason(bw, bh)
        if reason is not None:
            drops.add(at, reason)
            continue
        boxes.append([x1, y1, x1 + bw, y1 + bh])
        labels.append(int(cls))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32)


def _find_image(stem: Path) -> Path | None:
    for ext in IMAGE_EXTS:
        p = stem.with_name(stem.name + ext)
        if p.is_file():
            return p
    return None


class YoloDataset(Dataset):
    """YOLO txt: every ``*.txt`` under ``ann_path`` (recursive, sorted; ``classes.txt``
    skipped); the image is ``img_path/<same relative stem>.{png,jpg,jpeg,bmp,tiff}`` (else
    next to the txt); its size is read from the file; image id = position + 1."""

    def __init__(self, img_path: str, ann_path: str, class_names: Sequence[str]):
        drops, records = DropLog(), []
        txts = [p for p in files_under(ann_path, ".txt") if p.name != "classes.txt"]
        for idx, txt in enumerate(txts):
            rel = txt.relative_to(ann_path).with_suffix("")
            image = _find_image(Path(img_path) / rel) or _find_image(txt.with_suffix(""))
            hw = None if image is None else image_hw(str(image))
            if hw is None:
                drops.add(f"{txt} (looked for {Path(img_path) / rel}.{{png,jpg,...}})", NO_IMAGE)
                continue
            boxes, labels = yolo_boxes(txt.read_text().splitlines(), hw[0], hw[1],
                                       len(class_names), str(txt), drops)
            records.append(ImageRecord(idx + 1, str(image.resolve()), hw[0], hw[1], boxes,
                                       labels))
        super().__init__(records, class_names, None, drops, str(ann_path))
