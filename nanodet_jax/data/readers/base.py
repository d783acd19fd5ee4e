"""Shared reader parts: the :class:`Dataset` every reader builds, the drop log and its
reasons, the reference's box-size filter and small file helpers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from nanodet_jax.data.record import ImageRecord

# Drop reasons (keys of ``Dataset.dropped``).
BAD_SIZE = "zero or negative width/height"
TINY = "width or height < 1 px"
ZERO_AREA = "annotated area <= 0"
UNKNOWN_CATEGORY = "unknown category id"
UNKNOWN_CLASS = "class name not in class_names"
CLASS_OUT_OF_RANGE = "class id outside 0..len(class_names)-1"
UNKNOWN_IMAGE = "annotation of an unknown image id"
MALFORMED = "malformed annotation"
NO_IMAGE = "annotation file without a readable image"


@dataclass
class DropLog:
    """Dropped annotations: ``counts`` (reason -> n) and up to ``per_reason`` examples per
    reason as ``(where, reason)`` pairs, ``where`` naming the file (and annotation)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)
    per_reason: int = 5

    def add(self, where: str, reason: str) -> None:
        """Count one dropped annotation (or annotation file) of ``reason`` at ``where``."""
        n = self.counts.get(reason, 0)
        self.counts[reason] = n + 1
        if n < self.per_reason:
            self.examples.append((where, reason))


class Dataset:
    """A list of :class:`ImageRecord` plus class metadata and the readers' drop log.

    ``category_ids[label]`` is the dataset's category id of contiguous ``label``;
    ``dropped`` maps reason -> count, ``drop_examples`` lists ``(where, reason)`` pairs.
    """

    def __init__(self, records: Sequence[ImageRecord], class_names: Sequence[str],
                 category_ids: Sequence[int] | None = None, drops: DropLog | None = None,
                 source: str = ""):
        self.records = list(records)
        self.class_names = [str(n) for n in class_names]
        self.category_ids = ([int(c) for c in category_ids] if category_ids is not None
                             else list(range(1, len(self.class_names) + 1)))
        self.drops = drops if drops is not None else DropLog()
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    @property
    def dropped(self) -> dict[str, int]:
        return dict(self.drops.counts)

    @property
    def drop_examples(self) -> list[tuple[str, str]]:
        return list(self.drops.examples)

    @property
    def num_boxes(self) -> int:
        return sum(r.num_boxes for r in self.records)

    @property
    def max_boxes(self) -> int:
        """Largest box count of one image (the ``G_max`` padding of a batch)."""
        return max((r.num_boxes for r in self.records), default=0)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}: {len(self)} images, "
                f"{self.num_boxes} boxes, {len(self.class_names)} classes, "
                f"{sum(self.drops.counts.values())} dropped)")


def size_reason(w: float, h: float, area: float | None = None) -> str | None:
    """The reference's box filter: the drop reason of a ``w x h`` box, or ``None`` to keep."""
    if not (w > 0 and h > 0):
        return BAD_SIZE
    if area is not None and not area > 0:
        return ZERO_AREA
    if w < 1 or h < 1:
        return TINY
    return None


def files_under(root: str, ext: str) -> list[Path]:
    """Every ``*ext`` file under ``root`` (recursive), sorted by relative path."""
    return sorted(p for p in Path(root).rglob(f"*{ext}") if p.is_file())


def image_hw(path: str) -> tuple[int, int] | None:
    """``(height, width)`` of an image file as OpenCV decodes it, ``None`` if unreadable."""
    img = cv2.imread(path)
    return None if img is None else (int(img.shape[0]), int(img.shape[1]))
