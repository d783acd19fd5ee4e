"""Validation transforms vs the reference pipeline, data-driven over ``val_pipeline*.npz``.

Variants are discovered from the ``<variant>/img_chw`` keys. ``keep_ratio`` of a variant is
not read from its name: both settings are run for the stored ``dst_shape_wh`` and the one
whose matrix and output shape reproduce the fixture is used (a name containing
``keepratio_true``/``keepratio_false`` must then agree). Every other quantity is recomputed
from ``raw_image_bgr_uint8`` and the raw boxes stored in the file.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanodet_jax.data import transforms as T
from tests.fixtures import fixture_params, group, load_npz

IMG_TOL = 1e-5
MAT_TOL = 1e-9
BOX_TOL = 1e-5  # boxes are float32 results of float64 math: expected bit-identical


def _variants(d: dict) -> list[str]:
    names = sorted(k[: -len("/img_chw")] for k in d if k.endswith("/img_chw"))
    assert names, "no <variant>/img_chw keys"
    return names


def _match_keep_ratio(raw: np.ndarray, g: dict, variant: str) -> bool:
    dst = tuple(int(v) for v in g["dst_shape_wh"])
    ref_hw = g["img_chw"].shape[1:]
    outs = {kr: T.shape_transform(raw, dst, kr) for kr in (False, True)}
    hits = [kr for kr, o in outs.items() if o.img.shape[:2] == ref_hw
            and np.abs(o.warp_matrix - g["warp_matrix"]).max() <= MAT_TOL]
    assert hits, f"{variant}: neither keep_ratio setting reproduces warp_matrix / output shape"
    for token, kr in (("keepratio_true", True), ("keepratio_false", False)):
        if token in variant.lower():
            assert kr in hits, f"{variant}: name says keep_ratio={kr}, data matches {hits}"
            return kr
    return hits[0]


@pytest.mark.parametrize("path", fixture_params("val_pipeline*.npz"))
def test_val_pipeline_parity(path):
    d = load_npz(path)
    raw = d["raw_image_bgr_uint8"]
    raw_boxes = {"gt_bboxes_xml": d["xml_gt_bboxes"],
                 "gt_bboxes_coco_as_ignore": d["coco_img0_gt_bboxes"]}
    errs = {}
    for variant in _variants(d):
        g = group(d, variant)
        keep_ratio = _match_keep_ratio(raw, g, variant)
        dst = tuple(int(v) for v in g["dst_shape_wh"])
        out = T.val_transform(raw, dst, keep_ratio, d["normalize_mean_bgr"],
                              d["normalize_std_bgr"], boxes=raw_boxes)
        ref_img = g["img_chw"].transpose(1, 2, 0)
        assert out.img.shape == ref_img.shape and out.img.dtype == np.float32, variant
        e_img = float(np.abs(out.img - ref_img).max())
        e_mat = float(np.abs(out.warp_matrix - g["warp_matrix"]).max())
        assert e_img <= IMG_TOL, f"{variant}: image max err {e_img}"
        assert e_mat <= MAT_TOL, f"{variant}: matrix max err {e_mat}"
        assert out.warp_matrix.dtype == np.float64
        e_box = 0.0
        for name in raw_boxes:
            assert name in g, f"{variant}: no {name}"
            got = out.boxes[name]
            assert got.dtype == np.float32 and got.shape == g[name].shape, (variant, name)
            e_box = max(e_box, float(np.abs(got - g[name]).max(initial=0.0)))
        assert e_box <= BOX_TOL, f"{variant}: box max err {e_box}"
        errs[variant] = (keep_ratio, e_img, e_mat, e_box)
    print(f"\n{path.name} (keep_ratio, img, matrix, boxes) max errors: {errs}")


@pytest.mark.parametrize("path", fixture_params("val_pipeline*.npz"))
def test_warp_boxes_inverse(path):
    """``warp_boxes(boxes, inv(M), raw_w, raw_h)`` as ``post_process`` does. The fixture's
    variant is the one whose warped xml boxes are the inverse input (else the first)."""
    d = load_npz(path)
    inp = d["warp_boxes_inverse_input"]
    variants = _variants(d)
    same = [v for v in variants if d[f"{v}/gt_bboxes_xml"].shape == inp.shape
            and np.array_equal(d[f"{v}/gt_bboxes_xml"], inp)]
    variant = (same or variants)[0]
    h, w = d["raw_image_bgr_uint8"].shape[:2]
    got = T.warp_boxes(inp, np.linalg.inv(d[f"{variant}/warp_matrix"]), w, h)
    assert got.dtype == np.float32
    err = float(np.abs(got - d["warp_boxes_inverse_out"]).max())
    assert err <= BOX_TOL, err
    print(f"\n{path.name} inverse warp via {variant}: max err {err}")


def test_keep_ratio_geometry():
    # 360x404 into 320x320: fit ratio 320/404, width int(285.1) = 285; M recomputed from it.
    assert T.minimum_dst_shape((360, 404), (320, 320)) == (285, 320)
    assert T.minimum_dst_shape((360, 404), (320, 320), divisible=32) == (288, 320)
    assert T.minimum_dst_shape((10, 1000), (320, 320), divisible=32) == (32, 320)
    m = T.resize_matrix((360, 404), (285, 320), keep_ratio=True)
    corners = np.array([[0, 0, 1], [360, 404, 1]], np.float64) @ m.T
    # centred: equal margins on both sides of the short axis
    assert corners[0, 0] == pytest.approx(285 - corners[1, 0])
    assert corners[0, 1] == pytest.approx(320 - corners[1, 1])
    assert m[0, 0] == m[1, 1] == pytest.approx(285 / 360)
    np.testing.assert_array_equal(T.resize_matrix((100, 50), (320, 320), False),
                                  np.diag([3.2, 6.4, 1.0]))


def test_warp_boxes_projective_and_empty():
    m = np.array([[1.0, 0, 0], [0, 1, 0], [0.01, 0, 1]])  # x' = x/(1+.01x)
    out = T.warp_boxes(np.array([[0, 0, 100, 50]], np.float32), m, 1000, 1000)
    np.testing.assert_allclose(out, [[0, 0, 50, 50]], rtol=1e-6)
    out = T.warp_boxes(np.array([[-10, -10, 2000, 20]], np.float32), np.eye(3), 100, 15)
    np.testing.assert_array_equal(out, [[0, 0, 100, 15]])
    assert T.warp_boxes(np.zeros((0, 4), np.float32), np.eye(3), 10, 10).shape == (0, 4)


def test_normalize_and_collate():
    img = np.array([[[0, 128, 255]]], np.uint8)
    unit = T.to_unit_float(img)
    out = T.normalize(unit)
    assert out is not unit and np.array_equal(unit, img / np.float32(255)), "input modified"
    assert T.normalize(unit, inplace=True) is unit and np.array_equal(unit, out)
    expect = (np.float32([0, 128, 255]) / 255 - np.float32(T.DEFAULT_MEAN_BGR) / 255) / (
        np.float32(T.DEFAULT_STD_BGR) / 255)
    np.testing.assert_array_equal(out[0, 0], expect.astype(np.float32))
    assert out.dtype == np.float32
    a = np.ones((40, 30, 3), np.float32)
    b = np.full((20, 70, 3), 2, np.float32)
    batch = T.collate_images([a, b])
    assert batch.shape == (2, 64, 96, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0, :40, :30], a)
    np.testing.assert_array_equal(batch[1, :20, :70], b)
    assert not batch[0, 40:].any() and not batch[0, :, 30:].any()
    assert not batch[1, 20:].any() and not batch[1, :, 70:].any()
    assert T.collate_images([np.ones((64, 32, 3), np.float32)]).shape == (1, 64, 32, 3)
