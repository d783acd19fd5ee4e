"""Synthetic shapes dataset: valid COCO, boxes = visible extent, determinism, class/colour
independence, atomic cached generation, CLI and config."""

from __future__ import annotations

import colorsys
import filecmp
import importlib.util
import json
from dataclasses import asdict

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from nanodet_jax.config import load_config
from nanodet_jax.data import synthetic as S
from tests.fixtures import REPO_ROOT

SMALL = S.SyntheticSpec(seed=5, num_train=12, num_val=4, size=128)


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    """Two runs with SMALL's seed, one with another seed."""
    base = tmp_path_factory.mktemp("synthetic")
    a = S.write_synthetic_dataset(base / "a", SMALL, workers=1)
    b = S.write_synthetic_dataset(base / "b", SMALL, workers=1)
    c = S.write_synthetic_dataset(base / "c", S.SyntheticSpec(6, 12, 4, 128), workers=1)
    return a, b, c


@pytest.fixture(scope="module")
def scenes():
    """A larger sample of scenes (128 px) for the statistics of the content."""
    return [S.make_scene(S.scene_rng(0, "train", i), 128) for i in range(120)]


def _files(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------- COCO

@pytest.mark.parametrize("split", S.SPLITS)
def test_valid_coco(small_sets, split):
    root = small_sets[0]
    img_dir, ann_file = S.split_paths(root, split)
    coco = COCO(str(ann_file))
    n = SMALL.count(split)
    assert sorted(coco.getImgIds()) == list(range(1, n + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(S.CLASS_NAMES)
    assert sorted(coco.getCatIds()) == list(range(1, len(S.CLASS_NAMES) + 1))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= n and len({a["id"] for a in anns}) == len(anns)
    for img in coco.loadImgs(coco.getImgIds()):
        pix = cv2.imread(str(img_dir / img["file_name"]), cv2.IMREAD_COLOR)
        assert pix is not None and pix.shape == (img["height"], img["width"], 3) == (
            128, 128, 3)
    for a in anns:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128, a
        assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h and a["category_id"] in range(1, 6)
        assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
    assert S.read_marker(root) == SMALL.marker()


def test_deterministic_by_seed(small_sets):
    a, b, c = small_sets
    names = _files(a)
    assert names == _files(b) and len(names) == 12 + 4 + 3
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert not mismatch and not errors, mismatch
    img = "train/" + S.image_name(0)
    assert not filecmp.cmp(a / img, c / img, shallow=False)
    assert not filecmp.cmp(a / "annotations/train.json", c / "annotations/train.json",
                           shallow=False)


def test_image_independent_of_split_size_and_workers(tmp_path):
    """Image i depends on (seed, split, i) only; the process count changes nothing."""
    big = S.SyntheticSpec(5, 40, 1, 128)
    one = S.write_synthetic_dataset(tmp_path / "one", big, workers=1)
    two = S.write_synthetic_dataset(tmp_path / "two", big, workers=2)
    _, mismatch, errors = filecmp.cmpfiles(one, two, _files(one), shallow=False)
    assert not mismatch and not errors, mismatch
    small = S.write_synthetic_dataset(tmp_path / "small", SMALL, workers=1)
    for i in range(SMALL.num_train):
        assert filecmp.cmp(one / "train" / S.image_name(i), small / "train" / S.image_name(i),
                           shallow=False)


# -------------------------------------------------------------------------------- occlusion

def test_half_covered_shape_gets_visible_box():
    bg = np.zeros((128, 128, 3), np.uint8)
    early = S.Shape(label=1, center=(40.0, 40.0), radii=(20.0, 20.0), color=(200, 0, 0))
    late = S.Shape(label=1, center=(70.0, 40.0), radii=(30.0, 30.0), color=(0, 200, 0))
    scene = S.render_scene(bg, [early, late])
    full = S.mask_box(S.shape_mask(early, (128, 128)))
    np.testing.assert_allclose(full, [20, 20, 60, 60], atol=1)
    # the later square (x >= 40) hides the right half of the earlier one
    box = scene.boxes[0]
    np.testing.assert_allclose(box, [20, 20, 40, 60], atol=1)
    assert box[0] == full[0] and box[1] == full[1] and box[3] == full[3] and box[2] <= 41
    n_full = S.shape_mask(early, (128, 128)).sum()
    assert 0.4 * n_full < scene.areas[0] < 0.6 * n_full
    np.testing.assert_array_equal(scene.labels, [1, 1])
    np.testing.assert_allclose(scene.boxes[1], [40, 10, 100, 70], atol=1)
    # painted pixels: the visible part of the first square is red, the second green
    assert (scene.image[40, 25] == (200, 0, 0)).all()
    assert (scene.image[40, 45] == (0, 200, 0)).all()


def test_hidden_and_tiny_shapes_dropped_ring_hole_visible():
    bg = np.zeros((96, 96, 3), np.uint8)
    hidden = S.Shape(label=2, center=(30.0, 30.0), radii=(8.0, 8.0))
    cover = S.Shape(label=1, center=(30.0, 30.0), radii=(20.0, 20.0))
    sliver = S.Shape(label=0, center=(70.0, 70.0), radii=(10.0, 10.0))
    mostly = S.Shape(label=1, center=(73.0, 70.0), radii=(12.0, 12.0))
    left = S.shape_mask(sliver, (96, 96)) & ~S.shape_mask(mostly, (96, 96))
    assert 0 < left.sum() < S.MIN_VISIBLE_PX  # a few pixels stay visible
    scene = S.render_scene(bg, [hidden, cover, sliver, mostly])
    assert [s.label for s in scene.shapes] == [1, 1]  # hidden and sliver dropped
    # an earlier circle inside a ring's hole stays fully visible
    dot = S.Shape(label=0, center=(48.0, 48.0), radii=(6.0, 6.0))
    ring = S.Shape(label=4, center=(48.0, 48.0), radii=(30.0, 30.0), inner=0.5)
    scene = S.render_scene(bg, [dot, ring])
    np.testing.assert_array_equal(scene.labels, [0, 4])
    np.testing.assert_array_equal(scene.boxes[0], S.mask_box(S.shape_mask(dot, (96, 96))))
    assert scene.areas[0] == S.shape_mask(dot, (96, 96)).sum()


def test_random_scene_boxes_valid(scenes):
    """Random scenes: boxes inside the image, positive size, enough visible pixels."""
    for sc in scenes[:30]:
        assert sc.boxes.dtype == np.float32 and len(sc.boxes) == len(sc.labels) >= 1
        assert np.all(sc.boxes[:, :2] >= 0) and np.all(sc.boxes[:, 2:] <= 128)
        assert np.all(sc.boxes[:, 2:] > sc.boxes[:, :2])
        assert np.all(sc.areas >= S.MIN_VISIBLE_PX)


# ---------------------------------------------------------------------------------- content

def test_every_class_and_size_range(small_sets, scenes):
    coco = COCO(str(S.split_paths(small_sets[0], "train")[1]))
    assert {a["category_id"] for a in coco.loadAnns(coco.getAnnIds())} == set(range(1, 6))
    labels = np.concatenate([s.labels for s in scenes])
    counts = np.bincount(labels, minlength=len(S.CLASS_NAMES))
    assert counts.min() > 0.1 * len(labels), counts  # roughly balanced (each ~20%)
    sides = np.concatenate([s.boxes[:, 2:] - s.boxes[:, :2] for s in scenes]).max(1)
    assert sides.min() <= 16 and sides.max() >= 0.45 * 128, (sides.min(), sides.max())
    per_image = np.array([len(s.labels) for s in scenes])
    assert per_image.min() >= 1 and per_image.max() >= 5 and per_image.mean() > 2.5
    # overlaps happen: some pair of boxes in the same image intersects
    def overlaps(b):
        lo, hi = np.maximum(b[:, None, :2], b[None, :, :2]), np.minimum(b[:, None, 2:],
                                                                         b[None, :, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), -1)
        return (inter[~np.eye(len(b), dtype=bool)] > 0).any()
    assert sum(overlaps(s.boxes) for s in scenes) >= 10


def test_colour_not_determined_by_class(scenes):
    """Each class appears in every one of 6 hue groups, and the hue distribution of each
    class is close to the overall one (total variation distance < 0.25)."""
    hue_bins = np.zeros((len(S.CLASS_NAMES), 6), int)
    for sc in scenes:
        for s in sc.shapes:
            b, g, r = (c / 255 for c in s.color)
            h = colorsys.rgb_to_hsv(r, g, b)[0]
            hue_bins[s.label, min(int(h * 6), 5)] += 1
    assert (hue_bins > 0).all(), hue_bins
    overall = hue_bins.sum(0) / hue_bins.sum()
    per_class = hue_bins / hue_bins.sum(1, keepdims=True)
    tv = 0.5 * np.abs(per_class - overall).sum(1)
    assert tv.max() < 0.25, (tv, hue_bins)


# ------------------------------------------------------------------------- cache + atomicity

def test_ensure_generates_once_and_respects_foreign_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NANODET_DATA_DIR", str(tmp_path))
    spec = asdict(S.SyntheticSpec(1, 3, 2, 64))
    expect = tmp_path / "synthetic_1_3_2_64"
    assert S.synthetic_dataset_dir(**spec) == expect and not expect.exists()
    root = S.ensure_synthetic_dataset(**spec)
    assert root == expect and S.read_marker(root)["num_train"] == 3
    stamp = (root / S.MARKER).stat().st_mtime_ns
    assert S.ensure_synthetic_dataset(**spec) == root
    assert (root / S.MARKER).stat().st_mtime_ns == stamp  # not regenerated
    ann = S.split_paths(root, "train")[1]
    assert S.ensure_synthetic_for_path(ann) == root
    assert S.ensure_synthetic_for_path(tmp_path / "coco" / "train.json") is None
    # foreign content at the canonical path: untouched, data goes next to it
    other = tmp_path / "synthetic_2_3_2_64"
    other.mkdir()
    (other / "mine.txt").write_text("user data")
    with pytest.warns(UserWarning, match="holds other data"):
        moved = S.ensure_synthetic_for_path(other / "annotations" / "val.json")
    assert moved == tmp_path / "synthetic_2_3_2_64-2" and S.read_marker(moved)["seed"] == 2
    assert _files(other) == ["mine.txt"]
    assert S.ensure_synthetic_dataset(other, 2, 3, 2, 64) == moved  # found, not regenerated
    # a missing path under a synthetic name is generated there
    fresh = tmp_path / "nested" / "synthetic_3_2_1_64"
    assert S.ensure_synthetic_for_path(fresh / "train") == fresh and S.read_marker(fresh)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def boom(root, spec, split, workers):
        calls.append(split)
        (root / "partial.txt").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        S.write_synthetic_dataset(tmp_path / "ds", SMALL)
    assert calls == ["train"] and list(tmp_path.iterdir()) == []


def test_write_refuses_existing(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        S.write_synthetic_dataset(tmp_path / "x", SMALL)
    assert (tmp_path / "x" / "f").read_text() == "keep"
    with pytest.raises(ValueError, match="size must be >= 64"):
        S.SyntheticSpec(0, 1, 1, 32)
    assert S.SyntheticSpec.from_dirname("synthetic_4_10_2_96") == S.SyntheticSpec(4, 10, 2, 96)
    assert S.SyntheticSpec.from_dirname("synthetic_4_10_96") is None


# ------------------------------------------------------------------------------ CLI, config

def _cli():
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_dataset", REPO_ROOT / "scripts" / "make_synthetic_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli(tmp_path, capsys):
    main = _cli()
    out = tmp_path / "shapes"
    args = [str(out), "--seed", "7", "--train", "3", "--val", "2", "--size", "96",
            "--workers", "1"]
    assert main(args) == 0
    assert _files(out) == sorted(
        ["annotations/train.json", "annotations/val.json", S.MARKER]
        + [f"train/{S.image_name(i)}" for i in range(3)]
        + [f"val/{S.image_name(i)}" for i in range(2)])
    assert json.loads((out / S.MARKER).read_text())["size"] == 96
    assert main(args) == 0 and "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(out), "--seed", "8", "--train", "3", "--val", "2", "--size", "96"])
    assert "refusing to overwrite" in capsys.readouterr().err


def test_config_points_at_cache_without_generating(tmp_path, monkeypatch):
    monkeypatch.setenv("NANODET_DATA_DIR", str(tmp_path))
    cfg = load_config(REPO_ROOT / "configs" / "synthetic.py")
    assert list(tmp_path.iterdir()) == []  # loading the config generates nothing
    assert list(cfg.class_names) == list(S.CLASS_NAMES)
    arch = cfg.model.arch
    assert arch.head.num_classes == arch.aux_head.num_classes == len(S.CLASS_NAMES)
    assert arch.backbone.pretrain is False and cfg.save_dir == "workspace/synthetic"
    assert cfg.data.train.input_size == cfg.data.val.input_size == [128, 128]
    root = tmp_path / "synthetic_0_3000_100_128"
    for split in S.SPLITS:
        img_dir, ann = S.split_paths(root, split)
        assert cfg.data[split].img_path == str(img_dir) and cfg.data[split].ann_path == str(ann)
    assert S.SyntheticSpec.from_dirname(root.name) == S.SyntheticSpec(0, 3000, 100, 128)
    assert cfg.schedule.total_epochs == cfg.schedule.lr_schedule.T_max
