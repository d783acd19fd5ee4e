"""COCO instances json reader (``CocoDataset``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from nanodet_jax.data.readers.base import (
    MALFORMED,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    Dataset,
    DropLog,
    size_reason,
)
from nanodet_jax.data.record import ImageRecord


def _coco_image(img: Mapping[str, Any], img_dir: str, source: str) -> tuple[int, str, int, int]:
    """``(id, absolute file, height, width)`` of one ``images[]`` entry."""
    try:
        image_id, file_name = img["id"], img["file_name"]
        height, width = int(img["height"]), int(img["width"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: images[] entry {img!r} needs id, file_name, height and "
                         f"width ({e})") from e
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise ValueError(f"{source}: image id {image_id!r} of {file_name} must be an integer")
    return image_id, os.path.abspath(os.path.join(img_dir, file_name)), height, width


def coco_dataset_from_dict(data: Mapping[str, Any], img_dir: str,
                           source: str = "<coco json>") -> Dataset:
    """A :class:`Dataset` from a parsed COCO instances json ``data`` (images under
    ``img_dir``); ``source`` (the json path) names the file in messages."""
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    cat_ids = [int(c["id"]) for c in cats]
    cat2label = {c: i for i, c in enumerate(cat_ids)}
    images = [_coco_image(img, img_dir, source) for img in data.get("images", [])]
    files = {i: f for i, f, _, _ in images}
    per_image: dict[int, tuple[list, list, list]] = {i: ([], [], []) for i in files}
    drops = DropLog()
    for ann in data.get("annotations", []):
        image_id = ann.get("image_id")
        where = (f"{files.get(image_id, source)} (annotation id {ann.get('id')}, image id "
                 f"{image_id}, bbox {ann.get('bbox')}, category {ann.get('category_id')})")
        if image_id not in per_image:
            drops.add(where, UNKNOWN_IMAGE)
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            drops.add(where, MALFORMED)
            continue
        x, y, w, h = (float(v) for v in bbox)
        reason = size_reason(w, h, float(ann.get("area", w * h)))
        if reason is None and ann.get("category_id") not in cat2label:
            reason = UNKNOWN_CATEGORY
        if reason is not None:
            drops.add(where, reason)
            continue
        boxes, labels, ignore = per_image[image_id]
        if ann.get("iscrowd", False) or ann.get("ignore", False):
            ignore.append([x, y, x + w, y + h])
        else:
            boxes.append([x, y, x + w, y + h])
            labels.append(cat2label[ann["category_id"]])
    records = [ImageRecord(i, f, h, w, *per_image[i])
               for i, f, h, w in sorted(images, key=lambda t: t[0])]
    return Dataset(records, [c.get("name", str(c["id"])) for c in cats], cat_ids, drops, source)


class CocoDataset(Dataset):
    """COCO instances json ``ann_path``; images under ``img_path``."""

    def __init__(self, img_path: str, ann_path: str):
        with open(ann_path) as f:
            data = json.load(f)
        d = coco_dataset_from_dict(data, str(img_path), str(ann_path))
        super().__init__(d.records, d.class_names, d.category_ids, d.drops, str(ann_path))
