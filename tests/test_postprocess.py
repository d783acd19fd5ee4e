"""Parity of ``nanodet_jax.postprocess`` with ``nms*.npz`` and ``postprocess*.npz``.

NMS: keep lists (labels and order) identical; boxes and scores are gathered inputs and must be
bit-identical (stricter than the 1e-6 budget). Post-processing of the model fixture's
``eval/head_out``: image/class columns and row order identical; boxes and scores within
``|ours - ref| <= 1e-4 * (1 + |ref|)`` elementwise.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax import postprocess as pp
from tests.fixtures import (
    assert_nms_equal,
    fixture_params,
    head_layout,
    load_npz,
    nms_cases,
    paired_model_fixture,
)

TOL = 1e-4


def _max_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref) / (1.0 + np.abs(ref)), initial=0.0))


@pytest.mark.parametrize("path", fixture_params("nms*.npz"))
def test_multiclass_nms(path):
    for case, g, score_thr, iou_thr, max_num, scores in nms_cases(path):
        n, c = scores.shape
        nms = jax.jit(partial(pp.multiclass_nms, score_thr=score_thr, iou_thr=iou_thr,
                              max_num=max_num, pre_nms_top_k=n * c))
        det = jax.device_get(nms(jnp.asarray(g["multi_bboxes"]), jnp.asarray(scores)))
        assert det.boxes.shape[0] == (max_num if max_num > 0 else n * c), case
        assert_nms_equal(det, g, case)


def _load_case(path):
    d = load_npz(path)
    p = paired_model_fixture(d)  # the model fixture whose eval/head_out this file consumed
    with np.load(p, allow_pickle=False) as z:
        head_out, input_hw = z["eval/head_out"], tuple(int(v) for v in z["input_hw"])
        num_classes, reg_max, strides = head_layout(z["config_yaml"])
    assert head_out.shape[-1] == num_classes + 4 * (reg_max + 1)
    kw = dict(input_hw=input_hw, strides=strides, reg_max=reg_max)
    return d, jnp.asarray(head_out), kw


def _rows(det) -> np.ndarray:
    """Valid detections as rows ``(img, cls, x1, y1, x2, y2, score)`` in output order."""
    det = jax.device_get(det)
    rows = []
    for i in range(det.valid.shape[0]):
        v = det.valid[i]
        rows.append(np.concatenate([np.full((v.sum(), 1), i), det.labels[i][v][:, None],
                                    det.boxes[i][v], det.scores[i][v][:, None]], axis=1))
    return np.concatenate(rows, axis=0)


def _check_rows(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_array_equal(ours[:, :2], ref[:, :2])
    eb, es = _max_err(ours[:, 2:6], ref[:, 2:6]), _max_err(ours[:, 6], ref[:, 6])
    assert eb <= TOL and es <= TOL, (eb, es)
    return eb, es


@pytest.mark.parametrize("path", fixture_params("postprocess*.npz"))
def test_get_bboxes(path):
    d, head_out, kw = _load_case(path)
    det = jax.jit(partial(pp.get_bboxes, **kw))(head_out)
    eb, es = _check_rows(_rows(det), d["get_bboxes_rows_img_cls_x1y1x2y2_score"])
    print(f"get_bboxes max err boxes {eb:.3g} scores {es:.3g}")


@pytest.mark.parametrize("path", fixture_params("postprocess*.npz"))
def test_post_process(path):
    d, head_out, kw = _load_case(path)
    img_hw = np.stack([d["img_info_height"], d["img_info_width"]], axis=1)
    det = jax.jit(partial(pp.postprocess, **kw))(head_out, warp_matrices=d["warp_matrices"],
                                                 img_hw=img_hw)
    rows = _rows(det)
    # Reference order: image, class, descending score, x1, y1.
    rows = rows[np.lexsort((rows[:, 3], rows[:, 2], -rows[:, 6], rows[:, 1], rows[:, 0]))]
    eb, es = _check_rows(rows, d["post_process_rows_img_cls_x1y1x2y2_score"])
    print(f"post_process max err boxes {eb:.3g} scores {es:.3g}")


@pytest.mark.parametrize("path", fixture_params("postprocess*.npz"))
def test_jit_matches_eager_fixed_shapes(path):
    d, head_out, kw = _load_case(path)
    n = head_out.shape[0]  # every image of the fixture batch
    img_hw = np.stack([d["img_info_height"], d["img_info_width"]], axis=1)
    args = dict(warp_matrices=d["warp_matrices"], img_hw=img_hw, max_num=100)
    eager = pp.postprocess(head_out, **kw, **args)
    jitted = jax.jit(partial(pp.postprocess, **kw, max_num=100))(
        head_out, warp_matrices=args["warp_matrices"], img_hw=img_hw)
    for a, b in zip(eager, jitted, strict=True):
        assert a.shape == b.shape and a.shape[:2] == (n, 100)
    # Discrete outputs identical; coordinates may differ by an ulp of the image scale (XLA
    # fuses differently; x1 = cx - d*s cancels, so the error is absolute, not relative).
    np.testing.assert_array_equal(eager.labels, jitted.labels)
    np.testing.assert_array_equal(eager.valid, jitted.valid)
    ulp = np.spacing(np.float32(np.abs(eager.boxes).max()))
    assert np.abs(np.asarray(jitted.boxes) - np.asarray(eager.boxes)).max() <= 2 * ulp
    assert _max_err(jitted.scores, eager.scores) <= 1e-6
    assert jitted.labels.dtype == jnp.int32 and jitted.valid.dtype == jnp.bool_


def test_iou_threshold_compare_as_double():
    assert pp.iou_threshold_f32(0.6) == np.float32(0.6)  # float32(0.6) > 0.6: suppressed
    assert pp.iou_threshold_f32(0.5) == np.nextafter(np.float32(0.5), np.float32(1))
    assert pp.iou_threshold_f32(0.7) > 0.7 >= np.float32(0.7)


def test_nms_ties_stable_and_top_k_bound():
    """Equal scores keep candidate order (prior-major, then class); a small pre-NMS top-k
    keeps only the best candidates."""
    boxes = jnp.array([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10.0]])
    scores = jnp.array([[0.5, 0.5], [0.5, 0.9], [0.5, 0.1]])
    det = pp.multiclass_nms(boxes, scores, 0.05, 0.6, max_num=10)
    n = int(det.valid.sum())
    assert n == 4
    np.testing.assert_array_equal(det.labels[:n], [1, 0, 1, 0])
    np.testing.assert_array_equal(det.boxes[:n, 0], [50, 0, 0, 50])
    det = pp.multiclass_nms(boxes, scores, 0.05, 0.6, max_num=-1, pre_nms_top_k=2)
    assert det.valid.shape == (2,) and det.valid.all()
    np.testing.assert_array_equal(det.scores, np.float32([0.9, 0.5]))


def test_warp_boxes_inverse_of_scaling():
    m = jnp.array([[0.5, 0, 0], [0, 2.0, 0], [0, 0, 1]])
    boxes = jnp.array([[[10.0, 20.0, 30.0, 40.0], [-5.0, 0.0, 500.0, 60.0]]])
    out = pp.warp_boxes(boxes, m[None], jnp.array([100.0]), jnp.array([100.0]))
    np.testing.assert_allclose(out[0], [[5, 40, 15, 80], [0, 0, 100, 100]])
