"""``Detector`` end to end with the model fixture's weights, data-driven over
``postprocess*.npz``.

The fixture's reference ``state_dict/*`` is written as a real ``.pth`` file (torch) and its
``config_yaml`` as a ``.yml`` in ``tmp_path``, then loaded through
``Detector.from_checkpoint``: config parsing, checkpoint reading, conversion, the val
transform, forward, post-processing and the inverse warp are all on the tested path.
Image 0 of the post-processing fixture is ``test_img.jpg`` (``raw_image_bgr_uint8`` of the
``val_pipeline*.npz`` with the same original size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanodet_jax.data.transforms import minimum_dst_shape
from nanodet_jax.inference import Detector, ImageDetections
from tests.fixtures import (
    fixture_files,
    fixture_params,
    group,
    load_npz,
    paired_model_fixture,
    raw_image,
)

TOL = 1e-4  # |ours - ref| <= TOL * (1 + |ref|), as in test_postprocess


def write_reference_checkpoint(model_npz: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write a model fixture's ``config_yaml`` (.yml) and ``state_dict/*`` (.pth, torch)."""
    import torch

    data = load_npz(model_npz)
    cfg_path, ckpt_path = out_dir / f"{model_npz.stem}.yml", out_dir / f"{model_npz.stem}.pth"
    cfg_path.write_text(str(data["config_yaml"]))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in group(data, "state_dict").items()}
    torch.save({"state_dict": sd}, ckpt_path)
    return cfg_path, ckpt_path


def _rows(r: ImageDetections) -> np.ndarray:
    """``(N, 6)`` rows (cls, x1, y1, x2, y2, score) in the reference post_process order."""
    rows = np.concatenate([r.labels[:, None], r.boxes, r.scores[:, None]], axis=1)
    return rows[np.lexsort((rows[:, 2], rows[:, 1], -rows[:, 5], rows[:, 0]))]


def _max_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / (1 + np.abs(b)), initial=0.0))


def assert_same_detections(got: ImageDetections, ref: ImageDetections, tol: float = TOL):
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert got.class_names == ref.class_names
    assert _max_err(got.boxes, ref.boxes) <= tol and _max_err(got.scores, ref.scores) <= tol


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory):
    """(config path, checkpoint path, model fixture data) of the model fixture paired with the
    first post-processing fixture (its weights are known to detect objects in image 0)."""
    p = paired_model_fixture(load_npz(fixture_files("postprocess*.npz")[0]))
    cfg_path, ckpt_path = write_reference_checkpoint(p, tmp_path_factory.mktemp("ckpt"))
    return cfg_path, ckpt_path, load_npz(p)


@pytest.fixture(scope="module")
def detector(fixture_model):
    cfg_path, ckpt_path, _ = fixture_model
    return Detector.from_checkpoint(cfg_path, ckpt_path)


@pytest.mark.parametrize("path", fixture_params("postprocess*.npz"))
def test_detector_matches_reference_post_process(path, tmp_path):
    d = load_npz(path)
    p = paired_model_fixture(d)
    cfg_path, ckpt_path = write_reference_checkpoint(p, tmp_path)
    model = load_npz(p)
    in_h, in_w = (int(v) for v in model["input_hw"])  # may differ from the config's size
    det = Detector.from_checkpoint(cfg_path, ckpt_path, input_size=(in_w, in_h))
    assert (det.score_thr, det.iou_thr, det.max_num) == (0.05, 0.6, 100)  # evaluation defaults
    h, w = int(d["img_info_height"][0]), int(d["img_info_width"][0])
    img = raw_image(h, w)

    # the detector's input for image 0 is the fixture's network input image 0
    batch, inv, hw = det.preprocess([img])
    assert batch.shape[1:3] == (in_h, in_w)
    assert float(np.abs(batch[0] - model["input_images"][0].transpose(1, 2, 0)).max()) <= 1e-5
    np.testing.assert_allclose(np.linalg.inv(inv[0].astype(np.float64)),
                               model["input_img0_warp_matrix"], rtol=1e-6)
    np.testing.assert_array_equal(hw[0], [h, w])

    result = det(img)
    assert isinstance(result, ImageDetections) and result.boxes.dtype == np.float32
    assert np.all(np.diff(result.scores) <= 0), "detections must be in descending score order"
    ref = d["post_process_rows_img_cls_x1y1x2y2_score"]
    ref = ref[ref[:, 0] == 0][:, 1:]
    ours = _rows(result)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_array_equal(ours[:, 0], ref[:, 0])
    eb, es = _max_err(ours[:, 1:5], ref[:, 1:5]), _max_err(ours[:, 5], ref[:, 5])
    abs_b = float(np.abs(ours[:, 1:5] - ref[:, 1:5]).max())
    assert eb <= TOL and es <= TOL, (eb, es)
    assert result.class_names == [det.class_names[c] for c in result.labels]
    print(f"\n{path.name}: {len(result)} detections, max err boxes {eb:.3g} (abs {abs_b:.3g} px)"
          f", scores {es:.3g}; timings {det.last_timings}")


def _other_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A second, differently sized picture: mirrored and resized copy of ``img``."""
    import cv2

    return cv2.resize(np.ascontiguousarray(img[:, ::-1]), (hw[1], hw[0]),
                      interpolation=cv2.INTER_AREA)


def test_batch_equals_single_images(detector):
    img = _test_image()
    other = _other_image(img, (480, 640))
    batch = detector([img, other])
    assert isinstance(batch, list) and len(batch) == 2
    assert detector.last_timings["batch"] == 2
    for im, got in zip((img, other), batch, strict=True):
        alone = detector(im)
        assert len(alone) > 0
        assert_same_detections(got, alone)
        # original-image coordinates: inside the image
        assert np.all(got.boxes[:, [0, 2]] <= im.shape[1]) and np.all(got.boxes[:, [1, 3]]
                                                                      <= im.shape[0])
    w, h = detector.input_wh  # keep_ratio False: every image becomes exactly w x h
    assert {(2, -(-h // 32) * 32, -(-w // 32) * 32), (1, -(-h // 32) * 32, -(-w // 32) * 32)
            } <= set(detector._compiled)


def test_keep_ratio_batch_pads_and_maps_back(fixture_model):
    """keep_ratio: outputs shrink (no stretch), the batch is padded to a multiple of 32 and
    boxes still come back in each original image's pixels. Same-aspect images share the padded
    size, so batching must equal running them alone."""
    cfg_path, ckpt_path, _ = fixture_model
    det = Detector.from_checkpoint(cfg_path, ckpt_path, keep_ratio=True)
    img = _test_image()
    half = _other_image(img[:, ::-1], (img.shape[0] // 2, img.shape[1] // 2))
    ow, oh = minimum_dst_shape(img.shape[1::-1], det.input_wh)
    assert (ow, oh) == minimum_dst_shape(half.shape[1::-1], det.input_wh)
    assert (ow, oh) != det.input_wh, "test image must not have the input's aspect ratio"
    batch, _, _ = det.preprocess([img, half])
    assert batch.shape[1:3] == (-(-oh // 32) * 32, -(-ow // 32) * 32)
    assert not batch[:, oh:].any() and not batch[:, :, ow:].any()  # zero pad after normalise
    both = det([img, half])
    for im, got in zip((img, half), both, strict=True):
        assert_same_detections(got, det(im))
        assert np.all(got.boxes[:, 2] <= im.shape[1]) and np.all(got.boxes[:, 3] <= im.shape[0])
    wide = _other_image(img, (img.shape[0] // 4, img.shape[1] * 2))
    ww, wh = minimum_dst_shape(wide.shape[1::-1], det.input_wh)
    batch, _, _ = det.preprocess([img, wide])
    assert batch.shape[1:3] == (-(-max(oh, wh) // 32) * 32, -(-max(ow, ww) // 32) * 32)


def test_api_contract(detector):
    img = _test_image()
    r = detector(img)
    d = r.to_dict()
    assert set(d) == {"boxes", "scores", "labels", "class_names"}
    assert len(d["boxes"]) == len(r) == len(d["class_names"])
    assert all(detector.class_names[lab] == n for lab, n in zip(d["labels"], d["class_names"]))
    assert r.labels.dtype == np.int64 and r.scores.dtype == np.float32
    assert detector([]) == []
    detector(img)
    t = detector.last_timings
    assert set(t) >= {"preprocess", "compile", "infer", "total"} and t["compile"] < 100
    with pytest.raises(ValueError, match="uint8"):
        detector(img.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        detector(img[..., 0])


def test_display_threshold_equals_filtered_evaluation_output(fixture_model, detector):
    cfg_path, ckpt_path, _ = fixture_model
    img = _test_image()
    full = detector(img)
    thr = float(np.median(full.scores))  # a threshold that keeps about half
    high = Detector.from_checkpoint(cfg_path, ckpt_path, score_thr=thr)(img)
    keep = full.scores > thr
    assert 0 < keep.sum() < len(full)
    assert_same_detections(high, ImageDetections(full.boxes[keep], full.scores[keep],
                                                 full.labels[keep],
                                                 [n for n, k in zip(full.class_names, keep)
                                                  if k]))


def _test_image() -> np.ndarray:
    """``raw_image_bgr_uint8`` of the first ``val_pipeline*.npz`` (test_img.jpg)."""
    return load_npz(fixture_files("val_pipeline*.npz")[0])["raw_image_bgr_uint8"]
