"""Dataset readers: COCO json, Pascal VOC xml, YOLO txt and TFDS -> :class:`ImageRecord` lists.

Spec §11.1. Every reader builds a :class:`Dataset`: the records, ``class_names``,
``category_ids`` (label -> dataset category id, for writing COCO results) and a
:class:`DropLog` counting every annotation it dropped, by reason. :func:`build_dataset` makes
one from a config's ``data.train`` / ``data.val`` node (field names of the reference).

Reference semantics kept: category ids sorted ascending -> labels ``0..C-1``; records sorted
by image id; images without boxes kept; annotations with ``area <= 0``, ``w < 1``, ``h < 1``
or an unknown category dropped; ``[x, y, w, h] -> [x, y, x+w, y+h]``; ``iscrowd`` boxes go to
``ignore_boxes`` (so do ``ignore`` ones, which the reference skips: unused by this head); YOLO
boxes rounded to integer pixels; VOC/YOLO image id = position in the sorted file list + 1,
category id = class index + 1.

Deliberate differences (the reference crashes or loses data silently): VOC coordinates may be
floats; VOC objects of unknown classes, malformed YOLO lines and annotation files without an
image are dropped and counted instead of raising; boxes are not clamped here (the reference's
VOC/YOLO clamp moves ``x1`` to 0 but keeps the width, shifting the box): the warp clips them
(:func:`nanodet_jax.data.transforms.warp_boxes`) and the dataset check reports them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from nanodet_jax.config import ConfigError
from nanodet_jax.data.readers.base import (
    BAD_SIZE,
    CLASS_OUT_OF_RANGE,
    MALFORMED,
    NO_IMAGE,
    TINY,
    UNKNOWN_CATEGORY,
    UNKNOWN_CLASS,
    UNKNOWN_IMAGE,
    ZERO_AREA,
    Dataset,
    DropLog,
)
from nanodet_jax.data.readers.coco import CocoDataset, coco_dataset_from_dict
from nanodet_jax.data.readers.tfds import (
    COCO_CATEGORY_IDS,
    TFDSDataset,
    import_tfds,
    tfds_example_to_record,
)
from nanodet_jax.data.readers.voc import XMLDataset, voc_record
from nanodet_jax.data.readers.yolo import YoloDataset, yolo_boxes

READER_NAMES = ("CocoDataset", "XMLDataset", "YoloDataset", "TFDSDataset")
TFDS_PREFIX = "tfds:"


def _path(node: Mapping[str, Any], key: str, where: str, what: str) -> str:
    value = node.get(key)
    if not value:
        raise ConfigError(f"{where}.{key} is not set ({what})")
    if not os.path.exists(value):
        raise ConfigError(f"{where}.{key}: {value} does not exist ({what})")
    return str(value)


def build_dataset(node: Mapping[str, Any], class_names: Sequence[str] | None = None,
                  where: str = "data.train") -> Dataset:
    """The reader named by ``node.name`` (a ``data.train``/``data.val`` config node).

    ``CocoDataset`` (``img_path``, ``ann_path``), ``XMLDataset`` / ``YoloDataset``
    (``img_path``, ``ann_path``, ``class_names``), ``TFDSDataset`` (TFDS ``coco/2017``) or
    ``tfds:<name>`` (e.g. ``tfds:coco/2017``; ``split`` defaults to ``train`` for
    ``data.train`` and ``validation`` otherwise, ``data_dir`` optional; ``img_path`` /
    ``ann_path`` unused). ``node.class_names`` overrides ``class_names`` (the top-level list);
    ``where`` names the node in errors.
    """
    name = node.get("name") or "CocoDataset"
    names = node.get("class_names") or class_names
    if name in ("XMLDataset", "YoloDataset") and not names:
        raise ConfigError(f"{where}.class_names (or the top-level class_names) is needed by "
                          f"{name}")
    if name == "CocoDataset":
        return CocoDataset(str(node.get("img_path") or ""),
                           _path(node, "ann_path", where, "the COCO instances json"))
    if name == "XMLDataset":
        return XMLDataset(str(node.get("img_path") or ""),
                          _path(node, "ann_path", where, "the folder of VOC *.xml files"),
                          list(names))
    if name == "YoloDataset":
        return YoloDataset(str(node.get("img_path") or ""),
                           _path(node, "ann_path", where, "the folder of YOLO *.txt files"),
                           list(names))
    if name == "TFDSDataset" or str(name).startswith(TFDS_PREFIX):
        tfds_name = str(name)[len(TFDS_PREFIX):] if name != "TFDSDataset" else "coco/2017"
        split = node.get("split") or ("train" if where.endswith("train") else "validation")
        return TFDSDataset(tfds_name, split, node.get("data_dir"), names)
    raise ConfigError(f"{where}.name: unknown dataset {name!r}; accepted: "
                      f"{', '.join(READER_NAMES)} or '{TFDS_PREFIX}<tfds name>' "
                      f"(e.g. '{TFDS_PREFIX}coco/2017')")


__all__ = ["BAD_SIZE", "CLASS_OUT_OF_RANGE", "COCO_CATEGORY_IDS", "MALFORMED", "NO_IMAGE",
           "READER_NAMES", "TINY", "UNKNOWN_CATEGORY", "UNKNOWN_CLASS", "UNKNOWN_IMAGE",
           "ZERO_AREA", "CocoDataset", "Dataset", "DropLog", "TFDSDataset", "XMLDataset",
           "YoloDataset", "build_dataset", "coco_dataset_from_dict", "import_tfds",
           "tfds_example_to_record", "voc_record", "yolo_boxes"]
