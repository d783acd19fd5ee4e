"""COCO evaluation: ``nanodet_jax.train.evaluate`` and ``scripts/eval.py``.

* Exact NMS: bit-identical to the reference ``multiclass_nms`` cases (``nms*.npz``) and, with
  far more candidates than the capped post-processing's 1000, identical to a numpy oracle of
  the reference semantics over *all* candidates (where the capped path provably differs).
* ``evaluate`` on the reference's own head output (a stand-in model returning
  ``eval/head_out``) yields exactly the reference ``post_process`` rows of
  ``postprocess*.npz``; on every ``model_*.npz`` (weights via ``convert.torch_to_flax``,
  config from ``config_yaml``) the real forward + evaluation of ``test_img`` matches the
  reference rows (or the oracle on ``eval/head_out`` when no post-processing fixture pairs).
* Metrics: mAP 1 for perfect detections, a hand-computed AP, the empty case; result files;
  the script end to end on a ``.pth`` written with ``torch.save``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from nanodet_jax import postprocess as pp
from nanodet_jax.config import COCO_CLASSES, load_config_text
from nanodet_jax.convert import torch_to_flax
from nanodet_jax.data.loader import build_loader
from nanodet_jax.data.readers import COCO_CATEGORY_IDS, CocoDataset, Dataset, build_dataset
from nanodet_jax.data.record import ImageRecord
from nanodet_jax.data.transforms import warp_boxes
from nanodet_jax.models import build_model
from nanodet_jax.train.evaluate import (
    METRIC_NAMES,
    EvalResult,
    coco_evaluate,
    evaluate,
    exact_multiclass_nms,
    exact_postprocess,
    format_per_class_table,
    write_results,
)
from tests.fixtures import (
    REPO_ROOT,
    assert_nms_equal,
    fixture_files,
    fixture_params,
    group,
    head_layout,
    load_npz,
    nms_cases,
    paired_model_fixture,
    raw_image,
)
from tests.test_inference import write_reference_checkpoint

EVAL = REPO_ROOT / "scripts" / "eval.py"
TOL = 1e-4  # |ours - ref| <= TOL * (1 + |ref|) for boxes and scores, as test_postprocess


# -- numpy oracle of the reference post-processing (torchvision NMS semantics) -------------


def oracle_nms(boxes: np.ndarray, scores: np.ndarray, score_thr: float = 0.05,
               iou_thr: float = 0.6, max_num: int = 100):
    """Reference ``multiclass_nms`` over ALL candidates: ``boxes (n, 4)`` or ``(n, C*4)``,
    ``scores (n, C)`` -> kept ``(boxes (k, 4), scores (k,), labels (k,))`` in output order.

    Candidates ``score > thr`` in prior-major order, offsets ``label * (max + 1)`` in float32,
    stable descending sort, IoU in float32, suppression ``IoU > thr`` in double."""
    n, c = scores.shape
    b = (np.broadcast_to(boxes[:, None], (n, c, 4)) if boxes.shape[1] == 4
         else boxes.reshape(n, c, 4)).astype(np.float32)
    cand = scores > np.float32(score_thr)
    cb, cs, cl = b[cand], scores[cand].astype(np.float32), np.nonzero(cand)[1]
    if cs.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    ob = cb + (cl.astype(np.float32) * (cb.max() + np.float32(1)))[:, None]
    areas = (ob[:, 2] - ob[:, 0]) * (ob[:, 3] - ob[:, 1])
    rest, keep = np.argsort(-cs, kind="stable"), []
    while rest.size and (max_num <= 0 or len(keep) < max_num):
        i, rest = rest[0], rest[1:]
        keep.append(i)
        w = np.maximum(np.float32(0), np.minimum(ob[i, 2], ob[rest, 2])
                       - np.maximum(ob[i, 0], ob[rest, 0]))
        h = np.maximum(np.float32(0), np.minimum(ob[i, 3], ob[rest, 3])
                       - np.maximum(ob[i, 1], ob[rest, 1]))
        inter = w * h
        with np.errstate(invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
            rest = rest[~(iou.astype(np.float64) > iou_thr)]
    keep = np.asarray(keep)
    return cb[keep], cs[keep], cl[keep]


def oracle_rows(preds: np.ndarray, input_hw, warp_matrices, img_hw, strides=pp.DEFAULT_STRIDES,
                reg_max: int = 7) -> np.ndarray:
    """Reference ``post_process`` rows ``(img, cls, x1, y1, x2, y2, score)`` of a batch over all
    candidates (decode shared with the port: it has its own parity tests), float64 inverse
    warp, sorted by image, class, descending score, x1, y1."""
    scores, boxes = jax.device_get(pp.decode(jnp.asarray(preds), input_hw, strides, reg_max))
    rows = []
    for i in range(preds.shape[0]):
        b, s, lab = oracle_nms(boxes[i], scores[i])
        b = warp_boxes(b, np.linalg.inv(warp_matrices[i]), img_hw[i][1], img_hw[i][0])
        rows.append(np.concatenate([np.full((len(s), 1), i), lab[:, None], b, s[:, None]], 1))
    return sort_rows(np.concatenate(rows))


def sort_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort((rows[:, 3], rows[:, 2], -rows[:, 6], rows[:, 1], rows[:, 0]))]


def det_rows(det: pp.Detections) -> np.ndarray:
    """Valid rows ``(img, cls, x1, y1, x2, y2, score)`` of batched host detections."""
    det = jax.device_get(det)
    rows = [np.concatenate([np.full((v.sum(), 1), i), det.labels[i][v][:, None],
                            det.boxes[i][v], det.scores[i][v][:, None]], 1)
            for i, v in enumerate(det.valid)]
    return sort_rows(np.concatenate(rows))


def coco_rows(detections: list[dict], image_ids: list[int], cat_ids) -> np.ndarray:
    """COCO results back to sorted reference rows (image index, label, xyxy, score)."""
    label = {c: k for k, c in enumerate(cat_ids)}
    rows = [[image_ids.index(d["image_id"]), label[d["category_id"]], d["bbox"][0],
             d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3], d["score"]]
            for d in detections]
    return sort_rows(np.asarray(rows, np.float64).reshape(-1, 7))


def assert_rows(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: {ours.shape} rows != reference {ref.shape}"
    np.testing.assert_array_equal(ours[:, :2], ref[:, :2], err_msg=what)
    err = np.abs(ours[:, 2:] - ref[:, 2:]) / (1 + np.abs(ref[:, 2:]))
    assert float(err.max(initial=0)) <= TOL, f"{what}: max err {err.max():.3g}"


# -- tiny datasets -------------------------------------------------------------------------


def write_coco(root: Path, images: list[tuple[int, np.ndarray]],
               anns: list[tuple[int, int, list[float]]], cat_ids, names) -> tuple[Path, Path]:
    """``root/images/img<id>.png`` + ``root/ann.json``; ``anns``: (image id, category id,
    xyxy box). Returns (image dir, annotation path)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    imgs = []
    for image_id, img in images:
        assert cv2.imwrite(str(img_dir / f"img{image_id}.png"), img)
        imgs.append({"id": image_id, "file_name": f"img{image_id}.png",
                     "height": int(img.shape[0]), "width": int(img.shape[1])})
    annotations = [{"id": k + 1, "image_id": i, "category_id": int(c),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0}
                   for k, (i, c, b) in enumerate(anns)]
    ann_path = root / "ann.json"
    ann_path.write_text(json.dumps({"images": imgs, "annotations": annotations, "categories": [
        {"id": int(c), "name": n} for c, n in zip(cat_ids, names)]}))
    return img_dir, ann_path


def fixture_yaml(model: dict, img_dir: Path, ann_path: Path, save_dir: Path) -> str:
    """The model fixture's ``config_yaml`` evaluating on the tiny dataset at its ``input_hw``."""
    raw = yaml.safe_load(str(model["config_yaml"]))
    in_h, in_w = (int(v) for v in model["input_hw"])
    raw["data"]["val"].update(img_path=str(img_dir), ann_path=str(ann_path),
                              input_size=[in_w, in_h])
    raw["save_dir"] = str(save_dir)
    return yaml.safe_dump(raw)


def coco_categories(num_classes: int) -> tuple[list[int], list[str]]:
    """COCO's non-contiguous category ids (80 classes) or ``10, 20, ...``."""
    if num_classes == len(COCO_CATEGORY_IDS):
        return list(COCO_CATEGORY_IDS), list(COCO_CLASSES)
    return [10 * (k + 1) for k in range(num_classes)], [f"c{k}" for k in range(num_classes)]


def tiny_test_img_dataset(model: dict, root: Path) -> tuple[Path, Path, np.ndarray, list[int]]:
    """A COCO dataset with image 0 of the model fixture (``test_img``, id 7) and its 4 XML
    boxes as ground truth (labels 0, 0, 1, 1, as the fixture's training GT)."""
    in_h, in_w = (int(v) for v in model["input_hw"])
    m = model["input_img0_warp_matrix"]
    h, w = round(in_h / m[1, 1]), round(in_w / m[0, 0])
    img = raw_image(h, w)
    num_classes = head_layout(model["config_yaml"])[0]
    cats, names = coco_categories(num_classes)
    xml = load_npz(fixture_files("val_pipeline*.npz")[0])["xml_gt_bboxes"]
    anns = [(7, cats[lab], [float(v) for v in b]) for b, lab in zip(xml, (0, 0, 1, 1))]
    img_dir, ann_path = write_coco(root, [(7, img)], anns, cats, names)
    return img_dir, ann_path, img, cats


class HeadOutModel:
    """Stand-in for the detector: ``apply`` returns fixed head outputs ``(B, P, C + 4K)``
    (hashed by identity, as ``evaluate`` caches its compiled step per model)."""

    def __init__(self, preds: np.ndarray):
        self.preds = np.asarray(preds, np.float32)

    def apply(self, variables, images, train=False):
        assert not train and images.shape[0] == self.preds.shape[0]
        return jnp.asarray(self.preds)


# -- exact NMS -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", fixture_params("nms*.npz"))
def test_exact_nms_matches_reference_cases(path):
    for case, g, score_thr, iou_thr, max_num, scores in nms_cases(path):
        m = max_num if max_num > 0 else scores.size  # "no limit": at most n*C kept
        det = jax.device_get(jax.jit(
            lambda b, s, st=score_thr, it=iou_thr, mm=m: exact_multiclass_nms(b, s, st, it, mm))(
            g["multi_bboxes"], scores))
        assert_nms_equal(det, g, case)


def _crowded_candidates(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """3000 boxes x 4 classes: the 1200 best candidates are near-identical class-0 boxes (NMS
    keeps one), then 4 classes of scattered boxes with lower scores."""
    n, c = 3000, 4
    xy = rng.uniform(0, 250, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2))], 1)
    boxes[:1200] = [100, 100, 200, 200] + rng.uniform(-2, 2, (1200, 4))
    scores = rng.uniform(0.0, 0.5, (n, c))
    scores[:1200] = 0.0
    scores[:1200, 0] = rng.uniform(0.6, 0.99, 1200)
    return boxes.astype(np.float32), scores.astype(np.float32)


def test_exact_nms_beyond_the_candidate_cap():
    """Far more candidates than the capped path's 1000: the capped result is wrong, the exact
    one equals the oracle over all candidates; vmap (accelerators) and lax.map (CPU) batching
    give the same result."""
    boxes, scores = _crowded_candidates(np.random.default_rng(0))
    n_cand = int((scores > 0.05).sum())
    assert n_cand > 5000
    ref_b, ref_s, ref_l = oracle_nms(boxes, scores)
    assert len(ref_s) == 100
    exact = jax.device_get(jax.jit(exact_multiclass_nms)(boxes, scores))
    np.testing.assert_array_equal(exact.valid, np.ones(100, bool))
    np.testing.assert_array_equal(exact.labels, ref_l)
    np.testing.assert_array_equal(exact.boxes, ref_b)
    np.testing.assert_array_equal(exact.scores, ref_s)
    capped = jax.device_get(pp.multiclass_nms(jnp.asarray(boxes), jnp.asarray(scores), 0.05,
                                              0.6, 100, pre_nms_top_k=1000))
    assert capped.valid.sum() == 1, "the cap must matter in this case (1000 best: one box)"

    # batched both ways (per-class boxes too), equal to the oracle image by image
    b2, s2 = _crowded_candidates(np.random.default_rng(1))
    pcb = np.tile(b2, (1, 4)) + np.repeat(np.arange(4, dtype=np.float32), 4)[None]
    for bb in (np.stack([boxes, b2]), np.stack([np.tile(boxes, (1, 4)), pcb])):
        ss = np.stack([scores, s2])
        vm = jax.device_get(jax.jit(jax.vmap(exact_multiclass_nms))(bb, ss))
        mp = jax.device_get(jax.jit(lambda b, s: jax.lax.map(
            lambda a: exact_multiclass_nms(*a), (b, s)))(bb, ss))
        for i in range(2):
            rb, rs, rl = oracle_nms(bb[i], ss[i])
            for det in (vm, mp):
                np.testing.assert_array_equal(det.labels[i], rl)
                np.testing.assert_array_equal(det.boxes[i], rb)
                np.testing.assert_array_equal(det.scores[i], rs)


def _many_candidate_head_out(rng: np.random.Generator, num_classes: int = 80) -> np.ndarray:
    """``(2, 2125, C + 32)`` head outputs of a 320x320 input with > 1000 candidates each.

    Image 0: classes 0 and 1 dominate on every stride-16/32/64 prior with maximal boxes (the
    1050 best candidates are large, heavily overlapping boxes: the capped NMS keeps few), the
    other classes score lower on every prior. Image 1: an untrained model, every (prior,
    class) pair above 0.05."""
    p = 2125
    cls = np.full((2, p, num_classes), -8.0)
    reg = rng.normal(0.0, 2.0, (2, p, 32))
    big = np.arange(1600, p)  # priors of strides 16, 32, 64
    cls[0, big, 0] = 3.0 + rng.uniform(0, 1, big.size)
    cls[0, big, 1] = 2.8 + rng.uniform(0, 0.1, big.size)
    cls[0, :, 2:] = rng.uniform(-2.9, 2.0, (p, num_classes - 2))
    peaked = np.full(8, -5.0)
    peaked[7] = 5.0
    reg[0, big] = np.tile(peaked, 4)
    cls[1] = rng.uniform(-2.9, 3.0, (p, num_classes))
    return np.concatenate([cls, reg], -1).astype(np.float32)


def test_exact_postprocess_with_many_candidates_equals_oracle():
    """``exact_postprocess`` (what ``evaluate`` runs) on > 1000 candidates per image (image 1:
    170,000) equals the reference semantics over all candidates, inverse warp included; the
    capped ``postprocess`` does not."""
    preds = _many_candidate_head_out(np.random.default_rng(0))
    scores = 1 / (1 + np.exp(-preds[..., :80].astype(np.float64)))
    assert (scores > 0.05).sum(axis=(1, 2)).min() > 100_000
    mats = np.stack([np.diag([320 / 360, 320 / 404, 1.0]), np.diag([0.5, 320 / 480, 1.0])])
    img_hw = np.array([[404, 360], [480, 640]], np.int32)
    ref = oracle_rows(preds, (320, 320), mats, img_hw)
    assert (ref[:, 0] == 0).sum() == 100 and (ref[:, 0] == 1).sum() == 100
    inv = np.linalg.inv(mats).astype(np.float32)
    det = jax.jit(lambda x, i, hw: exact_postprocess(x, (320, 320), i, hw))(preds, inv, img_hw)
    assert_rows(det_rows(det), ref, "exact_postprocess")
    capped = jax.device_get(pp.postprocess(jnp.asarray(preds), (320, 320), inv, img_hw,
                                           inverse_given=True))
    assert capped.valid[0].sum() < 100, "the 1000-candidate cap must lose detections here"


# -- evaluate: detections ------------------------------------------------------------------


@pytest.mark.parametrize("path", fixture_params("postprocess*.npz"))
def test_evaluate_reference_head_out_gives_reference_rows(path, tmp_path):
    """A stand-in model returning the fixture's ``eval/head_out`` through ``evaluate``
    (loader, warp, exact post-processing, COCO conversion): the COCO results are the
    reference ``post_process`` rows, with the dataset's category ids and xywh boxes."""
    ref = load_npz(path)
    model_path = paired_model_fixture(ref)
    model = load_npz(model_path)
    n = ref["warp_matrices"].shape[0]
    hw = np.stack([ref["img_info_height"], ref["img_info_width"]], 1)
    num_classes = head_layout(model["config_yaml"])[0]
    cats, names = coco_categories(num_classes)
    ids = [31 + 2 * i for i in range(n)]
    images = [(ids[i], np.zeros((int(h), int(w), 3), np.uint8)) for i, (h, w) in enumerate(hw)]
    img_dir, ann_path = write_coco(tmp_path, images, [(ids[0], cats[0], [5, 5, 50, 60])], cats,
                                   names)
    cfg = load_config_text(fixture_yaml(model, img_dir, ann_path, tmp_path / "work"))
    dataset = build_dataset(cfg.data.val, cfg.class_names, where="data.val")
    loader = build_loader(cfg.data.val, dataset.records, batch_size=n, seed=0, train=False)
    batch = next(loader.epoch(0))
    np.testing.assert_allclose(batch["warp_matrix"], ref["warp_matrices"], rtol=1e-12,
                               err_msg="the val pipeline must reproduce the fixture's warps")
    result = evaluate(HeadOutModel(model["eval/head_out"]), {}, loader, dataset, cfg)
    ours = coco_rows(result.detections, ids, cats)
    assert_rows(ours, ref["post_process_rows_img_cls_x1y1x2y2_score"], path.name)
    assert result.num_images == n and set(result.metrics) == set(METRIC_NAMES)
    for d in result.detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert d["category_id"] in cats and d["image_id"] in ids
        x, y, w, h = d["bbox"]
        assert w >= 0 and h >= 0 and x + w <= hw[ids.index(d["image_id"])][1] + 1e-3
    # reference order: image, then class ascending (descending score within a class)
    keys = [(ids.index(d["image_id"]), cats.index(d["category_id"])) for d in result.detections]
    assert keys == sorted(keys)


@pytest.mark.parametrize("path", fixture_params("model_*.npz"))
def test_evaluate_fixture_model(path, tmp_path):
    """Real forward + evaluation of ``test_img`` with each model fixture's weights (full model
    with the AGM, as the training loop passes it; batch of 2 with one padding row): the
    detections equal the reference rows of image 0 (or the oracle on ``eval/head_out[0]``)."""
    model = load_npz(path)
    img_dir, ann_path, img, cats = tiny_test_img_dataset(model, tmp_path)
    cfg = load_config_text(fixture_yaml(model, img_dir, ann_path, tmp_path / "work"))
    variables = torch_to_flax(group(model, "state_dict"), cfg)
    dataset = build_dataset(cfg.data.val, cfg.class_names, where="data.val")
    loader = build_loader(cfg.data.val, dataset.records, batch_size=2, seed=0, train=False)
    result = evaluate(build_model(cfg), variables, loader, dataset, cfg)

    ref = None
    for p in fixture_files("postprocess*.npz"):
        post = load_npz(p)
        if paired_model_fixture(post) == path:
            ref = post["post_process_rows_img_cls_x1y1x2y2_score"]
            ref = ref[ref[:, 0] == 0]
    if ref is None:  # no reference rows for this model: the oracle on its eval/head_out
        _, reg_max, strides = head_layout(model["config_yaml"])
        ref = oracle_rows(model["eval/head_out"][:1], tuple(int(v) for v in model["input_hw"]),
                          model["input_img0_warp_matrix"][None], np.array([img.shape[:2]]),
                          strides, reg_max)
    assert len(ref) > 0
    assert_rows(coco_rows(result.detections, [7], cats), ref, path.name)
    assert result.num_images == 1 and not result.notes
    assert all(isinstance(result.metrics[k], float) for k in METRIC_NAMES)
    assert len(result.per_class) == len(cats)
    assert result.per_class[0].num_gt == 2 and result.per_class[1].num_gt == 2
    assert np.isnan(result.per_class[2].ap) and result.per_class[2].num_gt == 0


# -- evaluate: metrics ---------------------------------------------------------------------


def _records_dataset() -> Dataset:
    """Two images, classes with category ids 3 and 8; image 2 has an ignore (crowd) box."""
    recs = [ImageRecord(1, "/x/a.jpg", 100, 120, [[10, 10, 50, 60], [60, 20, 110, 90]], [0, 1]),
            ImageRecord(2, "/x/b.jpg", 80, 80, [[5, 5, 30, 40]], [0],
                        ignore_boxes=[[40, 40, 80, 80]])]
    return Dataset(recs, ["cat", "dog"], [3, 8], source="records")


def _gt_detections(dataset: Dataset, score: float = 0.9) -> list[dict]:
    return [{"image_id": r.image_id, "category_id": dataset.category_ids[lab],
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
             "score": score} for r in dataset.records for b, lab in zip(r.boxes, r.labels)]


def test_perfect_detections_give_map_one(tmp_path):
    ds = _records_dataset()
    dets = _gt_detections(ds)
    # a confident detection on the crowd region of image 2 is ignored, not a false positive
    dets.append({"image_id": 2, "category_id": 8, "bbox": [41, 41, 38, 38], "score": 0.95})
    res = coco_evaluate(dets, ds)
    assert res.metrics["mAP"] == pytest.approx(1.0) and res.metrics["AP50"] == 1.0
    assert res.metrics["AP75"] == 1.0
    assert [(r.ap, r.ap50, r.num_gt) for r in res.per_class] == [
        (pytest.approx(1.0), pytest.approx(1.0), 2), (pytest.approx(1.0), pytest.approx(1.0), 1)]
    assert "Average Precision" in res.summary

    # the same through a COCO json (CocoDataset: the annotation file is the ground truth)
    imgs = [(r.image_id, np.zeros((r.height, r.width, 3), np.uint8)) for r in ds.records]
    anns = [(r.image_id, ds.category_ids[lab], [float(v) for v in b])
            for r in ds.records for b, lab in zip(r.boxes, r.labels)]
    img_dir, ann_path = write_coco(tmp_path, imgs, anns, ds.category_ids, ds.class_names)
    coco = CocoDataset(str(img_dir), str(ann_path))
    assert coco_evaluate(_gt_detections(ds), coco).metrics["mAP"] == pytest.approx(1.0)


def test_known_average_precision():
    """One class, 2 GT boxes; detections TP 0.9, FP 0.8, TP 0.7 (exact boxes): precision 1 up
    to recall 0.5 (51 of COCO's 101 recall points) and 2/3 up to 1 (50 points) at every IoU
    threshold: AP = (51 + 50 * 2/3) / 101."""
    recs = [ImageRecord(1, "a.jpg", 200, 200, [[10, 10, 60, 60], [100, 100, 180, 190]], [0, 0])]
    ds = Dataset(recs, ["thing"], [5])
    dets = [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 50], "score": 0.9},
            {"image_id": 1, "category_id": 5, "bbox": [150, 10, 40, 40], "score": 0.8},
            {"image_id": 1, "category_id": 5, "bbox": [100, 100, 80, 90], "score": 0.7}]
    res = coco_evaluate(dets, ds)
    ap = (51 + 50 * 2 / 3) / 101
    for k in ("mAP", "AP50", "AP75"):
        assert res.metrics[k] == pytest.approx(ap, abs=1e-9), k
    assert res.per_class[0].ap == pytest.approx(ap) and res.per_class[0].ap50 == pytest.approx(ap)


def test_no_detections_gives_zeros_with_a_note(tmp_path):
    ds = _records_dataset()
    res = coco_evaluate([], ds)
    assert res.metrics == {k: 0.0 for k in METRIC_NAMES}
    assert res.notes and "no detections" in res.notes[0] and res.summary == res.notes[0]
    assert [r.ap for r in res.per_class] == [0.0, 0.0]
    _, met = write_results(res, tmp_path)
    m = json.loads(met.read_text())
    assert m["mAP"] == 0.0 and m["num_detections"] == 0 and "no detections" in m["notes"][0]
    assert json.loads((tmp_path / "results.json").read_text()) == []


def test_result_files_and_table(tmp_path):
    ds = _records_dataset()
    dets = _gt_detections(ds)[:2]  # image 2 missed: cat AP 0.5-ish, dog AP 1
    res = coco_evaluate(dets, ds)
    res_path, met_path = write_results(res, tmp_path / "out")
    assert (res_path.name, met_path.name) == ("results.json", "metrics.json")
    assert json.loads(res_path.read_text()) == dets
    m = json.loads(met_path.read_text())
    assert set(METRIC_NAMES) <= set(m) and {"per_class", "num_images", "num_detections",
                                            "notes"} <= set(m)
    assert m["per_class"][1] == {"class": "dog", "category_id": 8, "AP": pytest.approx(1.0),
                                 "AP50": pytest.approx(1.0), "num_gt": 1}
    assert 0 < m["per_class"][0]["AP"] < 1
    # never overwritten: the next pair gets a suffix, the first files stay as they were
    before = (res_path.read_bytes(), met_path.read_bytes())
    empty = EvalResult({k: 0.0 for k in METRIC_NAMES}, [], [])
    assert [p.name for p in write_results(empty, tmp_path / "out")] == ["results_1.json",
                                                                         "metrics_1.json"]
    (tmp_path / "out" / "metrics_2.json").write_text("{}")  # either file taken: skip the pair
    assert write_results(empty, tmp_path / "out")[0].name == "results_3.json"
    assert (res_path.read_bytes(), met_path.read_bytes()) == before

    table = format_per_class_table(res)
    lines = table.splitlines()
    assert "class" in lines[0] and "AP50" in lines[0] and len(lines) == 3
    assert "dog" in lines[2] and "100.0" in lines[2]
    one = format_per_class_table(res, per_row=1).splitlines()
    assert len(one) == 4 and "cat" in one[2] and "dog" in one[3]


# -- scripts/eval.py -----------------------------------------------------------------------


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EVAL), *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO_ROOT, env=dict(os.environ))


def test_eval_script_end_to_end(tmp_path):
    model_path = paired_model_fixture(load_npz(fixture_files("postprocess*.npz")[0]))
    model = load_npz(model_path)
    _, ckpt = write_reference_checkpoint(model_path, tmp_path)
    img_dir, ann_path, _, cats = tiny_test_img_dataset(model, tmp_path / "data")
    cfg_path = tmp_path / "eval_cfg.yml"
    cfg_path.write_text(fixture_yaml(model, img_dir, ann_path, tmp_path / "work"))

    proc = _eval("--config", str(cfg_path), "--checkpoint", str(ckpt), "--workers", "0")
    assert proc.returncode == 0, f"eval failed:\n{proc.stdout}\n{proc.stderr}"
    out_dir = tmp_path / "work" / "eval"  # default: <save_dir>/eval
    results = json.loads((out_dir / "results.json").read_text())
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert results and {d["category_id"] for d in results} <= set(cats)
    assert set(METRIC_NAMES) <= set(metrics) and len(metrics["per_class"]) == len(cats)
    assert "Average Precision" in proc.stdout and "| class" in proc.stdout
    assert f"mAP {metrics['mAP']:.4f}" in proc.stdout

    # a second run never overwrites; --save-dir and --batch-size honoured
    first = (out_dir / "results.json").read_bytes()
    proc = _eval("--config", str(cfg_path), "--checkpoint", str(ckpt), "--save-dir",
                 str(out_dir), "--batch-size", "3", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert (out_dir / "results.json").read_bytes() == first
    again = json.loads((out_dir / "results_1.json").read_text())  # batch 3: float noise only
    assert_rows(coco_rows(again, [7], cats), coco_rows(results, [7], cats), "--batch-size 3")
    assert (out_dir / "metrics_1.json").is_file()

    missing = tmp_path / "nope.pth"
    proc = _eval("--config", str(cfg_path), "--checkpoint", str(missing))
    assert proc.returncode == 1 and str(missing) in proc.stderr
    assert not (out_dir / "results_2.json").exists()
