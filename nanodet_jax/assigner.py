"""Dynamic Soft Label Assigner (NanoDet-Plus), fixed-shape and jit/vmap friendly.

Per image: class logits ``(P, C)``, decoded boxes ``(P, 4)``, priors ``(P, 4)`` and ground
truth padded to ``G`` boxes with a validity mask. The cost matrix is GT-major ``(G, P)``;
the soft classification cost is decomposed so that no ``(G, P, C)`` tensor is ever built:

    cls_cost[g, p] = sum_c neg[c, p] - neg[l_g, p] + pos[g, p]

with ``neg = BCE(x, 0) * sigmoid(x)**2`` and ``pos = BCE(x_{l_g}, iou) * |iou - sigmoid|**2``.
Batched versions (``*_batch``) vmap over a leading image axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nanodet_jax.box_ops import bbox2distance, bbox_overlaps
from nanodet_jax.losses import bce_with_logits

BATCH_AXIS = "data"  # the mesh axis a data-parallel step splits the batch over

Array = jax.Array


class AssignResult(NamedTuple):
    """Per-prior assignment of one image (leading ``B`` axis when batched).

    assigned_gt  ``(P,)`` int32: index of the assigned GT, ``-1`` for negatives.
    fg           ``(P,)`` bool: positive priors.
    label_scores ``(P,)`` float: IoU(decoded box, assigned GT) for positives, 0 otherwise.
    """

    assigned_gt: Array
    fg: Array
    label_scores: Array


class AssignCosts(NamedTuple):
    """Intermediate quantities of the assignment (useful for inspection and tests).

    The pairwise arrays are GT-major, ``(G, P)``: each GT's row is contiguous, which is the
    layout the per-GT top-k and the label gather want.

    valid ``(P,)`` bool: prior point strictly inside at least one (real) GT.
    ious  ``(G, P)``: IoU(decoded box, GT) for every prior.
    cost  ``(G, P)``: ``cls_cost + iou_factor * -log(iou + 1e-7)``; ``+inf`` for invalid
          priors and padding GTs.
    dynamic_ks ``(G,)`` int32: number of priors each GT selects (0 for padding GTs).
    """

    valid: Array
    ious: Array
    cost: Array
    dynamic_ks: Array


class HeadTargets(NamedTuple):
    """Training targets per prior (leading ``B`` axis when batched).

    labels        ``(P,)`` int32: GT class for positives, ``num_classes`` for background.
    label_scores  ``(P,)`` float: soft IoU score for positives, 0 otherwise.
    label_weights ``(P,)`` float: all ones.
    bbox_targets  ``(P, 4)``: assigned GT box (xyxy) for positives, 0 otherwise.
    dist_targets  ``(P, 4)``: ltrb distance prior->GT in strides, clamped to
                  ``[0, reg_max - 0.1]``, 0 for negatives.
    num_pos       ``()`` int32: number of positives.
    """

    labels: Array
    label_scores: Array
    label_weights: Array
    bbox_targets: Array
    dist_targets: Array
    num_pos: Array


def assign_costs(cls_logits: Array, decoded_bboxes: Array, priors: Array, gt_boxes: Array,
                 gt_labels: Array, gt_mask: Array, topk: int = 13,
                 iou_factor: float = 3.0) -> AssignCosts:
    """Validity mask, IoUs, cost matrix and dynamic k of one image.

    cls_logits ``(P, C)``, decoded_bboxes ``(P, 4)``, priors ``(P, 4)`` (x, y, s, s),
    gt_boxes ``(G, 4)``, gt_labels ``(G,)`` int, gt_mask ``(G,)`` bool. Inputs are detached.
    """
    x = jax.lax.stop_gradient(cls_logits)
    boxes = jax.lax.stop_gradient(decoded_bboxes)
    gt_boxes = gt_boxes.astype(boxes.dtype)
    gt_mask = gt_mask.astype(bool)
    num_classes = x.shape[-1]
    labels = jnp.clip(gt_labels.astype(jnp.int32), 0, num_classes - 1)  # padding-safe gather

    px, py = priors[None, :, 0], priors[None, :, 1]
    gx1, gy1, gx2, gy2 = (gt_boxes[:, i:i + 1] for i in range(4))
    min_delta = jnp.minimum(jnp.minimum(px - gx1, py - gy1), jnp.minimum(gx2 - px, gy2 - py))
    inside = (min_delta > 0) & gt_mask[:, None]                          # (G, P), strict
    valid = jnp.any(inside, axis=0)                                      # (P,)

    ious = bbox_overlaps(gt_boxes, boxes, mode="iou", eps=1e-6)          # (G, P)
    iou_cost = -jnp.log(ious + 1e-7)

    xt = x.T                                                             # (C, P)
    sig = jax.nn.sigmoid(xt)
    neg = bce_with_logits(xt, 0.0) * sig * sig                          # (C, P)
    xg = jnp.take(xt, labels, axis=0)                                    # (G, P)
    sg = jax.nn.sigmoid(xg)
    pos = bce_with_logits(xg, ious) * jnp.square(jnp.abs(ious - sg))
    cls_cost = (jnp.sum(neg, axis=0, keepdims=True) - jnp.take(neg, labels, axis=0)) + pos
    cost = cls_cost + iou_cost * iou_factor
    cost = jnp.where(gt_mask[:, None] & valid[None, :], cost, jnp.inf)

    # dynamic k: sum of the top-min(topk, V) IoUs over valid priors (zeros do not change it),
    # summed sequentially, largest first.
    k_cand = min(topk, x.shape[0])
    top_ious = jax.lax.top_k(jnp.where(valid[None, :], ious, 0.0), k_cand)[0]  # (G, k)
    # the barrier keeps XLA from folding the column slices below into the top-k's sort,
    # which would stop it from using its fast top-k kernel (a full sort is ~50x slower on CPU)
    top_ious = jax.lax.optimization_barrier(top_ious)
    total = top_ious[:, 0]
    for j in range(1, k_cand):
        total = total + top_ious[:, j]
    dynamic_ks = jnp.maximum(total.astype(jnp.int32), 1) * gt_mask.astype(jnp.int32)
    return AssignCosts(valid, ious, cost, dynamic_ks)


def dsl_assign(cls_logits: Array, decoded_bboxes: Array, priors: Array, gt_boxes: Array,
               gt_labels: Array, gt_mask: Array, topk: int = 13,
               iou_factor: float = 3.0) -> AssignResult:
    """Dynamic soft label assignment of one image (shapes as in :func:`assign_costs`).

    Each real GT picks its ``k_g`` cheapest valid priors; a prior picked by several GTs goes
    to its cheapest GT over all real GTs. Images with no GT or no valid prior get no positive.
    """
    c = assign_costs(cls_logits, decoded_bboxes, priors, gt_boxes, gt_labels, gt_mask,
                     topk, iou_factor)
    num_gts, num_priors = c.cost.shape
    k_cand = min(topk, num_priors)
    cand = jax.lax.top_k(-c.cost, k_cand)[1]                             # (G, k) cheapest first
    take = jnp.arange(k_cand)[None, :] < c.dynamic_ks[:, None]           # (G, k)
    gt_ids = jnp.broadcast_to(jnp.arange(num_gts)[:, None], cand.shape)
    match = jnp.zeros((num_gts, num_priors), jnp.int32).at[gt_ids, cand].max(
        take.astype(jnp.int32))
    match = match * c.valid[None, :]
    n_match = jnp.sum(match, axis=0)                                     # (P,)
    fg = n_match > 0
    assigned = jnp.where(n_match > 1, jnp.argmin(c.cost, axis=0), jnp.argmax(match, axis=0))
    assigned = jnp.where(fg, assigned, -1).astype(jnp.int32)
    score = jnp.take_along_axis(c.ious, jnp.maximum(assigned, 0)[None, :], axis=0)[0]
    return AssignResult(assigned, fg, jnp.where(fg, score, 0.0))


def build_targets(assign: AssignResult, priors: Array, gt_boxes: Array, gt_labels: Array,
                  num_classes: int, reg_max: int = 7) -> HeadTargets:
    """Head targets of one image from its assignment (see :class:`HeadTargets`).

    priors ``(P, 4)``, gt_boxes ``(G, 4)``, gt_labels ``(G,)``.
    """
    fg = assign.fg
    idx = jnp.maximum(assign.assigned_gt, 0)
    boxes = jnp.take(gt_boxes.astype(priors.dtype), idx, axis=0)         # (P, 4)
    labels = jnp.where(fg, jnp.take(gt_labels.astype(jnp.int32), idx), num_classes)
    dist = bbox2distance(priors[:, :2], boxes) / priors[:, 2:3]
    dist = jnp.clip(dist, 0.0, reg_max - 0.1)
    return HeadTargets(
        labels=labels.astype(jnp.int32),
        label_scores=jnp.where(fg, assign.label_scores, 0.0),
        label_weights=jnp.ones(fg.shape, priors.dtype),
        bbox_targets=jnp.where(fg[:, None], boxes, 0.0),
        dist_targets=jnp.where(fg[:, None], dist, 0.0),
        num_pos=jnp.sum(fg).astype(jnp.int32),
    )


def assign_and_build_targets(cls_logits: Array, decoded_bboxes: Array, priors: Array,
                             gt_boxes: Array, gt_labels: Array, gt_mask: Array, num_classes: int,
                             reg_max: int = 7, topk: int = 13,
                             iou_factor: float = 3.0) -> tuple[AssignResult, HeadTargets]:
    """:func:`dsl_assign` followed by :func:`build_targets` for one image."""
    a = dsl_assign(cls_logits, decoded_bboxes, priors, gt_boxes, gt_labels, gt_mask, topk,
                   iou_factor)
    return a, build_targets(a, priors, gt_boxes, gt_labels, num_classes, reg_max)


def assign_and_build_targets_batch(cls_logits: Array, decoded_bboxes: Array, priors: Array,
                                   gt_boxes: Array, gt_labels: Array, gt_mask: Array,
                                   num_classes: int, reg_max: int = 7, topk: int = 13,
                                   iou_factor: float = 3.0) -> tuple[AssignResult, HeadTargets]:
    """Batched :func:`assign_and_build_targets`.

    cls_logits ``(B, P, C)``, decoded_bboxes ``(B, P, 4)``, priors ``(P, 4)`` (shared),
    gt_boxes ``(B, G, 4)``, gt_labels ``(B, G)``, gt_mask ``(B, G)``; outputs get a ``B`` axis.

    Traced under a mesh with a :data:`BATCH_AXIS` axis (the data-parallel train step sets
    one, ``jax.sharding.use_abstract_mesh``), the images are assigned under ``shard_map``
    over that axis: each device assigns its own images. (XLA does not partition its TopK
    along batch dimensions: plain ``vmap`` would all-gather the ``(B, G, P)`` costs and
    assign the whole batch on every device.) The result is the same either way.
    """
    def one(x, b, g, l, m, pr):
        return assign_and_build_targets(x, b, pr, g, l, m, num_classes, reg_max, topk,
                                        iou_factor)

    batched = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None))
    mesh = jax.sharding.get_abstract_mesh()
    n = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(BATCH_AXIS, 1) if mesh.axis_names else 1
    if n > 1 and cls_logits.shape[0] % n == 0:
        ax = PartitionSpec(BATCH_AXIS)
        batched = jax.shard_map(batched, in_specs=(ax, ax, ax, ax, ax, PartitionSpec()),
                                out_specs=ax)
    return batched(cls_logits, decoded_bboxes, gt_boxes, gt_labels, gt_mask, priors)


def dsl_assign_batch(cls_logits: Array, decoded_bboxes: Array, priors: Array, gt_boxes: Array,
                     gt_labels: Array, gt_mask: Array, topk: int = 13,
                     iou_factor: float = 3.0) -> AssignResult:
    """Batched :func:`dsl_assign` (shapes as in :func:`assign_and_build_targets_batch`)."""
    def one(x, b, g, l, m):
        return dsl_assign(x, b, priors, g, l, m, topk, iou_factor)

    return jax.vmap(one)(cls_logits, decoded_bboxes, gt_boxes, gt_labels, gt_mask)
