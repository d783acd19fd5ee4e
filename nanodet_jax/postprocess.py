"""On-device post-processing: decode, class-aware NMS and inverse warp (jit, fixed shapes).

Reproduces the reference ``get_bboxes`` / ``multiclass_nms`` / ``post_process``:

* candidates are all (prior, class) pairs with ``score > score_thr`` (strict, float32),
  ordered prior-major then class;
* class-aware NMS by offsetting every candidate box by ``label * (max_coord + 1)`` in float32,
  ``max_coord`` = largest coordinate over all candidate boxes of the image;
* greedy NMS (torchvision CPU semantics): candidates in descending score order (stable: ties
  keep the candidate order), IoU in float32 without ``+1`` and without eps, a box is
  suppressed when ``IoU > iou_thr`` compared in double precision (so an IoU of exactly
  ``float32(0.6)`` is suppressed at 0.6);
* at most ``max_num`` detections after NMS.

Fixed shapes: only the ``pre_nms_top_k`` best candidates (default 1000) enter NMS. The
result equals the reference whenever an image has at most ``pre_nms_top_k`` candidates
above ``score_thr`` (the reference has no such bound). Outputs are padded to
``M = max_num`` (or ``M = min(pre_nms_top_k, n*C)`` when ``max_num <= 0``, "no limit") and
come with a ``valid`` mask; padded rows have zero boxes/scores and label ``-1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax import box_ops

Array = jax.Array

DEFAULT_STRIDES = (8, 16, 32, 64)


class Detections(NamedTuple):
    """Padded detections; leading batch axes ``...`` optional.

    boxes ``(..., M, 4)`` xyxy float32, scores ``(..., M)``, labels ``(..., M)`` int32
    (``-1`` where invalid), valid ``(..., M)`` bool. Valid rows come first, in descending
    score order.
    """

    boxes: Array
    scores: Array
    labels: Array
    valid: Array


def iou_threshold_f32(iou_thr: float) -> np.float32:
    """Smallest float32 ``t`` such that, for float32 ``iou``, ``iou > iou_thr`` evaluated in
    double precision is equivalent to ``iou >= t`` in float32."""
    t = np.float32(iou_thr)
    if float(t) <= float(iou_thr):
        t = np.nextafter(t, np.float32(np.inf))
    return t


def _greedy_nms(boxes: Array, valid: Array, iou_thr: float, limit: int) -> Array:
    """Greedy NMS over score-sorted ``boxes (K, 4)``; ``valid (K,)`` must be a prefix mask.

    Returns the keep mask ``(K,)``; stops after ``limit`` kept boxes. Overlap follows
    torchvision: ``inter / (area_i + area_j - inter)`` in float32 (NaN for two empty boxes,
    which never suppresses).
    """
    k = boxes.shape[0]
    thr = iou_threshold_f32(iou_thr)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    idx = jnp.arange(k)
    n_valid = jnp.sum(valid)

    def cond(state):
        i, _, _, n_kept = state
        return (i < n_valid) & (n_kept < limit)

    def body(state):
        i, suppressed, keep, n_kept = state
        keep_i = ~suppressed[i]
        b = boxes[i]
        w = jnp.maximum(jnp.minimum(b[2], boxes[:, 2]) - jnp.maximum(b[0], boxes[:, 0]), 0.0)
        h = jnp.maximum(jnp.minimum(b[3], boxes[:, 3]) - jnp.maximum(b[1], boxes[:, 1]), 0.0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        suppressed = suppressed | (keep_i & (iou >= thr) & (idx > i))
        return i + 1, suppressed, keep.at[i].set(keep_i), n_kept + keep_i.astype(jnp.int32)

    init = (jnp.int32(0), jnp.zeros(k, bool), jnp.zeros(k, bool), jnp.int32(0))
    return jax.lax.while_loop(cond, body, init)[2]


def multiclass_nms(multi_bboxes: Array, multi_scores: Array, score_thr: float, iou_thr: float,
                   max_num: int = 100, pre_nms_top_k: int = 1000) -> Detections:
    """Class-aware NMS of one image (the reference ``multiclass_nms``), fixed shapes.

    Args:
      multi_bboxes: ``(n, 4)`` boxes shared by all classes, or ``(n, C*4)`` per class.
      multi_scores: ``(n, C)`` class scores (the reference's extra background column must
        be dropped by the caller).
      score_thr, iou_thr: Python floats (static); ``score > score_thr``, ``IoU > iou_thr``.
      max_num: keep at most this many (``<= 0``: no limit besides ``pre_nms_top_k``).
      pre_nms_top_k: number of best candidates entering NMS.

    Returns:
      :class:`Detections` with ``M = max_num`` rows (or ``min(pre_nms_top_k, n*C)``).
    """
    n, c = multi_scores.shape
    if multi_bboxes.shape[-1] == 4:
        boxes = jnp.broadcast_to(multi_bboxes[:, None, :], (n, c, 4))
    elif multi_bboxes.shape[-1] == 4 * c:
        boxes = multi_bboxes.reshape(n, c, 4)
    else:
        raise ValueError(f"multi_bboxes must be (n, 4) or (n, {4 * c}), got {multi_bboxes.shape}")
    boxes = boxes.reshape(n * c, 4)
    scores = multi_scores.reshape(n * c)
    labels = jnp.tile(jnp.arange(c, dtype=jnp.int32), n)
    cand = scores > score_thr
    max_coord = jnp.max(jnp.where(cand[:, None], boxes, -jnp.inf))
    max_coord = jnp.where(jnp.any(cand), max_coord, 0.0).astype(boxes.dtype)

    k = min(pre_nms_top_k, n * c)
    top_scores, order = jax.lax.top_k(jnp.where(cand, scores, -jnp.inf), k)
    # Re-sort the k winners by (score desc, candidate index) so that ties keep the candidate
    # order on every backend, whatever top_k's own tie order is.
    neg_scores, order = jax.lax.sort((-top_scores, order.astype(jnp.int32)), num_keys=2)
    top_scores = -neg_scores
    top_valid = cand[order]
    top_boxes, top_labels = boxes[order], labels[order]
    offsets = top_labels.astype(boxes.dtype) * (max_coord + 1)
    m = max_num if max_num > 0 else k
    keep = _greedy_nms(top_boxes + offsets[:, None], top_valid, iou_thr, m)

    (sel,) = jnp.nonzero(keep, size=m, fill_value=0)
    valid = jnp.arange(m) < jnp.sum(keep)
    return Detections(
        boxes=jnp.where(valid[:, None], top_boxes[sel], 0.0),
        scores=jnp.where(valid, top_scores[sel], 0.0),
        labels=jnp.where(valid, top_labels[sel], -1),
        valid=valid,
    )


def decode(preds: Array, input_hw: tuple[int, int], strides: Sequence[int] = DEFAULT_STRIDES,
           reg_max: int = 7) -> tuple[Array, Array]:
    """Head output ``(B, P, C + 4*(reg_max+1))`` (raw logits) -> scores and boxes.

    Returns ``scores (B, P, C)`` = sigmoid of the class logits and ``boxes (B, P, 4)`` xyxy:
    distribution projection times stride around the priors, clipped to ``[0, W] x [0, H]``
    of the (padded) input ``input_hw = (H, W)``.
    """
    h, w = int(input_hw[0]), int(input_hw[1])
    priors = jnp.asarray(box_ops.center_priors(h, w, strides))
    if priors.shape[0] != preds.shape[-2]:
        raise ValueError(f"{preds.shape[-2]} predictions but {priors.shape[0]} priors for "
                         f"input {h}x{w} with strides {tuple(strides)}")
    num_classes = preds.shape[-1] - 4 * (reg_max + 1)
    dist = box_ops.distribution_project(preds[..., num_classes:], reg_max) * priors[:, 2:3]
    boxes = box_ops.distance2bbox(priors[:, :2], dist, max_shape=(h, w))
    return jax.nn.sigmoid(preds[..., :num_classes]), boxes


def get_bboxes(preds: Array, input_hw: tuple[int, int],
               strides: Sequence[int] = DEFAULT_STRIDES, reg_max: int = 7,
               score_thr: float = 0.05, iou_thr: float = 0.6, max_num: int = 100,
               pre_nms_top_k: int = 1000) -> Detections:
    """Batched reference ``get_bboxes``: :func:`decode` + :func:`multiclass_nms` per image.

    ``preds (B, P, C + 4K)`` -> :class:`Detections` ``(B, M, ...)`` in input coordinates.
    """
    scores, boxes = decode(preds, input_hw, strides, reg_max)

    def nms(b: Array, s: Array) -> Detections:
        return multiclass_nms(b, s, score_thr, iou_thr, max_num, pre_nms_top_k)

    return jax.vmap(nms)(boxes, scores)


def warp_boxes(boxes: Array, matrix: Array, width: float | Array,
               height: float | Array) -> Array:
    """Map xyxy ``boxes (..., N, 4)`` through the 3x3 projective ``matrix (..., 3, 3)``.

    The 4 corners are transformed (homogeneous divide), the axis-aligned hull is taken and
    clipped to ``[0, width] x [0, height]`` (scalars or ``(...)`` arrays). Elementwise
    float32 arithmetic (no matmul, so no reduced-precision dot on accelerators).
    """
    m = matrix[..., None, None, :, :]  # (..., 1, 1, 3, 3) against corners (..., N, 4)
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    cx = jnp.stack([x1, x2, x1, x2], axis=-1)
    cy = jnp.stack([y1, y2, y2, y1], axis=-1)

    def row(r):
        return m[..., r, 0] * cx + m[..., r, 1] * cy + m[..., r, 2]

    hw = row(2)
    u, v = row(0) / hw, row(1) / hw
    wd = jnp.asarray(width, boxes.dtype)[..., None]
    ht = jnp.asarray(height, boxes.dtype)[..., None]
    return jnp.stack([jnp.clip(u.min(-1), 0, wd), jnp.clip(v.min(-1), 0, ht),
                      jnp.clip(u.max(-1), 0, wd), jnp.clip(v.max(-1), 0, ht)], axis=-1)


def postprocess(preds: Array, input_hw: tuple[int, int], warp_matrices: Array, img_hw: Array,
                strides: Sequence[int] = DEFAULT_STRIDES, reg_max: int = 7,
                score_thr: float = 0.05, iou_thr: float = 0.6, max_num: int = 100,
                pre_nms_top_k: int = 1000, inverse_given: bool = False) -> Detections:
    """Reference ``post_process``: :func:`get_bboxes`, then boxes mapped to the original image.

    Args:
      preds: ``(B, P, C + 4K)`` raw head output.
      input_hw: static ``(H, W)`` of the network input.
      warp_matrices: ``(B, 3, 3)`` the pipeline matrices ``M`` (original -> input); with
        ``inverse_given=True`` their inverses instead (e.g. computed on the host in float64).
      img_hw: ``(B, 2)`` original ``(height, width)``.

    Returns:
      :class:`Detections` ``(B, M, ...)``; boxes in original-image pixels, padded rows zero.
    """
    det = get_bboxes(preds, input_hw, strides, reg_max, score_thr, iou_thr, max_num,
                     pre_nms_top_k)
    mats = jnp.asarray(warp_matrices, jnp.float32)
    inv = mats if inverse_given else jnp.linalg.inv(mats)
    img_hw = jnp.asarray(img_hw)
    boxes = warp_boxes(det.boxes, inv, img_hw[:, 1], img_hw[:, 0])
    return det._replace(boxes=jnp.where(det.valid[..., None], boxes, 0.0))
