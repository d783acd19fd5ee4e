"""The batch loader: shuffled by ``(seed, epoch)``, augmented per sample with keys
``(seed, epoch, index)``, fixed-shape batches, parallel workers (grain), resumable mid-epoch.

One epoch is a list of batches of dataset indices fixed up front (:func:`epoch_batches`), so
what a batch holds depends only on ``(seed, epoch, batch index)``: not on the number of
workers, not on the process count beyond its own slice, and not on where a run was resumed.
grain runs :class:`LoadBatch` on those index batches in worker processes
(``MapDataset.source(batches).map(...).to_iter_dataset().mp_prefetch(...)``).

Batch (local to this process, ``b = batch_size / process_count``):

* ``image (b, H, W, 3)`` float32, normalised BGR, zero-padded bottom/right to the fixed
  ``(H, W)`` (the input size, or its largest multi-scale size, rounded up to 32);
* ``gt_boxes (b, G, 4)`` float32 xyxy input pixels, ``gt_labels (b, G)`` int32,
  ``gt_mask (b, G)`` bool (``G`` = ``max_boxes``);
* ``warp_matrix (b, 3, 3)`` float64 (original -> input pixels), ``image_id (b,)`` int64,
  ``orig_hw (b, 2)`` int32, ``valid (b,)`` bool (evaluation pads its last batch with
  ``valid = False`` rows so every image is evaluated exactly once);
* ``skipped``: paths of unreadable images replaced in this batch (a tuple; the loader counts
  them, see :class:`SkipTracker`).

A missing or corrupt image is replaced by the next readable one in dataset order (the batch
is refilled, deterministically); more than ``max_skip_fraction`` of an epoch skipped stops
the loader with the list of files.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cv2
import grain
import numpy as np

from nanodet_jax.data.augment import normalize_stats, random_train_transform, sample_rng
from nanodet_jax.data.record import ImageRecord
from nanodet_jax.data.transforms import val_transform

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class DataError(ValueError):
    """A dataset that cannot be loaded as configured (the message names the file/field)."""


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs to turn dataset indices into a batch (picklable).

    ``input_wh`` is the config's ``[width, height]``; ``pad_hw`` the fixed padded image size;
    ``train`` selects the random training pipeline (else the validation pipeline).
    """

    input_wh: tuple[int, int]
    pad_hw: tuple[int, int]
    max_boxes: int
    train: bool
    seed: int
    keep_ratio: bool = False
    pipeline: Mapping[str, Any] | None = None
    multi_scale: tuple[float, float] | None = None


def padded_hw(input_wh: Sequence[int], multi_scale: Sequence[float] | None = None,
              divisible: int = 32) -> tuple[int, int]:
    """Fixed batch image size ``(H, W)``: the input size (times the largest multi-scale
    factor), rounded up to a multiple of ``divisible``."""
    f = max(multi_scale) if multi_scale else 1.0
    w, h = int(input_wh[0] * f), int(input_wh[1] * f)
    return -(-h // divisible) * divisible, -(-w // divisible) * divisible


def epoch_order(num_records: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """``(N,)`` dataset indices in the order epoch ``epoch`` visits them."""
    if not shuffle:
        return np.arange(num_records)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_records)


def epoch_batches(num_records: int, batch_size: int, seed: int, epoch: int, train: bool,
                  process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """``(num_batches, batch_size / process_count)`` dataset indices of this process.

    Training shuffles and drops the last partial global batch (reference); evaluation keeps
    the order and pads the last batch with ``-1`` (an empty, ``valid = False`` row). Process
    ``p`` takes columns ``[p*b, (p+1)*b)`` of every global batch.
    """
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} is not divisible by the process count "
                        f"{process_count}")
    order = epoch_order(num_records, seed, epoch, shuffle=train)
    if train:
        n = num_records // batch_size
        if n == 0:
            raise DataError(f"training set has {num_records} images, fewer than one batch of "
                            f"{batch_size}: lower the batch size (device.batchsize_per_gpu)")
        order = order[: n * batch_size]
    else:
        n = -(-num_records // batch_size)
        order = np.concatenate([order, np.full(n * batch_size - num_records, -1, np.int64)])
    b = batch_size // process_count
    return order.reshape(n, process_count, b)[:, process_index].astype(np.int64)


def read_image(rec: ImageRecord) -> np.ndarray | None:
    """``(H, W, 3)`` uint8 BGR, or ``None`` when the file is missing or cannot be decoded."""
    if rec.image is not None:
        return rec.image
    img = cv2.imread(rec.file, cv2.IMREAD_COLOR)
    return img if img is not None and img.size else None


def transform_record(rec: ImageRecord, img: np.ndarray, spec: LoaderSpec, epoch: int,
                     index: int) -> Batch:
    """One sample: augment (training, key ``(seed, epoch, index)``) or the val warp, then pad
    the image to ``spec.pad_hw`` and the GTs to ``spec.max_boxes``."""
    boxes = {"gt": rec.boxes}
    if spec.train:
        t = random_train_transform(img, sample_rng(spec.seed, epoch, index), spec.pipeline,
                                   spec.input_wh, spec.keep_ratio, spec.multi_scale, boxes)
    else:
        mean, std = normalize_stats(spec.pipeline)
        t = val_transform(img, spec.input_wh, spec.keep_ratio, mean, std, boxes)
    h, w = spec.pad_hw
    out = t.img
    if out.shape != (h, w, 3):
        out = np.zeros((h, w, 3), np.float32)
        ih, iw = min(h, t.img.shape[0]), min(w, t.img.shape[1])
        out[:ih, :iw] = t.img[:ih, :iw]
    g = spec.max_boxes
    n = rec.num_boxes
    if n > g:
        raise DataError(f"{rec.file}: {n} boxes but max_boxes is {g} (data.<split>.max_boxes)")
    gt_boxes = np.zeros((g, 4), np.float32)
    gt_boxes[:n] = t.boxes["gt"]
    labels = np.zeros((g,), np.int32)
    labels[:n] = rec.labels
    return {"image": out, "gt_boxes": gt_boxes, "gt_labels": labels,
            "gt_mask": np.arange(g) < n, "warp_matrix": t.warp_matrix.astype(np.float64),
            "image_id": np.int64(rec.image_id),
            "orig_hw": np.array([rec.height, rec.width], np.int32), "valid": np.bool_(True)}


def empty_sample(spec: LoaderSpec) -> Batch:
    """A padding row (``valid = False``) for the last evaluation batch."""
    h, w = spec.pad_hw
    g = spec.max_boxes
    return {"image": np.zeros((h, w, 3), np.float32), "gt_boxes": np.zeros((g, 4), np.float32),
            "gt_labels": np.zeros((g,), np.int32), "gt_mask": np.zeros((g,), bool),
            "warp_matrix": np.eye(3), "image_id": np.int64(-1),
            "orig_hw": np.zeros((2,), np.int32), "valid": np.bool_(False)}


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which only ``absl.app.run`` parses: accept
    the defaults when the program did not parse them (scripts, notebooks, pytest)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class LoadBatch(grain.transforms.Map):
    """grain map: ``(b,)`` dataset indices (+ epoch) -> one stacked batch (runs in workers)."""

    def __init__(self, records: Sequence[ImageRecord], spec: LoaderSpec, epoch: int):
        self.records = records
        self.spec = spec
        self.epoch = epoch

    def _readable(self, index: int, skipped: list[str]) -> tuple[int, np.ndarray]:
        """The first readable record at or after ``index`` (wrapping), noting unreadable ones."""
        n = len(self.records)
        for k in range(n):
            i = (index + k) % n
            img = read_image(self.records[i])
            if img is not None:
                return i, img
            skipped.append(self.records[i].file)
        raise DataError("no image of the dataset can be read: check data.<split>.img_path")

    def map(self, indices: np.ndarray) -> Batch:
        skipped: list[str] = []
        rows = []
        for index in indices.tolist():
            if index < 0:
                rows.append(empty_sample(self.spec))
                continue
            i, img = self._readable(index, skipped)
            rows.append(transform_record(self.records[i], img, self.spec, self.epoch, i))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        batch["skipped"] = tuple(skipped)
        return batch


@dataclasses.dataclass
class SkipTracker:
    """Counts unreadable images per epoch; more than ``max_fraction`` of an epoch stops."""

    epoch_size: int
    max_fraction: float = 0.01
    seen: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, paths: Sequence[str]) -> None:
        for p in paths:
            if p not in self.seen:
                log.warning("skipped unreadable image %s (replaced by the next one)", p)
            self.seen[p] = self.seen.get(p, 0) + 1
        if len(self.seen) > self.max_fraction * self.epoch_size:
            listed = "\n  ".join(sorted(self.seen)[:50])
            raise DataError(f"{len(self.seen)} of {self.epoch_size} images in this epoch could "
                            f"not be read (more than {self.max_fraction:.0%}); fix or remove "
                            f"them and run `python scripts/check_dataset.py`:\n  {listed}")


class Loader:
    """Iterates epochs of fixed-shape batches of one dataset split.

    ``batch_size`` is the global batch; this process loads its ``batch_size /
    process_count`` rows. ``epoch(e, start=k)`` yields batches ``k, k+1, ...`` of epoch ``e``;
    ``(epoch, next batch index)`` is the whole resumable state (:meth:`state`).
    """

    def __init__(self, records: Sequence[ImageRecord], spec: LoaderSpec, batch_size: int,
                 num_workers: int = 0, prefetch: int = 2, process_index: int = 0,
                 process_count: int = 1, max_skip_fraction: float = 0.01):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if not records:
            raise DataError("the dataset has no images")
        self.records = list(records)
        self.spec = spec
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.prefetch = int(prefetch)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.max_skip_fraction = max_skip_fraction
        self.position = {"epoch": 0, "batch": 0}

    def batches(self, epoch: int) -> np.ndarray:
        """``(num_batches, b)`` dataset indices of this process for ``epoch``."""
        return epoch_batches(len(self.records), self.batch_size, self.spec.seed, epoch,
                             self.spec.train, self.process_index, self.process_count)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.batches(0))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches ``start, start+1, ...`` of ``epoch`` (workers prefetch ahead)."""
        index_batches = self.batches(epoch)[start:]
        ds = grain.MapDataset.source(list(index_batches)).map(
            LoadBatch(self.records, self.spec, epoch))
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if self.num_workers else 2,
                                                     prefetch_buffer_size=self.prefetch))
        if self.num_workers > 0:
            _absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=self.prefetch))
        skips = SkipTracker(len(self.records), self.max_skip_fraction)
        for k, batch in enumerate(it_ds, start=start):
            skips.add(batch.pop("skipped"))
            self.position = {"epoch": epoch, "batch": k + 1}
            yield batch

    def state(self) -> dict[str, int]:
        """``{"epoch", "batch"}``: the next batch to load (save it with a checkpoint)."""
        return dict(self.position)


def resolve_max_boxes(records: Sequence[ImageRecord], override: int | None,
                      field: str = "data.train.max_boxes") -> int:
    """``G``: the largest box count of the dataset, or ``override`` when it is at least that
    (an image with more boxes than ``G`` is an error here, never a silent drop)."""
    most = max(records, key=lambda r: r.num_boxes)
    g = max(most.num_boxes, 1)
    if override is None:
        return g
    if int(override) < most.num_boxes:
        raise DataError(f"{field} = {override} but {most.file} has {most.num_boxes} boxes: "
                        f"raise {field} to at least {most.num_boxes} (or leave it unset)")
    return int(override)


def build_loader(node: Any, records: Sequence[ImageRecord], *, batch_size: int, seed: int,
                 train: bool, num_workers: int = 0, process_index: int | None = None,
                 process_count: int | None = None, field: str = "data.train") -> Loader:
    """A :class:`Loader` from a config's ``data.train`` / ``data.val`` node (``input_size``,
    ``keep_ratio``, ``pipeline``, ``multi_scale``, ``max_boxes``).

    ``batch_size`` is global; by default this JAX process (``jax.process_index()`` of
    ``jax.process_count()``) loads only its own slice of every batch.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    multi = node.get("multi_scale")
    multi = (float(multi[0]), float(multi[1])) if multi and train else None
    input_wh = (int(node["input_size"][0]), int(node["input_size"][1]))
    pipeline = node.get("pipeline")
    pipeline = pipeline.to_dict() if hasattr(pipeline, "to_dict") else dict(pipeline or {})
    spec = LoaderSpec(input_wh=input_wh, pad_hw=padded_hw(input_wh, multi),
                      max_boxes=resolve_max_boxes(records, node.get("max_boxes"),
                                                  f"{field}.max_boxes"),
                      train=train, seed=int(seed), keep_ratio=bool(node.get("keep_ratio")),
                      pipeline=pipeline, multi_scale=multi)
    return Loader(records, spec, batch_size, num_workers, process_index=process_index,
                  process_count=process_count)
