"""The batch loader: fixed shapes, determinism across worker counts, resume mid-epoch,
process slices, train drop-last vs padded evaluation, unreadable images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from nanodet_jax.config import nanodet_plus_recipe
from nanodet_jax.data.loader import (
    DataError,
    Loader,
    build_loader,
    epoch_batches,
    padded_hw,
    resolve_max_boxes,
)
from nanodet_jax.data.record import ImageRecord

INPUT_WH = (96, 64)


def _records(tmp_path, n=10, seed=0) -> list[ImageRecord]:
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 120))
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        k = i % 4  # 0..3 boxes, image 0 has none
        x1, y1 = rng.uniform(0, w / 2, k), rng.uniform(0, h / 2, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, k), y1 + rng.uniform(5, h / 2, k)],
                         -1)
        recs.append(ImageRecord(image_id=100 + i, file=str(path), height=h, width=w,
                                boxes=boxes, labels=rng.integers(0, 3, k)))
    return recs


def _node(**kw):
    node = nanodet_plus_recipe("1.0x", 320)["data"]["train"]
    node.update(input_size=list(INPUT_WH), **kw)
    return node


def _epoch(loader: Loader, epoch: int, start: int = 0) -> list[dict]:
    return list(loader.epoch(epoch, start))


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_shapes_and_fields(tmp_path):
    recs = _records(tmp_path)
    loader = build_loader(_node(), recs, batch_size=4, seed=1, train=True)
    assert len(loader) == 10 // 4
    batches = _epoch(loader, 0)
    g = max(r.num_boxes for r in recs)
    h, w = padded_hw(INPUT_WH)
    for b in batches:
        assert b["image"].shape == (4, h, w, 3) and b["image"].dtype == np.float32
        assert b["gt_boxes"].shape == (4, g, 4) and b["gt_boxes"].dtype == np.float32
        assert b["gt_labels"].shape == (4, g) and b["gt_labels"].dtype == np.int32
        assert b["gt_mask"].shape == (4, g) and b["gt_mask"].dtype == bool
        assert b["warp_matrix"].shape == (4, 3, 3) and b["image_id"].shape == (4,)
        assert b["orig_hw"].shape == (4, 2) and b["valid"].all()
        for i in range(4):
            rec = next(r for r in recs if r.image_id == b["image_id"][i])
            assert b["gt_mask"][i].sum() == rec.num_boxes
            np.testing.assert_array_equal(b["gt_labels"][i, :rec.num_boxes], rec.labels)
            boxes = b["gt_boxes"][i, b["gt_mask"][i]]
            assert np.all(boxes[:, [0, 2]] <= INPUT_WH[0]) and np.all(boxes >= 0)
            assert np.all(boxes[:, [1, 3]] <= INPUT_WH[1])


def test_training_shuffles_by_seed_and_epoch_and_drops_last():
    a = epoch_batches(10, 4, seed=1, epoch=0, train=True)
    assert a.shape == (2, 4) and len(set(a.ravel())) == 8
    np.testing.assert_array_equal(a, epoch_batches(10, 4, seed=1, epoch=0, train=True))
    assert not np.array_equal(a, epoch_batches(10, 4, seed=1, epoch=1, train=True))
    assert not np.array_equal(a, epoch_batches(10, 4, seed=2, epoch=0, train=True))


def test_evaluation_pads_last_batch_and_sees_every_image_once(tmp_path):
    recs = _records(tmp_path, n=7)
    loader = build_loader(_node(), recs, batch_size=3, seed=0, train=False)
    batches = _epoch(loader, 0)
    assert len(batches) == 3
    ids = np.concatenate([b["image_id"][b["valid"]] for b in batches])
    assert sorted(ids.tolist()) == [r.image_id for r in recs]
    last = batches[-1]
    assert last["valid"].tolist() == [True, False, False]
    assert not last["gt_mask"][1:].any() and not last["image"][1:].any()


def test_process_slices_make_the_global_batch():
    full = epoch_batches(20, 8, seed=3, epoch=2, train=True)
    parts = [epoch_batches(20, 8, seed=3, epoch=2, train=True, process_index=p,
                           process_count=2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    with pytest.raises(DataError, match="not divisible by the process count"):
        epoch_batches(20, 7, seed=0, epoch=0, train=True, process_count=2)


def test_same_samples_with_0_1_2_workers_and_resume_mid_epoch(tmp_path):
    recs = _records(tmp_path, n=9)
    runs = {w: _epoch(build_loader(_node(), recs, batch_size=2, seed=5, train=True,
                                   num_workers=w), 1) for w in (0, 1, 2)}
    _assert_same(runs[0], runs[1])
    _assert_same(runs[0], runs[2])
    loader = build_loader(_node(), recs, batch_size=2, seed=5, train=True)
    it = loader.epoch(1)
    next(it), next(it)
    assert loader.state() == {"epoch": 1, "batch": 2}
    resumed = build_loader(_node(), recs, batch_size=2, seed=5, train=True)
    _assert_same(_epoch(resumed, **{"epoch": 1, "start": loader.state()["batch"]}), runs[0][2:])


def test_unreadable_image_is_replaced_and_counted(tmp_path, caplog):
    recs = _records(tmp_path, n=200)
    (tmp_path / "img3.png").unlink()
    (tmp_path / "img4.png").write_bytes(b"not a png")
    (tmp_path / "img10.png").write_bytes(b"")
    loader = build_loader(_node(), recs, batch_size=4, seed=0, train=False)
    with pytest.raises(DataError) as e:
        _epoch(loader, 0)
    msg = str(e.value)
    assert "3 of 200 images" in msg and "more than 1%" in msg
    assert all(f"img{i}.png" in msg for i in (3, 4, 10))
    assert "img3.png" in caplog.text
    loader = Loader(recs, loader.spec, 4, max_skip_fraction=0.02)
    batches = _epoch(loader, 0)
    ids = np.concatenate([b["image_id"] for b in batches])
    assert 103 not in ids and 104 not in ids and (ids == 105).sum() == 3  # refilled
    assert 110 not in ids and (ids == 111).sum() == 2 and len(ids) == 200


def test_max_boxes_from_dataset_or_config(tmp_path):
    recs = _records(tmp_path, n=8)
    most = max(r.num_boxes for r in recs)
    assert resolve_max_boxes(recs, None) == most
    assert resolve_max_boxes(recs, most + 5) == most + 5
    with pytest.raises(DataError, match=r"data.train.max_boxes = 1 .*img3.png has 3 boxes"):
        build_loader(_node(max_boxes=1), recs, batch_size=2, seed=0, train=True)


def test_fewer_images_than_a_batch_is_a_clear_error(tmp_path):
    recs = _records(tmp_path, n=3)
    with pytest.raises(DataError, match="fewer than one batch"):
        len(build_loader(_node(), recs, batch_size=4, seed=0, train=True))
