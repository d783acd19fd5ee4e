"""Assignment coverage: which ground-truth boxes can ever receive a positive sample.

The DynamicSoftLabelAssigner only considers priors whose centre lies strictly inside a box (all
four deltas ``> 0``, spec §9). A box that, after the resize to the input size, contains no
prior centre (spec §8.1: ``(col * s, row * s)`` for every stride ``s``) is never a positive
sample; a dataset whose boxes are all like that trains to mAP 0.

The geometry is the validation resize (``transforms.resize_matrix`` + ``warp_boxes``, no
augmentation); training's random scale 0.6-1.4 moves sizes around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nanodet_jax.box_ops import center_priors
from nanodet_jax.data.record import ImageRecord
from nanodet_jax.data.transforms import SizeWH, minimum_dst_shape, resize_matrix, warp_boxes


def input_resize(src_wh: SizeWH, input_wh: SizeWH, keep_ratio: bool
                 ) -> tuple[np.ndarray, SizeWH]:
    """The val resize of a ``src_wh`` image to ``input_wh`` (``[width, height]``): matrix
    ``(3, 3)`` and resized size ``(w, h)`` (the aspect-preserving size with ``keep_ratio``,
    as ``transforms.shape_transform`` does)."""
    src = (int(src_wh[0]), int(src_wh[1]))
    dst = (int(input_wh[0]), int(input_wh[1]))
    out_wh = minimum_dst_shape(src, dst) if keep_ratio else dst
    return resize_matrix(src, out_wh, keep_ratio), out_wh


def boxes_contain_a_prior(boxes: np.ndarray, out_wh: SizeWH, strides: Sequence[int]
                          ) -> np.ndarray:
    """``(N,)`` bool: does xyxy box ``boxes (N, 4)`` (input pixels) contain a prior centre of
    a ``out_wh`` input strictly inside (the assigner's ``deltas > 0`` rule)?

    Each level's priors form a grid, so a box contains one iff some grid column lies in
    ``(x1, x2)`` and some row in ``(y1, y2)``: two sorted searches per level. Priors of the
    padded batch tensor beyond ``out_wh`` cannot lie inside boxes clipped to the image, so the
    unpadded size gives the same answer.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    priors = center_priors(int(out_wh[1]), int(out_wh[0]), strides)
    out = np.zeros(len(b), bool)
    for s in np.unique(priors[:, 2]):
        level = priors[priors[:, 2] == s]
        xs, ys = np.unique(level[:, 0]), np.unique(level[:, 1])
        has_x = np.searchsorted(xs, b[:, 2], "left") > np.searchsorted(xs, b[:, 0], "right")
        has_y = np.searchsorted(ys, b[:, 3], "left") > np.searchsorted(ys, b[:, 1], "right")
        out |= has_x & has_y
    return out


@dataclass(frozen=True)
class BoxCoverage:
    """Per box (all records' boxes concatenated in record order), ``(M,)`` arrays:
    ``record`` index, ``index`` within the record, ``label``, ``covered`` (bool) and the
    resized ``width`` / ``height`` in input pixels."""

    record: np.ndarray
    index: np.ndarray
    label: np.ndarray
    covered: np.ndarray
    width: np.ndarray
    height: np.ndarray

    @property
    def fraction(self) -> float:
        """Share of covered boxes (1.0 when there are no boxes)."""
        return float(self.covered.mean()) if len(self.covered) else 1.0

    def worst(self, n: int = 10) -> np.ndarray:
        """Indices of the ``n`` smallest (by resized area) uncovered boxes, smallest first."""
        idx = np.flatnonzero(~self.covered)
        return idx[np.argsort(self.width[idx] * self.height[idx], kind="stable")[:n]]


def assignment_coverage(records: Sequence[ImageRecord], input_wh: SizeWH, keep_ratio: bool,
                        strides: Sequence[int]) -> BoxCoverage:
    """Resize every record's boxes to the input size and test them against the priors
    (records of the same image size are warped together)."""
    by_size: dict[SizeWH, list[int]] = {}
    for i, rec in enumerate(records):
        if rec.num_boxes:
            by_size.setdefault((int(rec.width), int(rec.height)), []).append(i)
    parts = []
    for src_wh, idx in by_size.items():
        recs = [records[i] for i in idx]
        matrix, out_wh = input_resize(src_wh, input_wh, keep_ratio)
        boxes = warp_boxes(np.concatenate([r.boxes for r in recs]), matrix, *out_wh)
        parts.append((np.repeat(idx, [r.num_boxes for r in recs]),
                      np.concatenate([np.arange(r.num_boxes) for r in recs]),
                      np.concatenate([r.labels for r in recs]),
                      boxes, boxes_contain_a_prior(boxes, out_wh, strides)))
    if not parts:
        e = np.zeros(0)
        return BoxCoverage(e.astype(int), e.astype(int), e.astype(np.int32), e.astype(bool),
                           e, e)
    rec_idx, box_idx, labels, boxes, covered = (np.concatenate(p) for p in zip(*parts))
    o = np.lexsort((box_idx, rec_idx))
    b = boxes[o]
    return BoxCoverage(rec_idx[o], box_idx[o], labels[o], covered[o], b[:, 2] - b[:, 0],
                       b[:, 3] - b[:, 1])
