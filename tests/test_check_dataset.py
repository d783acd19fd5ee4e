"""Dataset check (``nanodet_jax.data.check``) and ``scripts/check_dataset.py``.

Small COCO / VOC / YOLO datasets are written into ``tmp_path``. Every bad input must give a
problem of the right severity whose text names the file and the problem; the script must exit
0 on a clean dataset (printing the tables) and 1 when there are errors. Coverage: a box too
small (or with edges exactly on prior centres) has no prior centre strictly inside and is
listed; a larger one has one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import ml_collections
import numpy as np

from nanodet_jax.config import nanodet_plus_recipe, validate
from nanodet_jax.data import check as C
from nanodet_jax.data import readers as R
from nanodet_jax.data.record import ImageRecord
from tests.fixtures import REPO_ROOT
from tests.test_readers import write_image

SCRIPT = REPO_ROOT / "scripts" / "check_dataset.py"
NAMES = ["cat", "dog"]


def make_coco(root: Path, images: dict[str, tuple[int, int]], anns: list[tuple],
              categories: tuple[int, ...] = (1, 2)) -> tuple[Path, Path]:
    """Write ``images`` (file -> (width, height)) and a COCO json; ``anns`` are
    ``(file, category_id, [x, y, w, h])``; category ``c`` is named ``NAMES[i]`` or ``c<c>``."""
    img_dir = root / "images"
    entries = []
    for i, (name, (w, h)) in enumerate(images.items()):
        write_image(img_dir / name, w, h)
        entries.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    ids = {e["file_name"]: e["id"] for e in entries}
    data = {"images": entries,
            "categories": [{"id": c, "name": NAMES[i] if i < len(NAMES) else f"c{c}"}
                           for i, c in enumerate(categories)],
            "annotations": [{"id": k + 1, "image_id": ids[f], "category_id": c, "bbox": b,
                             "area": b[2] * b[3], "iscrowd": 0}
                            for k, (f, c, b) in enumerate(anns)]}
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann


CLEAN_IMAGES = {"a.jpg": (64, 48), "b.jpg": (100, 80), "c.jpg": (50, 50)}
CLEAN_ANNS = [("a.jpg", 1, [10, 10, 30, 30]), ("b.jpg", 2, [20, 20, 40, 30]),
              ("b.jpg", 1, [5, 5, 60, 50])]


def recipe(img_dir: Path, ann: Path, names=NAMES, num_classes: int | None = None,
           input_size: int = 320, name: str = "CocoDataset") -> dict:
    """The 1.0x recipe on our data (``data.train``), ``num_classes = len(names)``."""
    r = nanodet_plus_recipe("1.0x", input_size)
    r["class_names"] = list(names)
    for sec in ("head", "aux_head"):
        r["model"]["arch"][sec]["num_classes"] = num_classes or len(names)
    r["data"]["train"].update(name=name, img_path=str(img_dir), ann_path=str(ann))
    return r


def write_config(path: Path, raw: dict) -> Path:
    """A ``.py`` config file whose ``get_config()`` returns ``ConfigDict(raw)``."""
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    f"    return ml_collections.ConfigDict({raw!r})\n")
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT, env=dict(os.environ))


def problem_text(report: C.Report, what: str) -> tuple[C.Problem, str]:
    """The problem whose ``what`` contains ``what`` and its text (what + examples + fix)."""
    hits = [p for p in report.problems if what in p.what]
    assert len(hits) == 1, (what, [p.what for p in report.problems])
    p = hits[0]
    return p, "\n".join([p.what, *p.examples, p.fix])


def check(root: Path, images=CLEAN_IMAGES, anns=CLEAN_ANNS, categories=(1, 2),
          max_images=None, **kw) -> C.Report:
    img_dir, ann = make_coco(root, images, anns, categories)
    return C.check_dataset(validate(recipe(img_dir, ann, **kw)), "train", max_images)


# ----------------------------------------------------------------------------------- script ---

def test_clean_dataset_exits_0_with_tables(tmp_path):
    cfg = write_config(tmp_path / "cfg.py", recipe(*make_coco(tmp_path, CLEAN_IMAGES,
                                                              CLEAN_ANNS)))
    proc = run_script("--config", str(cfg))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for text in ("Boxes per class", "Box sizes", "Assignment coverage at 320x320",
                 "3 of 3 boxes (100.0 %)", "Problems: none",
                 "data.train: 3 images, 3 boxes, coverage 100.0 %: 0 errors, 0 warnings -> OK"):
        assert text in out, text
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["label", "class"])
    assert lines[header + 1].split() == ["0", "cat", "2", "2", "100.0", "%"]
    assert lines[header + 2].split() == ["1", "dog", "1", "1", "100.0", "%"]
    # columns aligned: every row of the table ends at the same column
    assert len({len(line) for line in lines[header:header + 3]}) == 1
    assert lines[-1].startswith("data.train:")


def test_deleted_image_and_negative_box_exit_1(tmp_path):
    anns = [*CLEAN_ANNS, ("c.jpg", 2, [30, 30, -5, 10])]
    img_dir, ann = make_coco(tmp_path, CLEAN_IMAGES, anns)
    (img_dir / "b.jpg").unlink()
    proc = run_script("--config", str(write_config(tmp_path / "cfg.py", recipe(img_dir, ann))))
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "image file not found" in out and str(img_dir / "b.jpg") in out
    assert "zero or negative width/height" in out
    assert f"{img_dir / 'c.jpg'} (annotation id 4" in out and "[30, 30, -5, 10]" in out
    assert out.splitlines()[-1].endswith("2 errors, 0 warnings -> FAILED")


def test_script_unknown_dataset_name_exits_1(tmp_path):
    raw = recipe(*make_coco(tmp_path, CLEAN_IMAGES, CLEAN_ANNS), name="VOCDataset")
    proc = run_script("--config", str(write_config(tmp_path / "cfg.py", raw)))
    assert proc.returncode == 1
    assert "data.train.name: unknown dataset 'VOCDataset'" in proc.stderr


def test_save_grid(tmp_path):
    cfg = write_config(tmp_path / "cfg.py", recipe(*make_coco(tmp_path, CLEAN_IMAGES,
                                                              CLEAN_ANNS)))
    png = tmp_path / "grid.png"
    proc = run_script("--config", str(cfg), "--save-grid", str(png))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 32 and img.shape[1] > 32
    proc = run_script("--config", str(cfg), "--save-grid", str(png))  # never overwritten
    assert proc.returncode == 1 and "exists" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- image problems

def test_unreadable_image(tmp_path):
    img_dir, ann = make_coco(tmp_path, CLEAN_IMAGES, CLEAN_ANNS)
    (img_dir / "c.jpg").write_bytes(b"not a jpeg")
    r = C.check_dataset(validate(recipe(img_dir, ann)), "train")
    p, text = problem_text(r, "image unreadable")
    assert p.severity == C.ERROR and str(img_dir / "c.jpg") in text and not r.ok


def test_image_size_differs_from_annotation(tmp_path):
    img_dir, ann = make_coco(tmp_path, CLEAN_IMAGES, CLEAN_ANNS)
    write_image(img_dir / "a.jpg", 48, 64)  # rotated
    r = C.check_dataset(validate(recipe(img_dir, ann)), "train")
    p, text = problem_text(r, "image size differs")
    assert p.severity == C.ERROR and str(img_dir / "a.jpg") in text
    assert "annotated 64x48, decoded 48x64" in text


def test_max_images_decodes_a_sample(tmp_path):
    img_dir, ann = make_coco(tmp_path, CLEAN_IMAGES, CLEAN_ANNS)
    (img_dir / "b.jpg").write_bytes(b"broken")  # the middle image: not in a 2-image sample
    r = C.check_dataset(validate(recipe(img_dir, ann)), "train", max_images=2)
    assert r.images_read == 2 and r.ok
    (img_dir / "a.jpg").unlink()  # existence is checked for every image
    r = C.check_dataset(validate(recipe(img_dir, ann)), "train", max_images=1)
    assert not r.ok and str(img_dir / "a.jpg") in problem_text(r, "image file not found")[1]


# ------------------------------------------------------------------------------- box problems

def records_report(records: list[ImageRecord], names=NAMES, num_classes: int = 2,
                   dataset: R.Dataset | None = None) -> C.Report:
    """``check_records`` on in-memory records (no file is read: ``image`` is set)."""
    ds = dataset or R.Dataset(records, names, source="mem")
    return C.check_records(ds, num_classes={"model.arch.head.num_classes": num_classes},
                           class_names=names, input_wh=(320, 320), keep_ratio=False,
                           strides=[8, 16, 32, 64])


def mem_record(image_id: int, file: str, boxes, labels, w: int = 100, h: int = 80
               ) -> ImageRecord:
    return ImageRecord(image_id, file, h, w, boxes, labels,
                       image=np.zeros((h, w, 3), np.uint8))


def test_box_zero_or_negative_size():
    r = records_report([mem_record(1, "x.jpg", [[10, 10, 10, 30], [10, 10, 50, 50]], [0, 1]),
                        mem_record(2, "y.jpg", [[40, 10, 20, 30]], [1])])
    p, text = problem_text(r, "box with zero or negative size")
    assert p.severity == C.ERROR and p.count == 2
    assert "x.jpg (100x80): box [10, 10, 10, 30]" in text
    assert "y.jpg (100x80): box [40, 10, 20, 30]" in text


def test_boxes_outside_the_image():
    r = records_report([mem_record(1, "x.jpg", [[120, 10, 150, 30], [90, 70, 110, 90],
                                                [10, 10, 50, 50]], [0, 1, 0])])
    p, text = problem_text(r, "box entirely outside")
    assert p.severity == C.ERROR and "x.jpg (100x80): box [120, 10, 150, 30]" in text
    p, text = problem_text(r, "box partly outside")
    assert p.severity == C.WARNING and "x.jpg (100x80): box [90, 70, 110, 90]" in text


def test_partly_outside_is_only_a_warning():
    r = records_report([mem_record(1, "x.jpg", [[-20, 10, 60, 50]], [0])])
    assert r.ok and [p.what for p in r.warnings] == ["box partly outside the image"]
    assert "0 errors, 1 warning -> OK" in C.format_report(r)


def test_unknown_category_id(tmp_path):
    r = check(tmp_path, anns=[*CLEAN_ANNS, ("c.jpg", 5, [1, 1, 20, 20])])
    p, text = problem_text(r, "unknown category id")
    assert p.severity == C.ERROR and p.count == 1
    assert str(tmp_path / "images" / "c.jpg") in text and "category 5" in text


def test_label_outside_num_classes(tmp_path):
    r = check(tmp_path, anns=[*CLEAN_ANNS, ("c.jpg", 9, [1, 1, 20, 20])],
              categories=(1, 2, 9), names=NAMES, num_classes=2)
    p, text = problem_text(r, "label >= num_classes")
    assert p.severity == C.ERROR and str(tmp_path / "images" / "c.jpg") in text
    assert "label 2 (c9), num_classes = 2" in text
    p, text = problem_text(r, "dataset classes != num_classes")
    assert p.severity == C.ERROR and "defines 3 classes, num_classes = 2" in text


def test_fewer_dataset_classes_than_num_classes_is_an_error(tmp_path):
    """Evaluation maps every predicted label to a dataset category: labels the dataset lacks
    would fail there, after training, so the check stops it before."""
    r = check(tmp_path, anns=CLEAN_ANNS, categories=(1, 2), names=(*NAMES, "c3"),
              num_classes=3)
    p, text = problem_text(r, "dataset classes != num_classes")
    assert p.severity == C.ERROR and "defines 2 classes, num_classes = 3" in text


def test_num_classes_differs_from_class_names(tmp_path):
    img_dir, ann = make_coco(tmp_path, CLEAN_IMAGES, CLEAN_ANNS)
    cfg = validate(recipe(img_dir, ann))
    cfg.model.arch.aux_head.num_classes = 3  # load_config refuses this; a code-built cfg may not
    r = C.check_dataset(cfg, "train")
    p, text = problem_text(r, "num_classes != len(class_names)")
    assert p.severity == C.ERROR and "model.arch.aux_head.num_classes = 3" in text


def test_class_names_order_differs_from_categories(tmp_path):
    r = check(tmp_path, names=["dog", "cat"])
    p, text = problem_text(r, "class_names differ")
    assert p.severity == C.WARNING and "label 0: 'cat' vs 'dog'" in text


def test_duplicate_image_ids_and_files():
    r = records_report([mem_record(1, "x.jpg", [[10, 10, 50, 50]], [0]),
                        mem_record(1, "y.jpg", [], []), mem_record(2, "y.jpg", [], [])])
    p, text = problem_text(r, "duplicate image id")
    assert p.severity == C.ERROR and "image_id 1 used by 2 records" in text
    p, text = problem_text(r, "duplicate image file")
    assert p.severity == C.WARNING and "file y.jpg used by 2 records" in text


def test_reader_drops_voc_unknown_class_and_yolo_out_of_range(tmp_path):
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height>"
        "</size><object><name>cat</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>40</xmax>"
        "<ymax>40</ymax></bndbox></object><object><name>horse</name><bndbox><xmin>2</xmin>"
        "<ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    write_image(tmp_path / "img" / "a.jpg", 64, 48)
    cfg = validate(recipe(tmp_path / "img", tmp_path / "voc", name="XMLDataset"))
    r = C.check_dataset(cfg, "train")
    p, text = problem_text(r, "class name not in class_names")
    assert p.severity == C.WARNING and str(tmp_path / "voc" / "a.xml") in text
    assert "horse" in text and r.ok
    (tmp_path / "yolo").mkdir()
    (tmp_path / "yolo" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n7 0.5 0.5 0.2 0.2\n")
    cfg = validate(recipe(tmp_path / "img", tmp_path / "yolo", name="YoloDataset"))
    r = C.check_dataset(cfg, "train")
    p, text = problem_text(r, "class id outside")
    assert p.severity == C.ERROR and str(tmp_path / "yolo" / "a.txt") in text and not r.ok
    assert r.dropped == {R.CLASS_OUT_OF_RANGE: 1}
    assert "Annotations dropped by the reader" in C.format_report(r)


def test_empty_dataset_and_no_boxes():
    r = records_report([])
    assert not r.ok and problem_text(r, "no images")[0].severity == C.ERROR
    r = records_report([mem_record(1, "x.jpg", [], [])])
    assert not r.ok and "mem" in problem_text(r, "no boxes in the whole split")[1]
    assert r.images_without_boxes == 1


# ---------------------------------------------------------------------------------- coverage

def test_coverage_small_box_listed(tmp_path):
    # 640x640 -> 320x320 halves every box; stride-8 prior centres sit at multiples of 8.
    images = {"big.jpg": (640, 640)}
    anns = [("big.jpg", 1, [100, 100, 4, 4]),    # -> [50, 50, 52, 52]: no centre inside
            ("big.jpg", 2, [96, 96, 16, 16]),    # -> [48, 48, 56, 56]: centres on edges only
            ("big.jpg", 1, [100, 100, 20, 20])]  # -> [50, 50, 60, 60]: (56, 56) inside
    r = check(tmp_path, images=images, anns=anns)
    cov = r.coverage
    np.testing.assert_array_equal(cov.covered, [False, False, True])
    np.testing.assert_allclose(cov.width, [2, 8, 10])
    assert r.ok  # partial coverage is a warning
    p, text = problem_text(r, "no prior centre")
    assert p.severity == C.WARNING and p.count == 2
    big = str(tmp_path / "images" / "big.jpg")
    assert f"{big}: box [100, 100, 104, 104] -> 2.0x2.0 px" in text
    assert f"{big}: box [96, 96, 112, 112] -> 8.0x8.0 px" in text
    assert "mAP 0 on my data" in text
    assert [w[2] for w in r.worst_uncovered] == [[100, 100, 104, 104], [96, 96, 112, 112]]
    out = C.format_report(r)
    assert "1 of 3 boxes (33.3 %)" in out and "Smallest boxes without a prior centre" in out
    assert "big.jpg  cat    [100, 100, 104, 104]" in out
    np.testing.assert_array_equal(r.covered_per_class, [1, 0])


def test_coverage_box_with_a_prior_centre(tmp_path):
    r = check(tmp_path, images={"big.jpg": (640, 640)}, anns=[("big.jpg", 1, [100, 100, 20,
                                                                              20])])
    assert r.coverage.covered.tolist() == [True] and r.coverage.fraction == 1.0
    assert r.worst_uncovered == [] and r.ok


def test_zero_coverage_is_an_error(tmp_path):
    r = check(tmp_path, images={"big.jpg": (640, 640)}, anns=[("big.jpg", 1, [100, 100, 4, 4])])
    p, text = problem_text(r, "no prior centre")
    assert p.severity == C.ERROR and not r.ok and "0 % coverage" in text


def test_coverage_keep_ratio_uses_the_shrunk_size():
    rec = mem_record(1, "x.jpg", [[0, 0, 40, 20]], [0], w=400, h=200)
    ds = R.Dataset([rec], NAMES, source="mem")
    cov = C.check_records(ds, num_classes={"n": 2}, class_names=NAMES, input_wh=(320, 320),
                          keep_ratio=True, strides=[8]).coverage
    # 400x200 -> 320x160 (ratio 0.8): the box becomes 32x16
    np.testing.assert_allclose([cov.width[0], cov.height[0]], [32, 16])


def test_check_dataset_accepts_configdict_without_validation(tmp_path):
    img_dir, ann = make_coco(tmp_path, CLEAN_IMAGES, CLEAN_ANNS)
    r = C.check_dataset(ml_collections.ConfigDict(recipe(img_dir, ann)), "train")
    assert r.ok and r.num_boxes == 3 and r.num_images == 3
    np.testing.assert_array_equal(r.boxes_per_class, [2, 1])
