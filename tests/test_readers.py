"""Dataset readers on tiny datasets written into ``tmp_path``: COCO json, Pascal VOC xml, YOLO
txt and the TFDS ``coco/2017`` example conversion (hand-built numpy dicts, no TensorFlow).

Every record is checked field by field; every dropped annotation must be counted under its
reason with an example naming the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import ml_collections
import numpy as np
import pytest

from nanodet_jax.config import ConfigError, nanodet_plus_recipe, validate
from nanodet_jax.data import readers as R
from nanodet_jax.data.record import ImageRecord


def write_image(path: Path, width: int, height: int) -> Path:
    """A small BGR image (``height x width``) written with OpenCV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 1] = 100
    assert cv2.imwrite(str(path), img)
    return path


def assert_record(rec: ImageRecord, image_id: int, file: Path | str, hw: tuple[int, int],
                  boxes, labels, ignore=None) -> None:
    assert rec.image_id == image_id and isinstance(rec.image_id, int)
    assert rec.file == str(file)
    assert (rec.height, rec.width) == hw
    assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (len(labels), 4)
    np.testing.assert_allclose(rec.boxes, np.asarray(boxes, np.float32).reshape(-1, 4))
    assert rec.labels.dtype == np.int32
    np.testing.assert_array_equal(rec.labels, np.asarray(labels, np.int32))
    ign = np.zeros((0, 4)) if ignore is None else np.asarray(ignore)
    assert rec.ignore_boxes.dtype == np.float32 and rec.ignore_boxes.shape == ign.shape
    np.testing.assert_allclose(rec.ignore_boxes, ign)


def assert_dropped(ds: R.Dataset, expected: dict[str, int], files: dict[str, str]) -> None:
    """``dropped`` equals ``expected``; each reason's examples name ``files[reason]``."""
    assert ds.dropped == expected
    for reason, file in files.items():
        ex = [w for w, r in ds.drop_examples if r == reason]
        assert ex and all(file in w for w in ex), (reason, ex)


# ----------------------------------------------------------------------------------- COCO ---

def coco_dict() -> dict:
    """3 images (ids 9, 5, 2; id 2 without annotations), categories 11/3/7 (unsorted,
    non-contiguous), a crowd box, an ``ignore`` box and one annotation per drop reason."""
    return {
        "images": [{"id": 9, "file_name": "c.jpg", "height": 30, "width": 40},
                   {"id": 5, "file_name": "a.jpg", "height": 48, "width": 64},
                   {"id": 2, "file_name": "sub/b.jpg", "height": 20, "width": 20}],
        "categories": [{"id": 11, "name": "dog"}, {"id": 3, "name": "cat"},
                       {"id": 7, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 2, 10, 20], "area": 200},
            {"id": 2, "image_id": 5, "category_id": 11, "bbox": [5.5, 6, 20, 10], "area": 200},
            {"id": 3, "image_id": 5, "category_id": 7, "bbox": [0, 0, 30, 30], "area": 900,
             "iscrowd": 1},
            {"id": 4, "image_id": 9, "category_id": 99, "bbox": [1, 1, 5, 5], "area": 25},
            {"id": 5, "image_id": 9, "category_id": 3, "bbox": [3, 3, 0, 5], "area": 0},
            {"id": 6, "image_id": 9, "category_id": 3, "bbox": [1, 1, 0.5, 4], "area": 2},
            {"id": 7, "image_id": 9, "category_id": 7, "bbox": [2, 2, 8, 8], "area": 64},
            {"id": 8, "image_id": 42, "category_id": 7, "bbox": [2, 2, 8, 8], "area": 64},
            {"id": 9, "image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 0},
            {"id": 10, "image_id": 9, "category_id": 11, "bbox": [4, 4, 6, 6], "area": 36,
             "ignore": 1},
            {"id": 11, "image_id": 9, "category_id": 11, "bbox": [4, 4, 6], "area": 36},
        ],
    }


def test_coco(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco_dict()))
    img_dir = tmp_path / "images"
    ds = R.CocoDataset(str(img_dir), str(ann))
    assert ds.class_names == ["cat", "bird", "dog"] and ds.category_ids == [3, 7, 11]
    assert [r.image_id for r in ds] == [2, 5, 9]  # sorted by id, image 2 kept without boxes
    assert_record(ds[0], 2, img_dir / "sub" / "b.jpg", (20, 20), [], [])
    assert_record(ds[1], 5, img_dir / "a.jpg", (48, 64), [[1, 2, 11, 22], [5.5, 6, 25.5, 16]],
                  [0, 2], ignore=[[0, 0, 30, 30]])
    assert_record(ds[2], 9, img_dir / "c.jpg", (30, 40), [[2, 2, 10, 10]], [1],
                  ignore=[[4, 4, 10, 10]])
    assert all(r.image is None for r in ds)
    assert len(ds) == 3 and ds.max_boxes == 2 and ds.num_boxes == 3
    assert_dropped(ds, {R.UNKNOWN_CATEGORY: 1, R.BAD_SIZE: 1, R.TINY: 1, R.UNKNOWN_IMAGE: 1,
                        R.ZERO_AREA: 1, R.MALFORMED: 1},
                   {R.UNKNOWN_CATEGORY: "c.jpg", R.BAD_SIZE: "c.jpg", R.TINY: "c.jpg",
                    R.UNKNOWN_IMAGE: str(ann), R.ZERO_AREA: "c.jpg"})
    assert any("annotation id 4" in w and "category 99" in w for w, _ in ds.drop_examples)


def test_coco_image_id_must_be_int(tmp_path):
    data = coco_dict()
    data["images"][0]["id"] = "9"
    with pytest.raises(ValueError, match=r"x\.json.*image id '9' of c\.jpg must be an integer"):
        R.coco_dataset_from_dict(data, str(tmp_path), "x.json")


# ------------------------------------------------------------------------------------ VOC ---

VOC_A = """<annotation><filename>a.jpg</filename>
<size><width>64</width><height>48</height><depth>3</depth></size>
<object><name>cat</name><difficult>1</difficult>
  <bndbox><xmin>1.5</xmin><ymin>2.5</ymin><xmax>30.25</xmax><ymax>40.75</ymax></bndbox></object>
<object><name>zebra</name>
  <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object>
<object><name>dog</name>
  <bndbox><xmin>20</xmin><ymin>2</ymin><xmax>10</xmax><ymax>4</ymax></bndbox></object>
<object><name>dog</name>
  <bndbox><xmin>-3</xmin><ymin>10</ymin><xmax>70</xmax><ymax>20</ymax></bndbox></object>
</annotation>"""

VOC_B = """<annotation><filename>b.jpg</filename>
<object><name>dog</name>
  <bndbox><xmin>2</xmin><ymin>3</ymin><xmax>12</xmax><ymax>13</ymax></bndbox></object>
<object><name>cat</name><bndbox><xmin>two</xmin></bndbox></object>
</annotation>"""


def test_voc(tmp_path):
    ann, img = tmp_path / "ann", tmp_path / "img"
    (ann / "sub").mkdir(parents=True)
    (ann / "a.xml").write_text(VOC_A)
    (ann / "sub" / "b.xml").write_text(VOC_B)  # no <size>: read from the image
    (ann / "broken.xml").write_text("<annotation><filename>")
    write_image(img / "b.jpg", 40, 30)
    ds = R.XMLDataset(str(img), str(ann), ["cat", "dog"])
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [1, 2]
    assert len(ds) == 2
    # sorted: a.xml (id 1), broken.xml (id 2, dropped), sub/b.xml (id 3)
    assert_record(ds[0], 1, img / "a.jpg", (48, 64), [[1.5, 2.5, 30.25, 40.75],
                                                      [-3, 10, 70, 20]], [0, 1])
    assert_record(ds[1], 3, img / "b.jpg", (30, 40), [[2, 3, 12, 13]], [1])
    assert_dropped(ds, {R.UNKNOWN_CLASS: 1, R.BAD_SIZE: 1, R.MALFORMED: 2},
                   {R.UNKNOWN_CLASS: "a.xml", R.BAD_SIZE: "a.xml"})
    files = sorted(w.split(" ")[0] for w, r in ds.drop_examples if r == R.MALFORMED)
    assert files == [str(ann / "broken.xml"), str(ann / "sub" / "b.xml")]
    assert any("zebra" in w for w, _ in ds.drop_examples)


# ----------------------------------------------------------------------------------- YOLO ---

def test_yolo(tmp_path):
    img, lab = tmp_path / "images", tmp_path / "labels"
    write_image(img / "a.jpg", 100, 50)
    write_image(lab / "b.png", 80, 60)  # found next to the txt
    lab.mkdir(exist_ok=True)
    (lab / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.123 0.456 0.111 0.222\n"
                               "5 0.5 0.5 0.1 0.1\n0 0.5 0.5\n\n0 0.5 0.5 0.001 0.2\n")
    (lab / "b.txt").write_text("")
    (lab / "c.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # no image
    (lab / "classes.txt").write_text("cat\ndog\n")
    ds = R.YoloDataset(str(img), str(lab), ["cat", "dog"])
    assert ds.class_names == ["cat", "dog"] and ds.category_ids == [1, 2]
    assert len(ds) == 2
    # x1 = round((cx - w/2) W), w = round(w W): (40, 15, 20, 20) and (7, 17, 11, 11)
    assert_record(ds[0], 1, img / "a.jpg", (50, 100), [[40, 15, 60, 35], [7, 17, 18, 28]],
                  [0, 1])
    assert_record(ds[1], 2, lab / "b.png", (60, 80), [], [])
    assert_dropped(ds, {R.CLASS_OUT_OF_RANGE: 1, R.MALFORMED: 1, R.BAD_SIZE: 1,
                        R.NO_IMAGE: 1},
                   {R.CLASS_OUT_OF_RANGE: "a.txt (line 3", R.MALFORMED: "a.txt (line 4",
                    R.BAD_SIZE: "a.txt (line 6", R.NO_IMAGE: "c.txt"})


# ----------------------------------------------------------------------------------- TFDS ---

def tfds_example() -> dict:
    """A TFDS ``coco/2017`` example as ``tfds.as_numpy`` yields it (40x60 RGB image)."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    return {"image": rgb, "image/id": np.int64(17), "image/filename": b"000017.jpg",
            "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1],
                                          [0.3, 0.3, 0.3, 0.5], [0.1, 0.1, 0.2, 0.2]],
                                         np.float32),
                        "label": np.array([2, 0, 1, 90], np.int64),
                        "is_crowd": np.array([False, True, False, False]),
                        "area": np.array([10, 2400, 0, 5], np.int64),
                        "id": np.array([1, 2, 3, 4], np.int64)}}


def test_tfds_example_to_record():
    drops = R.DropLog()
    rec = R.tfds_example_to_record(tfds_example(), 80, drops)
    assert_record(rec, 17, "000017.jpg", (40, 60), [[12, 4, 36, 20]], [2],
                  ignore=[[0, 0, 60, 40]])
    assert rec.image.dtype == np.uint8 and rec.image.shape == (40, 60, 3)
    np.testing.assert_array_equal(rec.image[0, 0], [30, 20, 10])  # RGB -> BGR
    assert drops.counts == {R.BAD_SIZE: 1, R.CLASS_OUT_OF_RANGE: 1}
    assert all("000017.jpg" in w for w, _ in drops.examples)


def test_tfds_example_without_objects():
    ex = tfds_example()
    ex["objects"] = {k: v[:0] for k, v in ex["objects"].items()}
    rec = R.tfds_example_to_record(ex, 80, R.DropLog())
    assert_record(rec, 17, "000017.jpg", (40, 60), [], [])


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r'pip install "nanodet_jax\[tfds\]"'):
        R.import_tfds()
    node = {"name": "tfds:coco/2017", "img_path": "", "ann_path": "", "split": "validation"}
    with pytest.raises(ImportError, match=r'pip install "nanodet_jax\[tfds\]"'):
        R.build_dataset(node, ["a"], "data.val")


def test_tfds_dataset_with_a_stub_module(monkeypatch):
    """``TFDSDataset`` around a stand-in ``tensorflow_datasets`` (load + as_numpy only)."""
    calls = {}
    second = {**tfds_example(), "image/id": np.int64(3), "image/filename": b"000003.jpg"}

    class Label:
        names = [f"c{i}" for i in range(80)]

    class Info:
        features = {"objects": {"label": Label()}}

    class Stub:
        @staticmethod
        def load(name, **kw):
            calls.update(name=name, **kw)
            return [tfds_example(), second], Info()

        @staticmethod
        def as_numpy(ds):
            return iter(ds)

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", Stub)
    node = {"name": "tfds:coco/2017", "img_path": "", "ann_path": "", "data_dir": "/d"}
    ds = R.build_dataset(node, None, "data.val")
    assert calls == {"name": "coco/2017", "split": "validation", "data_dir": "/d",
                     "download": False, "with_info": True}
    assert isinstance(ds, R.TFDSDataset) and [r.image_id for r in ds] == [3, 17]
    assert ds.class_names == Label.names and ds.category_ids == list(R.COCO_CATEGORY_IDS)
    assert ds.dropped == {R.BAD_SIZE: 2, R.CLASS_OUT_OF_RANGE: 2}
    assert all(r.image is not None for r in ds)


# -------------------------------------------------------------------------------- factory ---

def test_build_dataset_dispatch(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(coco_dict()))
    ds = R.build_dataset({"name": "CocoDataset", "img_path": str(tmp_path), "ann_path":
                          str(ann)}, ["x"])
    assert isinstance(ds, R.CocoDataset) and len(ds) == 3
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(VOC_A)
    node = {"name": "XMLDataset", "img_path": str(tmp_path), "ann_path": str(tmp_path / "voc"),
            "class_names": ["dog", "cat"]}  # the node's class_names win over the argument
    ds = R.build_dataset(node, ["cat"])
    assert isinstance(ds, R.XMLDataset) and ds.class_names == ["dog", "cat"]
    np.testing.assert_array_equal(ds[0].labels, [1, 0])


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.val\.name: unknown dataset 'VOC'.*CocoDataset"
                       r".*XMLDataset.*YoloDataset.*TFDSDataset"):
        R.build_dataset({"name": "VOC", "img_path": "", "ann_path": ""}, ["a"], "data.val")
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=rf"data\.train\.ann_path: {missing} does not exist"):
        R.build_dataset({"name": "CocoDataset", "img_path": "", "ann_path": str(missing)})
    with pytest.raises(ConfigError, match=r"data\.train\.class_names.*YoloDataset"):
        R.build_dataset({"name": "YoloDataset", "img_path": "", "ann_path": str(tmp_path)})


def test_config_accepts_tfds_fields():
    raw = nanodet_plus_recipe("1.0x", 320)
    raw["data"]["val"].update(name="tfds:coco/2017", split="validation", data_dir="/data")
    cfg = validate(raw)
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.data.val.split == "validation" and cfg.data.val.data_dir == "/data"
    assert cfg.data.train.split is None and cfg.data.train.data_dir is None
