"""Dataset check: statistics, problems (each naming the file and what to do) and assignment
coverage of one config split, for ``scripts/check_dataset.py`` and the training start-up.

:func:`check_dataset` builds the split's reader and returns a :class:`Report`;
:func:`check_records` does the work on a :class:`~nanodet_jax.data.readers.Dataset`;
:func:`format_report` renders it as text tables with a summary line. Errors make
``Report.ok`` false (the script exits 1); warnings (e.g. boxes partly outside the image) don't.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nanodet_jax.data import readers as R
from nanodet_jax.data.coverage import BoxCoverage, assignment_coverage
from nanodet_jax.data.readers.base import image_hw
from nanodet_jax.data.record import ImageRecord

ERROR, WARNING = "error", "warning"
MAX_EXAMPLES = 5
OUTSIDE_TOL = 1.0  # px a box may exceed the image before it is reported as partly outside
SMALL, MEDIUM = 32 ** 2, 96 ** 2  # COCO area thresholds

# Reader drop reason -> (severity, what to do).
DROP_ADVICE = {
    R.BAD_SIZE: (ERROR, "fix the box (x2 > x1 and y2 > y1) or delete the annotation"),
    R.ZERO_AREA: (ERROR, "fix the annotation's 'area' (must be > 0; the reference drops it)"),
    R.TINY: (WARNING, "boxes under 1 px are dropped, as in the reference"),
    R.UNKNOWN_CATEGORY: (ERROR, "add the category to 'categories' or fix 'category_id'"),
    R.UNKNOWN_CLASS: (WARNING, "add the name to class_names (and num_classes) unless these "
                      "objects are meant to be ignored"),
    R.CLASS_OUT_OF_RANGE: (ERROR, "class ids must be 0..len(class_names)-1: extend "
                           "class_names/num_classes or fix the ids"),
    R.UNKNOWN_IMAGE: (WARNING, "add the image to 'images' or delete the annotation"),
    R.MALFORMED: (ERROR, "fix the annotation's syntax"),
    R.NO_IMAGE: (ERROR, "put the image under img_path with the annotation's stem/file name, or "
                 "delete the annotation file"),
}


@dataclass(frozen=True)
class Problem:
    """One kind of problem: ``count`` occurrences, up to :data:`MAX_EXAMPLES` ``examples``
    (each naming the file / record), and ``fix`` (what to do)."""

    severity: str
    what: str
    count: int
    examples: tuple[str, ...]
    fix: str


@dataclass
class _Problems:
    """Accumulates occurrences per ``(severity, what, fix)``, in first-seen order."""

    items: dict[tuple[str, str, str], list] = field(default_factory=dict)

    def add(self, severity: str, what: str, example: str, fix: str, count: int = 1) -> None:
        entry = self.items.setdefault((severity, what, fix), [0, []])
        entry[0] += count
        if len(entry[1]) < MAX_EXAMPLES:
            entry[1].append(example)

    def add_many(self, severity: str, what: str, examples: Sequence[str], count: int,
                 fix: str) -> None:
        entry = self.items.setdefault((severity, what, fix), [0, []])
        entry[0] += count
        entry[1].extend(examples[:MAX_EXAMPLES - len(entry[1])])

    def problems(self) -> list[Problem]:
        return [Problem(s, w, n, tuple(ex), f) for (s, w, f), (n, ex) in self.items.items()]


@dataclass(frozen=True)
class Report:
    """Result of a dataset check (see :func:`format_report` for the rendering).

    ``boxes_per_class`` / ``images_per_class`` / ``covered_per_class`` are ``(K,)`` over
    labels ``0..K-1`` (``K >= len(class_names)`` when labels exceed the names); ``widths`` /
    ``heights`` ``(M,)`` original box sizes; ``coverage`` the per-box assignment coverage.
    """

    where: str
    reader: str
    source: str
    num_images: int
    images_read: int
    num_ignore: int
    images_without_boxes: int
    max_boxes: int
    class_names: list[str]
    boxes_per_class: np.ndarray
    images_per_class: np.ndarray
    covered_per_class: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    input_wh: tuple[int, int]
    keep_ratio: bool
    strides: tuple[int, ...]
    coverage: BoxCoverage
    worst_uncovered: list[tuple[str, str, list[float], float, float]]
    dropped: dict[str, int]
    problems: list[Problem]

    @property
    def num_boxes(self) -> int:
        return int(len(self.widths))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors


def _box_str(b: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in b) + "]"


def config_problems(num_classes: Mapping[str, int], class_names: Sequence[str],
                    dataset_names: Sequence[str], reader: str) -> list[Problem]:
    """``num_classes`` (field -> value) vs ``len(class_names)`` and the dataset's classes."""
    p, n = _Problems(), len(class_names)
    for fld, value in num_classes.items():
        if value != n:
            p.add(ERROR, "num_classes != len(class_names)", f"{fld} = {value}, class_names "
                  f"has {n} entries", "make them equal (one output per class name)")
    m, d = min(num_classes.values(), default=n), len(dataset_names)
    if d != m:  # fewer: evaluation could not map labels >= d to a dataset category
        p.add(ERROR, "dataset classes != num_classes",
              f"{reader} defines {d} classes, num_classes = {m}",
              "set num_classes and class_names to the dataset's classes (a COCO file "
              "must list all of them in 'categories', used or not)")
    norm = [str(c).lower().replace(" ", "_") for c in dataset_names]
    if d == n and norm != [str(c).lower().replace(" ", "_") for c in class_names]:
        pairs = [f"label {i}: {a!r} vs {b!r}" for i, (a, b) in
                 enumerate(zip(dataset_names, class_names)) if a != b]
        p.add(WARNING, "class_names differ from the dataset's category names",
              "; ".join(pairs[:3]), "list class_names in the order of the sorted category ids")
    return p.problems()


def _sample(n: int, max_images: int | None) -> np.ndarray:
    if max_images is None or max_images >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(max_images, 0)).round().astype(int))


def image_problems(records: Sequence[ImageRecord], where: str, max_images: int | None = None,
                   read: Callable[[str], tuple[int, int] | None] = image_hw
                   ) -> tuple[list[Problem], int]:
    """Missing files (all records), unreadable images and size mismatches (``max_images``
    evenly spaced records decoded with ``read``); returns the problems and the number read."""
    p = _Problems()
    on_disk = [r for r in records if r.image is None]
    missing = {r.file for r in on_disk if not os.path.isfile(r.file)}
    for f in sorted(missing):
        p.add(ERROR, "image file not found", f, f"check {where}.img_path and the file names "
              "in the annotations")
    todo = [records[i] for i in _sample(len(records), max_images)
            if records[i].file not in missing]
    files = [r.file for r in todo if r.image is None]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = dict(zip(files, pool.map(read, files)))
    for r in todo:
        hw = r.image.shape[:2] if r.image is not None else decoded[r.file]
        if hw is None:
            p.add(ERROR, "image unreadable", r.file, "re-encode or delete the file (OpenCV "
                  "cannot decode it)")
        elif tuple(hw) != (r.height, r.width):
            p.add(ERROR, "image size differs from the annotation", f"{r.file}: annotated "
                  f"{r.width}x{r.height}, decoded {hw[1]}x{hw[0]}", "fix width/height in the "
                  "annotation (EXIF-rotated photos are a common cause)")
    return p.problems(), len(todo)


def _flat_boxes(records: Sequence[ImageRecord]) -> tuple[np.ndarray, ...]:
    """All boxes ``(M, 4)``, labels ``(M,)``, record index ``(M,)`` and the record's image
    ``(M, 2)`` (width, height) per box."""
    n = [r.num_boxes for r in records]
    if not sum(n):
        return np.zeros((0, 4)), np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2))
    wh = np.repeat([[r.width, r.height] for r in records], n, axis=0)
    return (np.concatenate([r.boxes for r in records]),
            np.concatenate([r.labels for r in records]), np.repeat(np.arange(len(records)), n),
            wh)


def box_problems(records: Sequence[ImageRecord], num_classes: int,
                 class_names: Sequence[str]) -> list[Problem]:
    """Boxes of zero/negative size, (partly) outside the image, labels ``>= num_classes``."""
    b, labels, rec, wh = _flat_boxes(records)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    bad = ~((w > 0) & (h > 0))
    out = (b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] >= wh[:, 0]) | (b[:, 1] >= wh[:, 1])
    part = ((b[:, :2] < -OUTSIDE_TOL).any(1) | (b[:, 2:] > wh + OUTSIDE_TOL).any(1))
    p = _Problems()

    def add(mask: np.ndarray, severity: str, what: str, fix: str,
            describe: Callable[[int], str]) -> None:
        idx = np.flatnonzero(mask)
        if len(idx):
            p.add_many(severity, what, [describe(k) for k in idx[:MAX_EXAMPLES]], len(idx), fix)

    def box(k: int) -> str:
        r = records[rec[k]]
        return f"{r.file} ({r.width}x{r.height}): box {_box_str(b[k])}"

    def label(k: int) -> str:
        lab = int(labels[k])
        name = f" ({class_names[lab]})" if 0 <= lab < len(class_names) else ""
        return f"{records[rec[k]].file}: label {lab}{name}, num_classes = {num_classes}"

    add(bad, ERROR, "box with zero or negative size",
        "fix the box (x2 > x1 and y2 > y1) or delete it", box)
    add(out & ~bad, ERROR, "box entirely outside the image",
        "fix the coordinates (wrong image size or normalisation?)", box)
    add(part & ~out & ~bad, WARNING, "box partly outside the image",
        "it is clipped to the image in training; check the coordinates", box)
    add((labels >= num_classes) | (labels < 0), ERROR, "label >= num_classes",
        "raise num_classes / extend class_names, or remove the category", label)
    return p.problems()


def duplicate_problems(records: Sequence[ImageRecord]) -> list[Problem]:
    """Image ids (error: COCO evaluation matches by id) or files used by several records."""
    p = _Problems()
    for key, severity, what, fix in (
            ("image_id", ERROR, "duplicate image id", "give every image a unique id"),
            ("file", WARNING, "duplicate image file", "merge the entries (the image is "
             "sampled twice, its boxes split over records)")):
        seen: dict[Any, int] = {}
        for r in records:
            seen[getattr(r, key)] = seen.get(getattr(r, key), 0) + 1
        for value, n in seen.items():
            if n > 1:
                p.add(severity, what, f"{key} {value} used by {n} records", fix)
    return p.problems()


def drop_problems(dataset: R.Dataset) -> list[Problem]:
    """The reader's dropped annotations, one problem per reason."""
    out = []
    for reason, n in dataset.dropped.items():
        severity, fix = DROP_ADVICE.get(reason, (ERROR, "fix the annotation"))
        ex = tuple(w for w, r in dataset.drop_examples if r == reason)[:MAX_EXAMPLES]
        out.append(Problem(severity, f"dropped by the reader: {reason}", n, ex, fix))
    return out


def coverage_problems(cov: BoxCoverage, records: Sequence[ImageRecord], where: str
                      ) -> list[Problem]:
    """Boxes without a prior centre (warning; an error when no box has one)."""
    n_out = int((~cov.covered).sum())
    if not n_out:
        return []
    severity = ERROR if n_out == len(cov.covered) else WARNING
    ex = tuple(f"{records[cov.record[i]].file}: box "
               f"{_box_str(records[cov.record[i]].boxes[cov.index[i]])} -> "
               f"{cov.width[i]:.1f}x{cov.height[i]:.1f} px at the input size"
               for i in cov.worst(MAX_EXAMPLES))
    fix = (f"these boxes never get a positive sample: use a larger {where}.input_size, "
           "keep_ratio, or drop such tiny boxes; 0 % coverage is the usual cause of "
           "'mAP 0 on my data'")
    return [Problem(severity, "box contains no prior centre after the resize", n_out, ex,
                    fix)]


def class_counts(records: Sequence[ImageRecord], cov: BoxCoverage, k: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k,)`` int arrays over labels ``0..k-1``: boxes, images containing the label, boxes
    with a prior centre (``cov`` from :func:`assignment_coverage` of ``records``)."""
    ok = cov.label >= 0
    boxes = np.bincount(cov.label[ok], minlength=k)
    covered = np.bincount(cov.label[ok], weights=cov.covered[ok], minlength=k).astype(int)
    images = np.zeros(k, int)
    for r in records:
        images[np.unique(r.labels[r.labels >= 0])] += 1
    return boxes, images, covered


def check_records(dataset: R.Dataset, *, num_classes: Mapping[str, int],
                  class_names: Sequence[str], input_wh: Sequence[int], keep_ratio: bool,
                  strides: Sequence[int], max_images: int | None = None,
                  where: str = "data.train") -> Report:
    """Check a built dataset. ``num_classes`` maps config fields (e.g.
    ``model.arch.head.num_classes``) to values; ``input_wh`` is ``[width, height]``."""
    recs = dataset.records
    n_cls = min(num_classes.values(), default=len(class_names))
    img_probs, n_read = image_problems(recs, where, max_images)
    problems = [*config_problems(num_classes, class_names, dataset.class_names,
                                 f"{type(dataset).__name__} {dataset.source}"),
                *img_probs, *box_problems(recs, n_cls, dataset.class_names),
                *duplicate_problems(recs), *drop_problems(dataset)]
    if not recs:
        problems.append(Problem(ERROR, "no images", 0, (dataset.source,),
                                f"check {where}.img_path / ann_path"))
    elif not dataset.num_boxes:
        problems.append(Problem(ERROR, "no boxes in the whole split", 0, (dataset.source,),
                                "check the annotations and class names"))
    in_wh = (int(input_wh[0]), int(input_wh[1]))
    cov = assignment_coverage(recs, in_wh, keep_ratio, strides)
    problems += coverage_problems(cov, recs, where)
    k = max(len(class_names), len(dataset.class_names), int(cov.label.max(initial=-1)) + 1)
    boxes_per_class, images_per_class, covered_per_class = class_counts(recs, cov, k)
    worst = [(recs[cov.record[i]].file, _name(dataset.class_names, int(cov.label[i])),
              recs[cov.record[i]].boxes[cov.index[i]].tolist(), float(cov.width[i]),
              float(cov.height[i])) for i in cov.worst(10)]
    all_boxes = np.concatenate([r.boxes for r in recs]) if recs else np.zeros((0, 4))
    return Report(
        where=where, reader=type(dataset).__name__, source=dataset.source,
        num_images=len(recs), images_read=n_read,
        num_ignore=sum(len(r.ignore_boxes) for r in recs),
        images_without_boxes=sum(r.num_boxes == 0 for r in recs), max_boxes=dataset.max_boxes,
        class_names=list(dataset.class_names),
        boxes_per_class=boxes_per_class, images_per_class=images_per_class,
        covered_per_class=covered_per_class,
        widths=all_boxes[:, 2] - all_boxes[:, 0], heights=all_boxes[:, 3] - all_boxes[:, 1],
        input_wh=in_wh, keep_ratio=bool(keep_ratio), strides=tuple(int(s) for s in strides),
        coverage=cov, worst_uncovered=worst, dropped=dataset.dropped, problems=problems)


def _name(names: Sequence[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else f"label {label}"


def check_dataset(cfg: Any, split: str = "train", max_images: int | None = None) -> Report:
    """Build ``cfg.data[split]``'s reader and check it against the model config (``cfg`` a
    loaded config, see :func:`nanodet_jax.config.load_config`)."""
    node, arch = cfg.data[split], cfg.model.arch
    where = f"data.{split}"
    dataset = R.build_dataset(node, list(cfg.class_names), where)
    num_classes = {f"model.arch.{sec}.num_classes": int(arch[sec].num_classes)
                   for sec in ("head", "aux_head") if sec in arch}
    return check_records(dataset, num_classes=num_classes, class_names=list(cfg.class_names),
                         input_wh=list(node.input_size), keep_ratio=bool(node.get("keep_ratio")),
                         strides=list(arch.head.strides), max_images=max_images, where=where)


# ------------------------------------------------------------------------------ formatting ---

def _table(rows: Sequence[Sequence[Any]], right: Sequence[int] = (), indent: str = "  "
           ) -> list[str]:
    """Align ``rows`` (the first one is the header) in columns; ``right`` are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return [indent + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in cells]


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


def _stats_row(name: str, v: np.ndarray) -> list[str]:
    if not len(v):
        return [name, "-", "-", "-"]
    return [name, f"{v.min():.1f}", f"{np.median(v):.1f}", f"{v.max():.1f}"]


def _class_section(r: Report) -> list[str]:
    rows = [["label", "class", "boxes", "images", "coverage"]]
    for k in range(len(r.boxes_per_class)):
        n = int(r.boxes_per_class[k])
        rows.append([k, _name(r.class_names, k), n, int(r.images_per_class[k]),
                     _pct(r.covered_per_class[k], n)])
    return ["Boxes per class", *_table(rows, right=(0, 2, 3, 4))]


def _size_section(r: Report) -> list[str]:
    area = r.widths * r.heights
    small, medium = int((area < SMALL).sum()), int(((area >= SMALL) & (area < MEDIUM)).sum())
    large = r.num_boxes - small - medium
    buckets = [["", "small (< 32^2)", "medium", "large (>= 96^2)"],
               ["boxes", small, medium, large],
               ["share", _pct(small, r.num_boxes), _pct(medium, r.num_boxes),
                _pct(large, r.num_boxes)]]
    side = np.minimum(r.coverage.width, r.coverage.height)
    stats = [["side (px)", "min", "median", "max"], _stats_row("width", r.widths),
             _stats_row("height", r.heights),
             _stats_row(f"shorter side at {r.input_wh[0]}x{r.input_wh[1]}", side)]
    return ["Box sizes (original pixels, COCO area thresholds)",
            *_table(buckets, right=(1, 2, 3)), "", *_table(stats, right=(1, 2, 3))]


def _coverage_section(r: Report) -> list[str]:
    cov, n = r.coverage, r.num_boxes
    covered = int(cov.covered.sum())
    lines = [f"Assignment coverage at {r.input_wh[0]}x{r.input_wh[1]} (keep_ratio "
             f"{r.keep_ratio}, strides {', '.join(map(str, r.strides))})",
             f"  {covered} of {n} boxes ({_pct(covered, n)}) contain a prior centre strictly "
             "inside after the resize:",
             "  only those can ever be positive samples.",
             "  0 % coverage is the usual cause of 'mAP 0 on my data'."]
    if r.worst_uncovered:
        rows = [["file", "class", "box (original px)", "at input size"]]
        rows += [[os.path.basename(f), c, _box_str(b), f"{w:.1f}x{h:.1f}"]
                 for f, c, b, w, h in r.worst_uncovered]
        lines += ["  Smallest boxes without a prior centre:", *_table(rows, indent="    ")]
    return lines


def _problem_lines(p: Problem) -> list[str]:
    pad = " " * 13
    more = [f"{pad}... (+{p.count - len(p.examples)} more)"] if p.count > len(p.examples) else []
    return [f"  {p.severity.upper():<7}  {p.what}" + (f" ({p.count})" if p.count > 1 else ""),
            *(pad + e for e in p.examples), *more,
            *textwrap.wrap(f"-> {p.fix}", 99, initial_indent=pad, subsequent_indent=pad + "   ")]


def format_report(r: Report) -> str:
    """The report as aligned text tables, problems (errors first) and a summary line."""
    n_ign = f" (+ {r.num_ignore} crowd/ignore)" if r.num_ignore else ""
    overview = [["images", r.num_images], ["images decoded", f"{r.images_read} of {r.num_images}"],
                ["boxes", f"{r.num_boxes}{n_ign}"],
                ["images without boxes", r.images_without_boxes],
                ["max boxes per image", r.max_boxes]]
    lines = [f"Dataset check: {r.where} ({r.reader}: {r.source})",
             *_table(overview, indent="  "), "", *_class_section(r), "", *_size_section(r), "",
             *_coverage_section(r)]
    if r.dropped:
        rows = [["reason", "count"], *([k, v] for k, v in r.dropped.items())]
        lines += ["", "Annotations dropped by the reader", *_table(rows, right=(1,))]
    probs = sorted(r.problems, key=lambda p: p.severity != ERROR)
    lines += ["", "Problems" if probs else "Problems: none"]
    for p in probs:
        lines += _problem_lines(p)
    n_err, n_warn = len(r.errors), len(r.warnings)
    lines += ["", f"{r.where}: {r.num_images} images, {r.num_boxes} boxes, coverage "
              f"{_pct(int(r.coverage.covered.sum()), r.num_boxes)}: {n_err} error"
              f"{'s' * (n_err != 1)}, {n_warn} warning{'s' * (n_warn != 1)} -> "
              f"{'OK' if r.ok else 'FAILED'}"]
    return "\n".join(lines)
