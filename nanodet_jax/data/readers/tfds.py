"""TensorFlow Datasets reader (``TFDSDataset``); ``tensorflow_datasets`` is an optional extra
imported only when a TFDS dataset is built. :func:`tfds_example_to_record` is pure numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nanodet_jax.data.readers.base import CLASS_OUT_OF_RANGE, Dataset, DropLog, size_reason
from nanodet_jax.data.record import ImageRecord

TFDS_INSTALL = 'pip install "nanodet_jax[tfds]"'
# COCO category ids of the 80 contiguous labels (TFDS ``coco/*`` labels carry no ids).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)


def _as_str(v: Any) -> str:
    v = v.item() if isinstance(v, np.ndarray) else v
    return v.decode() if isinstance(v, bytes) else str(v)


def tfds_example_to_record(example: Mapping[str, Any], num_classes: int,
                           drops: DropLog) -> ImageRecord:
    """One example in the TFDS ``coco/2017`` feature format -> record with ``image`` set.

    ``example``: ``image (H, W, 3)`` uint8 RGB (converted to BGR), ``image/id``,
    ``image/filename`` (becomes ``file``), ``objects``: ``bbox (N, 4)`` normalised
    ``[ymin, xmin, ymax, xmax]``, ``label (N,)`` contiguous, ``is_crowd (N,)`` (``area``,
    ``id`` unused). Boxes are filtered like COCO annotations.
    """
    image = np.asarray(example["image"], np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
    image = np.ascontiguousarray(image[..., ::-1])
    height, width = int(image.shape[0]), int(image.shape[1])
    file = _as_str(example["image/filename"])
    objects = example.get("objects", {})
    yx = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float64).reshape(-1, 4)
    xyxy = yx[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float64)
    labels = np.asarray(objects.get("label", np.zeros(len(yx))), np.int64).reshape(-1)
    crowd = np.asarray(objects.get("is_crowd", np.zeros(len(yx))), bool).reshape(-1)
    boxes, keep_labels, ignore = [], [], []
    for k, (b, lab, c) in enumerate(zip(xyxy, labels, crowd)):
        where = f"{file} (object {k}, label {lab}, box {np.round(b, 1).tolist()})"
        reason = size_reason(b[2] - b[0], b[3] - b[1])
        if reason is None and not 0 <= lab < num_classes:
            reason = CLASS_OUT_OF_RANGE
        if reason is not None:
            drops.add(where, reason)
        elif c:
            ignore.append(b)
        else:
            boxes.append(b)
            keep_labels.append(int(lab))
    return ImageRecord(int(np.asarray(example["image/id"])), file, height, width, boxes,
                       keep_labels, ignore, image)


def import_tfds() -> Any:
    """``tensorflow_datasets``, or an ImportError saying how to install the optional extra."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("TFDSDataset needs tensorflow_datasets, an optional extra: "
                          f"{TFDS_INSTALL}") from e
    return tfds


class TFDSDataset(Dataset):
    """A prepared TFDS dataset (``tfds.load(name, split, data_dir, download=False)``), e.g.
    ``coco/2017``; pixels are held in memory (``ImageRecord.image``)."""

    def __init__(self, name: str = "coco/2017", split: str = "train",
                 data_dir: str | None = None, class_names: Sequence[str] | None = None):
        tfds = import_tfds()
        ds, info = tfds.load(name, split=split, data_dir=data_dir, download=False,
                             with_info=True)
        names = list(class_names or info.features["objects"]["label"].names)
        drops = DropLog()
        records = [tfds_example_to_record(ex, len(names), drops) for ex in tfds.as_numpy(ds)]
        records.sort(key=lambda r: r.image_id)
        is_coco = name.split("/")[0] == "coco" and len(names) == len(COCO_CATEGORY_IDS)
        super().__init__(records, names, COCO_CATEGORY_IDS if is_coco else None, drops,
                         f"tfds:{name}[{split}]")
