"""``scripts/demo.py`` run as a subprocess on image 0 of the first post-processing fixture
(``test_img.jpg``: the ``raw_image_bgr_uint8`` of the ``val_pipeline*.npz`` with its size,
written as a PNG) with the weights of the model fixture paired with it (reference ``.pth`` +
its ``config_yaml`` as ``.yml`` in ``tmp_path``).

The image mode must write a valid annotated picture of the input's size and a JSON equal to
the ``Detector`` API output at the same threshold; the video mode must turn a 3-frame video
into a 3-frame annotated video. The threshold is taken from the post-processing fixture's
scores for image 0 (test_img.jpg), so that some but not all detections pass it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from nanodet_jax.inference import Detector, ImageDetections
from tests.fixtures import REPO_ROOT, fixture_files, load_npz, paired_model_fixture, raw_image
from tests.test_inference import write_reference_checkpoint

DEMO = REPO_ROOT / "scripts" / "demo.py"


def _demo_module():
    spec = importlib.util.spec_from_file_location("nanodet_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT, env=dict(os.environ))
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Image file, config, checkpoint and score threshold, all from the first
    ``postprocess*.npz`` and the model fixture paired with it."""
    ref = load_npz(fixture_files("postprocess*.npz")[0])
    model = paired_model_fixture(ref)
    tmp = tmp_path_factory.mktemp("demo_ckpt")
    cfg, ckpt = write_reference_checkpoint(model, tmp)
    # image 0 of the post-processing fixture, written losslessly (no JPEG decoder involved)
    img_path = tmp / "image0.png"
    h, w = int(ref["img_info_height"][0]), int(ref["img_info_width"][0])
    assert cv2.imwrite(str(img_path), raw_image(h, w))
    rows = ref["post_process_rows_img_cls_x1y1x2y2_score"]
    scores = np.sort(rows[rows[:, 0] == 0, 6])[::-1]
    assert len(scores) >= 2, "image 0 of the post-processing fixture needs 2+ detections"
    i = len(scores) // 5
    thr = round(float(scores[i] + scores[i + 1]) / 2, 6)
    return img_path, cfg, ckpt, thr


def test_image_mode_writes_picture_and_json(setup, tmp_path):
    img_path, cfg, ckpt, thr = setup
    out_dir = tmp_path / "out"
    stdout = _run("image", "--config", str(cfg), "--checkpoint", str(ckpt), "--path",
                  str(img_path), "--save-dir", str(out_dir), "--score-thr", str(thr), "--json")
    assert "forward+postprocess" in stdout and "preprocess" in stdout
    src = cv2.imread(str(img_path))
    drawn = cv2.imread(str(out_dir / img_path.name))
    assert drawn is not None and drawn.shape == src.shape
    assert np.abs(drawn.astype(int) - src.astype(int)).max() > 100  # something was drawn

    data = json.loads((out_dir / "detections.json").read_text())
    assert data["score_thr"] == pytest.approx(thr)
    (rec,) = data["results"]
    assert Path(rec["file"]).name == img_path.name
    api = Detector.from_checkpoint(cfg, ckpt, score_thr=thr)(src)
    assert 0 < len(api) < 100, "threshold should keep some but not all detections"
    assert rec["labels"] == api.labels.tolist() and rec["class_names"] == api.class_names
    np.testing.assert_allclose(rec["boxes"], api.boxes, rtol=0, atol=1e-4)
    np.testing.assert_allclose(rec["scores"], api.scores, rtol=0, atol=1e-6)
    assert min(rec["scores"]) > thr


def test_video_mode_three_frames(setup, tmp_path):
    img_path, cfg, ckpt, thr = setup
    src = cv2.resize(cv2.imread(str(img_path)), (320, 240))
    video = tmp_path / "clip.mp4"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (320, 240))
    assert w.isOpened()
    for k in range(3):
        w.write(np.roll(src, 20 * k, axis=1))
    w.release()
    out_dir = tmp_path / "out"
    _run("video", "--config", str(cfg), "--checkpoint", str(ckpt), "--path", str(video),
         "--save-dir", str(out_dir), "--score-thr", str(thr), "--json")
    cap = cv2.VideoCapture(str(out_dir / "clip.mp4"))
    n, shapes = 0, set()
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, shapes = n + 1, shapes | {frame.shape}
    cap.release()
    assert n == 3 and shapes == {(240, 320, 3)}
    records = json.loads((out_dir / "detections.json").read_text())["results"]
    assert [r["frame"] for r in records] == [0, 1, 2]


def test_unique_path_never_overwrites(tmp_path):
    demo = _demo_module()
    assert demo.unique_path(tmp_path, "a.jpg") == tmp_path / "a.jpg"
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert demo.unique_path(tmp_path, "a.jpg") == tmp_path / "a_1.jpg"
    (tmp_path / "a_1.jpg").write_bytes(b"x")
    assert demo.unique_path(tmp_path, "a.jpg") == tmp_path / "a_2.jpg"


def test_draw_detections_marks_boxes():
    demo = _demo_module()
    img = np.zeros((100, 120, 3), np.uint8)
    det = ImageDetections(np.array([[10, 30, 60, 90]], np.float32), np.array([0.9], np.float32),
                          np.array([3]), ["motorcycle"])
    out = demo.draw_detections(img, det)
    assert out.shape == img.shape and not img.any()  # input untouched
    color = demo.class_color(3)
    assert tuple(out[60, 10]) == color and tuple(out[90, 35]) == color  # box edges
    assert out[15:29, 10:60].any()  # label drawn above the box
    assert not out[50, 35].any()  # box interior untouched
