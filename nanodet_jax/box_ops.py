"""Box and prior geometry shared by the head loss, the assigner and post-processing.

All functions are pure and jit-friendly. Boxes are ``(x1, y1, x2, y2)`` in input-tensor
pixels, distances are ``(left, top, right, bottom)``. Priors are ``(cx, cy, stride, stride)``
with the prior point at the top-left corner of its cell (no half-stride offset), levels
ordered by stride, each flattened row-major (y outer, x inner), as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def clamp_min(x: Array, lo: float | Array) -> Array:
    """``max(x, lo)`` whose gradient is 1 where ``x >= lo`` (torch ``clamp`` semantics).

    ``jnp.maximum`` splits the gradient 0.5/0.5 at ties; the reference's ``clamp(min=...)``
    passes the full gradient at the boundary (e.g. zero-width overlaps in GIoU).
    """
    return jnp.where(x < lo, lo, x)


def clamp_max(x: Array, hi: float | Array) -> Array:
    """``min(x, hi)`` with torch ``clamp(max=...)`` gradient semantics (1 where ``x <= hi``)."""
    return jnp.where(x > hi, hi, x)


def level_sizes(height: int, width: int, strides: Sequence[int]) -> list[tuple[int, int]]:
    """Feature-map sizes ``(ceil(H/s), ceil(W/s))`` for each stride."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def center_priors(height: int, width: int, strides: Sequence[int]) -> np.ndarray:
    """Centre priors of all levels for an ``H x W`` input tensor.

    Returns a host constant ``(P, 4)`` float32 with columns ``(x*s, y*s, s, s)``,
    ``P = sum_s ceil(H/s) * ceil(W/s)``; stride 8 first, row-major within a level.
    """
    rows = []
    for s, (h, w) in zip(strides, level_sizes(height, width, strides)):
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                             indexing="ij")
        sv = np.full(h * w, s, np.float32)
        rows.append(np.stack([xs.reshape(-1) * s, ys.reshape(-1) * s, sv, sv], axis=-1))
    return np.concatenate(rows, axis=0).astype(np.float32)


def distribution_project(reg_logits: Array, reg_max: int) -> Array:
    """Integral of the discretised side distributions ("Integral" in the reference).

    ``reg_logits`` ``(..., 4*(reg_max+1))`` side-major (l, t, r, b) -> ``(..., 4)`` with
    ``d = sum_j softmax(logits)_j * j`` in ``[0, reg_max]`` (units of stride).
    """
    k = reg_max + 1
    x = reg_logits.reshape(*reg_logits.shape[:-1], 4, k)
    p = jax.nn.softmax(x, axis=-1)
    project = jnp.arange(k, dtype=reg_logits.dtype)
    return jnp.sum(p * project, axis=-1)


def distance2bbox(points: Array, distance: Array,
                  max_shape: tuple[int, int] | None = None) -> Array:
    """Decode ``(..., 4)`` ltrb distances around ``(..., 2)`` xy points into xyxy boxes.

    With ``max_shape = (H, W)`` x is clipped to ``[0, W]`` and y to ``[0, H]``.
    """
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    if max_shape is not None:
        h, w = max_shape
        x1 = jnp.clip(x1, 0, w)
        y1 = jnp.clip(y1, 0, h)
        x2 = jnp.clip(x2, 0, w)
        y2 = jnp.clip(y2, 0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1)


def bbox2distance(points: Array, bbox: Array, max_dis: float | None = None,
                  eps: float = 0.1) -> Array:
    """Encode xyxy boxes ``(..., 4)`` as ltrb distances from ``(..., 2)`` points.

    With ``max_dis`` every distance is clipped to ``[0, max_dis - eps]``.
    """
    left = points[..., 0] - bbox[..., 0]
    top = points[..., 1] - bbox[..., 1]
    right = bbox[..., 2] - points[..., 0]
    bottom = bbox[..., 3] - points[..., 1]
    d = jnp.stack([left, top, right, bottom], axis=-1)
    if max_dis is not None:
        d = jnp.clip(d, 0, max_dis - eps)
    return d


def box_area(boxes: Array) -> Array:
    """``(..., 4)`` xyxy -> ``(...)`` area ``(x2-x1)(y2-y1)`` (no +1, may be negative)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def bbox_overlaps(boxes1: Array, boxes2: Array, mode: str = "iou", is_aligned: bool = False,
                  eps: float = 1e-6) -> Array:
    """IoU / GIoU with the reference's conventions (no +1, union and enclosure ``>= eps``).

    ``is_aligned=False``: ``(..., N, 4) x (..., M, 4) -> (..., N, M)``.
    ``is_aligned=True``:  ``(..., N, 4) x (..., N, 4) -> (..., N)``.
    Gradients follow torch: clamps pass the gradient at the boundary, max/min ties split it.
    """
    if mode not in ("iou", "giou"):
        raise ValueError(f"bbox_overlaps: mode must be 'iou' or 'giou', got {mode!r}")
    if not is_aligned:
        boxes1 = boxes1[..., :, None, :]
        boxes2 = boxes2[..., None, :, :]
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = clamp_min(rb - lt, 0.0)
    overlap = wh[..., 0] * wh[..., 1]
    union = clamp_min(area1 + area2 - overlap, eps)
    ious = overlap / union
    if mode == "iou":
        return ious
    enc_lt = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
    enc_rb = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enc_wh = clamp_min(enc_rb - enc_lt, 0.0)
    enc_area = clamp_min(enc_wh[..., 0] * enc_wh[..., 1], eps)
    return ious - (enc_area - union) / enc_area
