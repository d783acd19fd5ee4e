"""COCO evaluation of a detector on ``data.val`` (spec §12 post-processing, pycocotools metrics).

    result = evaluate(model, variables, loader, dataset, cfg)   # EvalResult
    print(result.summary); print(format_per_class_table(result))
    write_results(result, save_dir)                            # results.json, metrics.json

One jitted function per batch shape runs the forward pass and the reference evaluation
post-processing (score > 0.05, class-aware NMS at IoU 0.6, at most 100 detections per image,
inverse warp clipped to the original image) on every batch of the evaluation loader; the
``valid = False`` rows that pad the last batch are dropped. Batches are split over every
device (``nanodet_jax.train.sharding``); with several processes each loads its rows and the
detections (small, after NMS) are gathered to all of them. Detections become COCO results
(the dataset's own category ids, ``[x, y, w, h]`` in original-image pixels, score) in the
reference's order (image, class, descending score) and are scored with ``COCOeval`` against
the annotation json (COCO datasets) or an in-memory ground truth built from the records
(VOC, YOLO, TFDS).

Exact NMS without a candidate cap
---------------------------------
:func:`nanodet_jax.postprocess.multiclass_nms` bounds the candidates entering NMS
(``pre_nms_top_k = 1000``); an early-training model easily has more than that above 0.05 (up to
``P * C``, e.g. 3598 * 80 = 287,840), and the cap then changes the result. Evaluation uses
:func:`exact_multiclass_nms` instead, which has no cap and equals the reference for any number
of candidates:

1. *Classes never interact.* The reference offsets every candidate box of class ``c`` by
   ``off_c = float32(c) * (max_coord + 1)`` (``max_coord``: the largest coordinate of all
   candidates). Boxes are clipped to the input, so coordinates lie in ``[0, max_coord]``; with
   ``u`` the float32 spacing of the largest offset coordinate, the rounding errors of
   ``max_coord + 1``, of ``off_c`` and of ``x + off_c`` sum to at most ``2u``, so when
   ``u <= 1/2`` (checked: ``C * (max(H, W) + 2) <= 2**23``) every offset box of class ``c``
   ends at or before the first coordinate of class ``c + 1``. The intersection of two boxes of
   different classes is then 0 and their IoU 0 (or NaN for two empty boxes): never above the
   threshold. So greedy NMS over all candidates is the per-class greedy NMS, with the
   reference's own float32 IoUs (same offsets, same expression as ``_greedy_nms``).
2. *Lazy greedy order.* Greedy NMS visits candidates by descending score (ties: candidate
   order, prior-major then class, as torchvision's stable sort) and keeps a candidate unless
   an earlier kept box of its class overlaps it by more than the threshold. Equivalently: keep
   the best remaining candidate (over all classes), remove it and every remaining candidate of
   its class it suppresses, repeat. Every removed candidate is either kept or suppressed by a
   kept box that precedes it, exactly as in the greedy loop, and kept boxes come out in
   descending score order.
3. *Stop at ``max_num``.* The reference keeps at most ``max_num`` (100) of the full NMS
   output, which is in descending score order, i.e. the first ``max_num`` picks of step 2.

Each pick costs ``O(P + C)`` (the best remaining candidate of each class is cached; only the
picked class's row changes), there are at most ``max_num`` picks, and nothing is ever sorted,
so no candidate bound is needed. (The reference's own >= 10,000-candidate path re-sorts the
kept boxes with an unstable sort; only exact score ties at the 100th detection could differ.)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax import postprocess as pp
from nanodet_jax.data.readers.base import Dataset
from nanodet_jax.data.readers.coco import CocoDataset
from nanodet_jax.inference import inference_variables
from nanodet_jax.train.sharding import (
    allgather,
    global_batch,
    local_device_count,
    make_mesh,
    replicate,
)

log = logging.getLogger(__name__)

Array = jax.Array

SCORE_THR, IOU_THR, MAX_NUM = 0.05, 0.6, 100  # reference evaluation settings (spec §12)
METRIC_NAMES = ("mAP", "AP50", "AP75", "AP_small", "AP_m", "AP_l")  # COCOeval.stats[:6]
RESULTS_JSON, METRICS_JSON = "results.json", "metrics.json"
_OFFSET_LIMIT = 2 ** 23  # C * (max coordinate + 2) must stay below this (module docstring)


# -- exact post-processing (jit) -----------------------------------------------------------


def exact_multiclass_nms(multi_bboxes: Array, multi_scores: Array, score_thr: float = SCORE_THR,
                         iou_thr: float = IOU_THR, max_num: int = MAX_NUM) -> pp.Detections:
    """Reference ``multiclass_nms`` of one image without a candidate cap (module docstring).

    Args:
      multi_bboxes: ``(n, 4)`` xyxy boxes shared by all classes, or ``(n, C*4)`` per class;
        coordinates must be ``>= 0`` (decoded boxes are clipped to the input) and
        ``C * (max coordinate + 2) <= 2**23`` for the class offsets to separate the classes.
      multi_scores: ``(n, C)`` class scores (no background column).
      score_thr, iou_thr: static floats; candidates ``score > score_thr``, suppression
        ``IoU > iou_thr`` (compared as the reference does, see
        :func:`nanodet_jax.postprocess.iou_threshold_f32`).
      max_num: static, ``> 0``: at most this many detections.

    Returns:
      :class:`nanodet_jax.postprocess.Detections` with ``M = max_num`` rows, valid rows first
      in descending score order; padded rows have zero boxes/scores and label ``-1``.
    """
    n, c = multi_scores.shape
    if max_num <= 0:
        raise ValueError(f"exact_multiclass_nms needs max_num > 0, got {max_num}")
    if multi_bboxes.shape[-1] == 4:
        per_class = False
        boxes = multi_bboxes  # (n, 4)
    elif multi_bboxes.shape[-1] == 4 * c:
        per_class = True
        boxes = multi_bboxes.reshape(n, c, 4).transpose(1, 0, 2)  # (c, n, 4)
    else:
        raise ValueError(f"multi_bboxes must be (n, 4) or (n, {4 * c}), got {multi_bboxes.shape}")
    scores = multi_scores.T  # (c, n): one row per class
    cand = scores > score_thr
    if per_class:
        max_coord = jnp.max(jnp.where(cand[..., None], boxes, -jnp.inf))
    else:
        max_coord = jnp.max(jnp.where(jnp.any(cand, axis=0)[:, None], boxes, -jnp.inf))
    max_coord = jnp.where(jnp.any(cand), max_coord, 0.0).astype(boxes.dtype)
    offsets = jnp.arange(c, dtype=boxes.dtype) * (max_coord + 1)  # (c,), as the reference
    thr = pp.iou_threshold_f32(iou_thr)
    idx = jnp.arange(n, dtype=jnp.int32)
    classes = jnp.arange(c, dtype=jnp.int32)

    def first_max(v: Array) -> tuple[Array, Array]:
        """Max over the last axis and the first index holding it (``jnp.argmax`` is several
        times slower on CPU)."""
        m = v.max(axis=-1)
        return m, jnp.min(jnp.where(v == m[..., None], idx, n), axis=-1).astype(jnp.int32)

    live = jnp.where(cand, scores, -jnp.inf)  # remaining candidates; -inf = removed
    state = (live, *first_max(live), jnp.zeros(max_num, jnp.int32),
             jnp.zeros(max_num, jnp.int32), jnp.int32(0))

    def cond(s):
        return (s[5] < max_num) & (jnp.max(s[1]) > -jnp.inf)

    def body(s):
        live, best, best_i, out_c, out_i, k = s
        # the next candidate in (score desc, prior-major index i * c + class) order
        key = jnp.min(jnp.where(best == jnp.max(best), best_i * c + classes, n * c))
        cls, i = key % c, key // c
        ob = (boxes[cls] if per_class else boxes) + offsets[cls]  # (n, 4) offset boxes
        areas = (ob[:, 2] - ob[:, 0]) * (ob[:, 3] - ob[:, 1])
        b = ob[i]
        w = jnp.maximum(jnp.minimum(b[2], ob[:, 2]) - jnp.maximum(b[0], ob[:, 0]), 0.0)
        h = jnp.maximum(jnp.minimum(b[3], ob[:, 3]) - jnp.maximum(b[1], ob[:, 1]), 0.0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter)
        row = jnp.where((iou >= thr) | (idx == i), -jnp.inf, live[cls])
        row_best, row_i = first_max(row)
        return (live.at[cls].set(row), best.at[cls].set(row_best), best_i.at[cls].set(row_i),
                out_c.at[k].set(cls), out_i.at[k].set(i), k + 1)

    _, _, _, out_c, out_i, k = jax.lax.while_loop(cond, body, state)
    valid = jnp.arange(max_num) < k
    sel_boxes = boxes[out_c, out_i] if per_class else boxes[out_i]
    return pp.Detections(boxes=jnp.where(valid[:, None], sel_boxes, 0.0),
                         scores=jnp.where(valid, scores[out_c, out_i], 0.0),
                         labels=jnp.where(valid, out_c, -1), valid=valid)


def check_offset_range(num_classes: int, input_hw: Sequence[int]) -> None:
    """Raise ``ValueError`` when class offsets could make boxes of different classes overlap in
    float32 (``C * (max(H, W) + 2) > 2**23``; module docstring, point 1)."""
    if num_classes * (max(int(v) for v in input_hw) + 2) > _OFFSET_LIMIT:
        raise ValueError(f"{num_classes} classes at input {tuple(input_hw)}: the float32 class "
                         f"offsets of the reference NMS cannot separate the classes exactly "
                         f"(needs num_classes * (max side + 2) <= {_OFFSET_LIMIT})")


def exact_postprocess(preds: Array, input_hw: tuple[int, int], inv_warp: Array, img_hw: Array,
                      strides: Sequence[int] = pp.DEFAULT_STRIDES, reg_max: int = 7,
                      score_thr: float = SCORE_THR, iou_thr: float = IOU_THR,
                      max_num: int = MAX_NUM) -> pp.Detections:
    """Reference ``post_process`` of a batch with :func:`exact_multiclass_nms` (no cap).

    Args:
      preds: ``(B, P, C + 4*(reg_max+1))`` raw head output.
      input_hw: static ``(H, W)`` of the (padded) network input.
      inv_warp: ``(B, 3, 3)`` inverses of the pipeline matrices (input -> original pixels).
      img_hw: ``(B, 2)`` original ``(height, width)``.

    Returns:
      :class:`nanodet_jax.postprocess.Detections` ``(B, max_num, ...)``, boxes in original
      pixels clipped to the image, padded rows zero.
    """
    num_classes = preds.shape[-1] - 4 * (reg_max + 1)
    check_offset_range(num_classes, input_hw)
    scores, boxes = pp.decode(preds, input_hw, strides, reg_max)

    def nms(b: Array, s: Array) -> pp.Detections:
        return exact_multiclass_nms(b, s, score_thr, iou_thr, max_num)

    # XLA:CPU runs the batched (vmapped) row updates as slow scatters: images in sequence there
    det = jax.lax.platform_dependent(
        boxes, scores, cpu=lambda b, s: jax.lax.map(lambda a: nms(*a), (b, s)),
        default=jax.vmap(nms))
    img_hw = jnp.asarray(img_hw)
    out = pp.warp_boxes(det.boxes, jnp.asarray(inv_warp, jnp.float32), img_hw[:, 1], img_hw[:, 0])
    return det._replace(boxes=jnp.where(det.valid[..., None], out, 0.0))


@functools.lru_cache(maxsize=8)
def _step(model: Any, strides: tuple[int, ...], reg_max: int, score_thr: float, iou_thr: float,
          max_num: int) -> Any:
    """The jitted ``(variables, images, inv_warp, img_hw) -> Detections`` of ``model``
    (cached: one compilation per model and batch shape across evaluations)."""

    def step(variables, images, inv_warp, img_hw):
        preds = model.apply(variables, images, train=False)
        return exact_postprocess(preds, images.shape[1:3], inv_warp, img_hw, strides, reg_max,
                                 score_thr, iou_thr, max_num)

    return jax.jit(step)


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassAP:
    """One row of the per-class table: AP (IoU 0.50:0.95) and AP50, area ``all``, 100
    detections per image, as fractions; ``nan`` when the class has no ground truth."""

    name: str
    category_id: int
    ap: float
    ap50: float
    num_gt: int


@dataclass
class EvalResult:
    """What :func:`evaluate` / :func:`coco_evaluate` return.

    * ``metrics``: ``{"mAP", "AP50", "AP75", "AP_small", "AP_m", "AP_l"}`` floats
      (``COCOeval.stats[:6]``; pycocotools reports ``-1`` for an area range without ground
      truth);
    * ``per_class``: one :class:`ClassAP` per class, in label order;
    * ``detections``: COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h],
      "score"}`` (original-image pixels, the dataset's category ids);
    * ``summary``: the text of ``COCOeval.summarize()`` (or the note);
    * ``notes``: anything that qualifies the numbers (no detections, duplicate images).
    """

    metrics: dict[str, float]
    per_class: list[ClassAP]
    detections: list[dict[str, Any]]
    summary: str = ""
    notes: list[str] = field(default_factory=list)
    num_images: int = 0


# -- ground truth --------------------------------------------------------------------------


def _quiet(fn, *args, **kwargs):
    """Call a pycocotools function with its progress prints captured (returned second)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = fn(*args, **kwargs)
    return out, buf.getvalue()


def coco_ground_truth(dataset: Dataset) -> Any:
    """A ``pycocotools.coco.COCO`` ground truth of ``dataset``.

    COCO datasets: the annotation json itself (``COCO(ann_path)``, as the reference evaluator;
    its segmentation areas decide small/medium/large). Other readers: built from the records:
    boxes with ``category_id = dataset.category_ids[label]``, ``area = w * h``; every
    ``ignore_boxes`` entry becomes an ``iscrowd = 1`` box of *every* category (records keep no
    class for them, so a detection of any class inside one is ignored rather than counted as
    a false positive).
    """
    from pycocotools.coco import COCO

    if isinstance(dataset, CocoDataset) and os.path.isfile(dataset.source):
        gt, _ = _quiet(COCO, dataset.source)
        ids = sorted(gt.getCatIds())
        if ids != list(dataset.category_ids):
            raise ValueError(f"{dataset.source}: categories {ids} differ from the dataset's "
                             f"{list(dataset.category_ids)}")
        return gt
    images, anns = [], []

    def add(image_id: int, box: np.ndarray, cat: int, crowd: int) -> None:
        x1, y1, x2, y2 = (float(v) for v in box)
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cat),
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                     "iscrowd": crowd})

    for r in dataset.records:
        image_id = int(r.image_id)
        images.append({"id": image_id, "width": int(r.width), "height": int(r.height),
                       "file_name": os.path.basename(r.file)})
        for box, label in zip(r.boxes, r.labels):
            add(image_id, box, dataset.category_ids[int(label)], 0)
        for box in r.ignore_boxes:
            for cat in dataset.category_ids:
                add(image_id, box, cat, 1)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": int(i), "name": n} for i, n in
                                 zip(dataset.category_ids, dataset.class_names)]}
    _quiet(gt.createIndex)
    return gt


# -- prediction ----------------------------------------------------------------------------


def detections_to_coco(det: pp.Detections, image_ids: Sequence[int],
                       category_ids: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results of host detections ``(B, M, ...)`` (rows ``b`` with ``image_ids[b]``).

    Per image in the reference order: class ascending, then descending score; ``bbox`` is
    ``[x1, y1, x2 - x1, y2 - y1]`` of the float32 boxes, computed in float64 as the reference's
    ``xyxy2xywh`` on ``tolist()`` values.
    """
    out = []
    for b, image_id in enumerate(image_ids):
        v = np.asarray(det.valid[b])
        labels = np.asarray(det.labels[b])[v]
        boxes = np.asarray(det.boxes[b], np.float32)[v].tolist()
        scores = np.asarray(det.scores[b], np.float32)[v].tolist()
        for j in np.argsort(labels, kind="stable"):
            x1, y1, x2, y2 = boxes[j]
            out.append({"image_id": int(image_id), "category_id": int(category_ids[labels[j]]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": scores[j]})
    return out


def _pad_rows(rows: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """``rows`` with ``valid = False`` rows appended up to a multiple of ``multiple``."""
    n = len(rows["valid"])
    extra = -n % multiple
    if not extra:
        return rows
    out = {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)])
           for k, v in rows.items()}
    out["inv_warp"][n:] = np.eye(3, dtype=np.float32)
    return out


def predict(model: Any, variables: dict, batches: Iterable[dict], cfg: Any, *,
            score_thr: float = SCORE_THR, iou_thr: float = IOU_THR, max_num: int = MAX_NUM,
            precision: str | None = None, mesh: Any = None
            ) -> tuple[dict[int, pp.Detections], int]:
    """Run the jitted forward + exact post-processing over evaluation ``batches``.

    ``batches``: dicts with ``image (b, H, W, 3)``, ``warp_matrix (b, 3, 3)`` float64,
    ``orig_hw (b, 2)``, ``image_id (b,)``, ``valid (b,)`` (the loader's keys; this process's
    rows of every global batch). Returns the per-image host
    :class:`~nanodet_jax.postprocess.Detections` ``(1, max_num, ...)`` keyed by image id in
    visiting order (``valid = False`` rows dropped), and how many duplicate rows of an already
    seen image id were dropped (the loader replaces an unreadable image by the next readable
    one).

    Data-parallel over ``mesh`` (default: every device, :func:`~nanodet_jax.train.sharding.
    make_mesh`): each batch is split over the devices (rows padded with ``valid = False`` to a
    multiple of this process's device count), and the detections of all processes are
    gathered to every process (the same result everywhere).
    """
    head = cfg.model.arch.head
    fn = _step(model, tuple(int(s) for s in head.strides), int(head.reg_max), float(score_thr),
               float(iou_thr), int(max_num))
    mesh = make_mesh() if mesh is None else mesh
    variables = replicate(inference_variables(variables), mesh)
    per_image: dict[int, pp.Detections] = {}
    duplicates = 0

    def collect(pending):
        nonlocal duplicates
        det, pos, ids, valid = pending
        # global rows of every process; `pos` maps each to (process, row) in process order,
        # which is how the host-side ids/valid of all processes concatenate
        det, pos = allgather((det, pos))
        ids, valid = allgather((ids, valid))
        det = jax.tree_util.tree_map(lambda a: a[np.argsort(pos, kind="stable")], det)
        for b in np.flatnonzero(valid):
            image_id = int(ids[b])
            if image_id in per_image:
                duplicates += 1
                continue
            per_image[image_id] = jax.tree_util.tree_map(lambda a, b=b: a[b:b + 1], det)

    ctx = (jax.default_matmul_precision(precision) if precision is not None
           else contextlib.nullcontext())
    pending = None
    per_device = local_device_count(mesh)
    with ctx:
        for batch in batches:
            inv = np.linalg.inv(np.asarray(batch["warp_matrix"], np.float64)).astype(np.float32)
            rows = _pad_rows({"image": np.asarray(batch["image"], np.float32), "inv_warp": inv,
                              "orig_hw": np.asarray(batch["orig_hw"], np.int32),
                              "image_id": np.asarray(batch["image_id"]),
                              "valid": np.asarray(batch["valid"], bool)}, per_device)
            n = len(rows["valid"])
            rows["pos"] = (jax.process_index() * n + np.arange(n)).astype(np.int32)
            g = global_batch({k: rows[k] for k in ("image", "inv_warp", "orig_hw", "pos")},
                             mesh)
            det = fn(variables, g["image"], g["inv_warp"], g["orig_hw"])  # asynchronous
            if pending is not None:
                collect(pending)  # host work of the previous batch overlaps this one
            pending = (det, g["pos"], rows["image_id"], rows["valid"])
        if pending is not None:
            collect(pending)
    return per_image, duplicates


# -- metrics -------------------------------------------------------------------------------


def _num_gt(gt: Any, cat_id: int) -> int:
    return sum(1 for a in gt.loadAnns(gt.getAnnIds(catIds=[cat_id])) if not a.get("iscrowd"))


def _per_class(gt: Any, precision: np.ndarray | None, cat_ids: Sequence[int],
               names: Sequence[str], params_cat_ids: Sequence[int]) -> list[ClassAP]:
    """Per-class AP / AP50 from ``COCOeval.eval['precision']`` ``(T, R, K, A, M)``: area
    ``all`` (index 0), the last ``maxDets`` (100); ``-1`` entries (no GT) are excluded, a class
    with none left is ``nan``. ``precision=None``: no detections, 0 for classes with GT."""
    rows = []
    for name, cat in zip(names, cat_ids):
        n_gt = _num_gt(gt, cat)
        if precision is None:
            ap = ap50 = 0.0 if n_gt else math.nan
        else:
            k = list(params_cat_ids).index(cat)
            p_all, p50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]
            ap = float(np.mean(p_all[p_all > -1])) if np.any(p_all > -1) else math.nan
            ap50 = float(np.mean(p50[p50 > -1])) if np.any(p50 > -1) else math.nan
        rows.append(ClassAP(str(name), int(cat), ap, ap50, n_gt))
    return rows


def coco_evaluate(detections: list[dict[str, Any]], dataset: Dataset, coco_gt: Any = None,
                  num_images: int | None = None) -> EvalResult:
    """Score COCO ``detections`` against ``dataset`` with ``COCOeval`` (``bbox``).

    ``coco_gt`` defaults to :func:`coco_ground_truth`. An empty ``detections`` list (which
    pycocotools cannot evaluate) gives all-zero metrics and a note.
    """
    from pycocotools.cocoeval import COCOeval

    gt = coco_ground_truth(dataset) if coco_gt is None else coco_gt
    n_img = len(gt.getImgIds()) if num_images is None else num_images
    cats, names = list(dataset.category_ids), list(dataset.class_names)
    if not detections:
        note = (f"no detections with score > {SCORE_THR} on {n_img} image(s): all COCO "
                "metrics are reported as 0 (pycocotools cannot evaluate an empty result list)")
        return EvalResult({k: 0.0 for k in METRIC_NAMES}, _per_class(gt, None, cats, names, []),
                          [], note, [note], n_img)
    known = set(gt.getImgIds())
    unknown = sorted({d["image_id"] for d in detections} - known)
    if unknown:
        raise ValueError(f"detections for image ids {unknown[:10]} that are not in the ground "
                         f"truth ({dataset.source or 'records'})")
    dt, _ = _quiet(gt.loadRes, copy.deepcopy(detections))
    ev = COCOeval(copy.deepcopy(gt), dt, "bbox")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _, summary = _quiet(ev.summarize)
    metrics = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats[:6])}
    per_class = _per_class(gt, ev.eval["precision"], cats, names, ev.params.catIds)
    return EvalResult(metrics, per_class, detections, summary, [], n_img)


def evaluate(model: Any, variables: dict, loader: Any, dataset: Dataset, cfg: Any, *,
             coco_gt: Any = None, precision: str | None = None, mesh: Any = None
             ) -> EvalResult:
    """COCO evaluation of ``model`` with ``variables`` on ``loader`` (batches of ``dataset``).

    Args:
      model: a Linen module with ``apply(variables, images, train=False) -> (B, P, C + 4K)``
        (the detector, with or without the AGM; the AGM's variables are dropped).
      variables: ``{'params', 'batch_stats'}`` (e.g. the EMA weights).
      loader: evaluation :class:`nanodet_jax.data.loader.Loader` (``train=False``;
        ``epoch(0)`` visits every image: each process loads its rows of every batch).
      dataset: the :class:`~nanodet_jax.data.readers.base.Dataset` the loader reads
        (``category_ids``, ``class_names``, and the ground truth).
      cfg: full config (``model.arch.head.strides``/``reg_max``, ``class_names``).
      coco_gt: a prebuilt :func:`coco_ground_truth` (saves reloading it every evaluation).
      precision: optional ``jax.default_matmul_precision`` while tracing (e.g. ``"highest"``).
      mesh: the devices the forward runs on (default every device; see :func:`predict`).

    Returns:
      :class:`EvalResult` with the reference evaluation settings (score > 0.05, NMS 0.6, 100
      per image; exact, no candidate cap); every process gets the same result (the
      detections are gathered to all of them and each scores them).
    """
    num_classes = int(cfg.model.arch.head.num_classes)
    if len(dataset.class_names) != num_classes:
        raise ValueError(f"the model has {num_classes} classes (model.arch.head.num_classes) "
                         f"but the dataset {dataset.source or ''} has "
                         f"{len(dataset.class_names)}")
    batches = loader.epoch(0) if hasattr(loader, "epoch") else loader
    per_image, duplicates = predict(model, variables, batches, cfg, precision=precision,
                                    mesh=mesh)
    detections = []
    for image_id, det in per_image.items():
        detections += detections_to_coco(det, [image_id], dataset.category_ids)
    result = coco_evaluate(detections, dataset, coco_gt, num_images=len(per_image))
    if duplicates:
        result.notes.append(f"{duplicates} loader row(s) repeated an already evaluated image "
                            "(unreadable images replaced by the loader) and were ignored")
    missing = len(dataset.records) - len(per_image)
    if missing > 0:
        result.notes.append(f"{missing} image(s) of the dataset were not evaluated (unreadable):"
                            " they count as images without detections")
    for note in result.notes:
        log.warning(note)
    return result


# -- reporting -----------------------------------------------------------------------------


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def format_per_class_table(result: EvalResult, per_row: int = 3) -> str:
    """Per-class AP table (percent, one decimal; ``-`` for a class without ground truth),
    ``per_row`` classes side by side as the reference's table (``| class | AP | AP50 |``)."""
    rows = result.per_class
    if not rows:
        return "(no classes)"
    width = max(len("class"), *(len(r.name) for r in rows))
    cells = [f"{r.name:<{width}} | {_pct(r.ap):>5} | {_pct(r.ap50):>5}" for r in rows]
    blank = f"{'':<{width}} | {'':>5} | {'':>5}"
    n = min(per_row, len(cells))
    head = " | ".join([f"{'class':<{width}} | {'AP':>5} | {'AP50':>5}"] * n)
    sep = "-|-".join([f"{'-' * width}-|-{'-' * 5}-|-{'-' * 5}"] * n)
    lines = [f"| {head} |", f"|-{sep}-|"]
    for i in range(0, len(cells), n):
        chunk = cells[i:i + n] + [blank] * (n - len(cells[i:i + n]))
        lines.append(f"| {' | '.join(chunk)} |")
    return "\n".join(lines)


def _json_float(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def metrics_dict(result: EvalResult) -> dict[str, Any]:
    """The ``metrics.json`` content: the metrics, ``per_class`` rows (``class``,
    ``category_id``, ``AP``, ``AP50``, ``num_gt``; ``null`` for a class without ground truth),
    ``num_images``, ``num_detections`` and ``notes``."""
    per_class = [{"class": r.name, "category_id": r.category_id, "AP": _json_float(r.ap),
                  "AP50": _json_float(r.ap50), "num_gt": r.num_gt} for r in result.per_class]
    return {**{k: float(v) for k, v in result.metrics.items()}, "per_class": per_class,
            "num_images": result.num_images, "num_detections": len(result.detections),
            "notes": list(result.notes)}


def write_results(result: EvalResult, save_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` (COCO detections) and ``metrics.json`` (:func:`metrics_dict`)
    into ``save_dir`` (created). Never overwrites: when either exists, the pair
    ``results_1.json``/``metrics_1.json`` (then ``_2``...) is used. Returns both paths."""
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    k = 0
    while True:
        sfx = f"_{k}" if k else ""
        res = d / RESULTS_JSON.replace(".json", f"{sfx}.json")
        met = d / METRICS_JSON.replace(".json", f"{sfx}.json")
        if not res.exists() and not met.exists():
            break
        k += 1
    with open(res, "x") as f:  # "x": fail rather than replace a file created meanwhile
        json.dump(result.detections, f)
    with open(met, "x") as f:
        json.dump(metrics_dict(result), f, indent=1)
    return res, met
