"""The one per-image record every dataset reader produces (spec §11.1).

Readers (COCO json, Pascal VOC xml, YOLO txt, TFDS) differ only in how they find images and
parse annotations; everything downstream (augmentation, loader, dataset check, evaluation)
sees :class:`ImageRecord` and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _boxes(a=None) -> np.ndarray:
    return np.zeros((0, 4), np.float32) if a is None else np.asarray(a, np.float32).reshape(-1, 4)


@dataclass(frozen=True)
class ImageRecord:
    """One image and its annotations.

    * ``image_id``: the dataset's own integer id (COCO ``images[].id``; used in results.json).
    * ``file``: absolute path of the image (or, for in-memory sources such as TFDS, a key
      that ``image`` resolves); ``image``: decoded BGR uint8 ``(H, W, 3)`` for sources that
      carry pixels themselves, else ``None`` (read ``file`` with OpenCV).
    * ``height``, ``width``: original size in pixels, as annotated.
    * ``boxes`` ``(N, 4)`` float32 xyxy in original pixels; ``labels`` ``(N,)`` int32 in
      ``0..C-1`` (contiguous, category ids sorted ascending).
    * ``ignore_boxes`` ``(K, 4)`` float32 xyxy: crowd boxes (ignored in training, kept for
      evaluation).
    """

    image_id: int
    file: str
    height: int
    width: int
    boxes: np.ndarray = field(default_factory=_boxes)
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    ignore_boxes: np.ndarray = field(default_factory=_boxes)
    image: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "boxes", _boxes(self.boxes))
        object.__setattr__(self, "labels", np.asarray(self.labels, np.int32).reshape(-1))
        object.__setattr__(self, "ignore_boxes", _boxes(self.ignore_boxes))
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.file}: {len(self.boxes)} boxes but "
                             f"{len(self.labels)} labels")

    @property
    def num_boxes(self) -> int:
        return int(len(self.labels))
