"""Synthetic shapes detection dataset in COCO format (the embedded default dataset).

Each image is a varied background (gradient, low-frequency colour noise, soft blobs, grain)
with 1-8 filled shapes of :data:`CLASS_NAMES`, 12 px to half the image in size, of random
aspect ratio, rotation, position and colour. The colour is drawn independently of the class
(only contrast with the local background is enforced), so shape is the only cue.

Shapes are painted in order and may overlap; annotations are the *visible* extent: every
shape is rendered into its own mask, later shapes' masks are subtracted, the box is the
pixel extent of what is left (``[x0, y0, x1 + 1, y1 + 1]`` in pixel-edge coordinates), and
a shape with fewer than :data:`MIN_VISIBLE_PX` visible pixels is not annotated. Placement
rejects a new shape that would hide more than half of an earlier one, so dropped shapes are
rare.

Everything is a pure function of ``(seed, split, index)``: image ``i`` of a split is the
same whatever the split size or the number of worker processes, and two runs with the same
seed write byte-identical JPEG (fixed quality) and JSON files.

Layout written by :func:`write_synthetic_dataset`::

    root/train/000000.jpg ...    root/annotations/train.json
    root/val/000000.jpg ...      root/annotations/val.json
    root/synthetic.json          (marker: generator version + SyntheticSpec; written last)

:func:`ensure_synthetic_dataset` generates into a cache directory on first use, atomically
(temporary directory, then ``rename``); configs only hold the paths
(:func:`synthetic_dataset_dir`), so loading a config stays cheap, and the training script
calls :func:`ensure_synthetic_for_path` on ``data.train.ann_path`` before reading it.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES = ("circle", "rectangle", "triangle", "star", "ring")
GENERATOR_VERSION = 1
MARKER = "synthetic.json"
SPLITS = ("train", "val")
MIN_VISIBLE_PX = 16  # fewer visible pixels -> not annotated
MIN_VISIBLE_FRACTION = 0.5  # placement keeps at least this much of every earlier shape
MIN_EXTENT_PX = 12.0  # smallest shape size (longest side of its unrotated extent)
MAX_SHAPES = 8
IMAGE_EXT = ".jpg"
JPEG_QUALITY = 95  # fixed: same bytes for the same seed (PNG of noisy images is ~4x larger)
_SHIFT = 4  # OpenCV fixed-point drawing: 1/16 pixel
_SPLIT_CODE = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate: ``num_train``/``num_val`` images of ``size x size`` from ``seed``."""

    seed: int = 0
    num_train: int = 1000
    num_val: int = 100
    size: int = 320

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"SyntheticSpec.{k} must be a non-negative int, got {v!r}")
        if self.size < 64:
            raise ValueError(f"SyntheticSpec.size must be >= 64 pixels, got {self.size}")

    @property
    def dirname(self) -> str:
        """Canonical cache directory name ``synthetic_<seed>_<train>_<val>_<size>``."""
        return f"synthetic_{self.seed}_{self.num_train}_{self.num_val}_{self.size}"

    @classmethod
    def from_dirname(cls, name: str) -> SyntheticSpec | None:
        """Inverse of :attr:`dirname`; ``None`` for any other name."""
        m = re.fullmatch(r"synthetic_(\d+)_(\d+)_(\d+)_(\d+)", name)
        return cls(*(int(g) for g in m.groups())) if m else None

    def count(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val}[split]

    def marker(self) -> dict:
        """Content of the marker file identifying a complete dataset."""
        return {"generator": "nanodet_jax.data.synthetic", "version": GENERATOR_VERSION,
                **asdict(self), "class_names": list(CLASS_NAMES)}


@dataclass(frozen=True)
class Shape:
    """One shape to paint.

    ``label`` indexes :data:`CLASS_NAMES`; ``center`` ``(x, y)`` and ``radii`` ``(rx, ry)``
    (half extents before rotation) in pixels; ``angle`` degrees; ``color`` BGR 0..255;
    ``inner`` the inner-radius fraction of a ring's hole / a star's notches; ``shade``
    ``(gx, gy)`` linear shading in intensity units per pixel from the centre.
    """

    label: int
    center: tuple[float, float]
    radii: tuple[float, float]
    angle: float = 0.0
    color: tuple[int, int, int] = (255, 255, 255)
    inner: float = 0.5
    shade: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Scene:
    """A rendered image and its visible-extent annotations.

    ``image (H, W, 3)`` uint8 BGR; ``boxes (N, 4)`` float32 xyxy pixel-edge coordinates;
    ``labels (N,)`` int32; ``areas (N,)`` int64 visible pixel counts; ``shapes`` the
    annotated :class:`Shape` s (same order).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    shapes: tuple[Shape, ...]


# ---------------------------------------------------------------------------------- geometry

def _rotate(points: np.ndarray, shape: Shape) -> np.ndarray:
    """Unit-shape ``points (K, 2)`` scaled by ``radii``, rotated by ``angle``, moved to
    ``center``."""
    a = math.radians(shape.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (points * shape.radii) @ rot.T + shape.center


def shape_polygon(shape: Shape) -> np.ndarray:
    """Outline ``(K, 2)`` float64 of a rectangle, triangle or star (pixel coordinates)."""
    name = CLASS_NAMES[shape.label]
    if name == "rectangle":
        unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    elif name == "triangle":
        t = np.radians([-90.0, 30.0, 150.0])
        unit = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "star":
        t = np.radians(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, shape.inner)
        unit = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    else:
        raise ValueError(f"shape_polygon: {name!r} is not a polygon class")
    return _rotate(unit, shape)


def _fixed(v) -> np.ndarray:
    return np.round(np.asarray(v, np.float64) * (1 << _SHIFT)).astype(np.int32)


def shape_mask(shape: Shape, wh: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` bool mask of ``shape`` in a ``wh = (W, H)`` image (clipped at the border)."""
    w, h = wh
    mask = np.zeros((h, w), np.uint8)
    name = CLASS_NAMES[shape.label]
    if name in ("circle", "ring"):
        c, axes = tuple(_fixed(shape.center).tolist()), tuple(_fixed(shape.radii).tolist())
        cv2.ellipse(mask, c, axes, shape.angle, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)
        if name == "ring":
            hole = tuple(_fixed(np.multiply(shape.radii, shape.inner)).tolist())
            cv2.ellipse(mask, c, hole, shape.angle, 0, 360, 0, -1, cv2.LINE_8, _SHIFT)
    else:
        cv2.fillPoly(mask, [_fixed(shape_polygon(shape))], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


def visible_masks(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per-shape ``(H, W)`` bool visible part: each mask minus the union of later masks."""
    out: list[np.ndarray] = [np.zeros(0, bool)] * len(masks)
    covered = np.zeros_like(masks[0]) if masks else None
    for i in range(len(masks) - 1, -1, -1):
        out[i] = masks[i] & ~covered
        covered = covered | masks[i]
    return out


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Pixel extent ``[x0, y0, x1 + 1, y1 + 1]`` float32 of a non-empty ``(H, W)`` mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("mask_box: empty mask")
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


# --------------------------------------------------------------------------------- rendering

def paint(image: np.ndarray, mask: np.ndarray, shape: Shape) -> None:
    """Fill ``mask`` of ``image (H, W, 3)`` uint8 in place with the shape's shaded colour."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0:
        return
    ramp = (np.float32(shape.shade[0]) * (np.arange(x, x + w, dtype=np.float32)
                                          - np.float32(shape.center[0]))[None, :]
            + np.float32(shape.shade[1]) * (np.arange(y, y + h, dtype=np.float32)
                                            - np.float32(shape.center[1]))[:, None])
    val = np.asarray(shape.color, np.float32) + ramp[..., None]
    roi = image[y:y + h, x:x + w]
    m = mask[y:y + h, x:x + w]
    roi[m] = np.clip(np.rint(val[m]), 0, 255).astype(np.uint8)


def render_scene(background: np.ndarray, shapes: Sequence[Shape],
                 min_visible_px: int = MIN_VISIBLE_PX) -> Scene:
    """Paint ``shapes`` in order over ``background (H, W, 3)`` uint8 and annotate the visible
    extent of each (shapes with fewer than ``min_visible_px`` visible pixels are dropped from
    the annotations)."""
    image = np.array(background, np.uint8, copy=True)
    wh = (image.shape[1], image.shape[0])
    masks = [shape_mask(s, wh) for s in shapes]
    for s, m in zip(shapes, masks):
        paint(image, m, s)
    keep = [(s, v) for s, v in zip(shapes, visible_masks(masks))
            if int(v.sum()) >= min_visible_px]
    boxes = np.array([mask_box(v) for _, v in keep], np.float32).reshape(-1, 4)
    return Scene(image=image, boxes=boxes,
                 labels=np.array([s.label for s, _ in keep], np.int32),
                 areas=np.array([int(v.sum()) for _, v in keep], np.int64),
                 shapes=tuple(s for s, _ in keep))


# ---------------------------------------------------------------------------- random content

def _random_color(rng: np.random.Generator) -> np.ndarray:
    """BGR float64 of a random HSV colour (any hue, moderate-to-full saturation/value)."""
    hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(50, 256)]]],
                   np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)


def random_background(rng: np.random.Generator, wh: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` uint8 background: a two-colour linear gradient plus low-frequency colour
    noise, soft blurred blobs/strokes (sometimes) and grain (sometimes)."""
    w, h = wh
    a = rng.uniform(0, 2 * math.pi)
    t = (np.arange(w, dtype=np.float32)[None, :] * np.float32(math.cos(a))
         + np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(a)))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    img = c0 + (c1 - c0) * t[..., None]
    k = int(rng.integers(2, 7))
    low = cv2.resize(rng.uniform(-1, 1, (k, k, 3)).astype(np.float32), (w, h),
                     interpolation=cv2.INTER_CUBIC)
    img += np.float32(rng.uniform(0, 70)) * low
    if rng.random() < 0.6:  # soft blobs and strokes, drawn and blurred at 1/4 resolution
        sw, sh = max(w // 4, 8), max(h // 4, 8)
        layer = cv2.resize(np.clip(img, 0, 255).astype(np.uint8), (sw, sh),
                           interpolation=cv2.INTER_AREA)
        for _ in range(int(rng.integers(3, 13))):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            c = (int(rng.integers(0, sw)), int(rng.integers(0, sh)))
            if rng.random() < 0.5:
                axes = (int(rng.integers(1, sw // 3)), int(rng.integers(1, sh // 3)))
                cv2.ellipse(layer, c, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
            else:
                end = (int(rng.integers(0, sw)), int(rng.integers(0, sh)))
                cv2.line(layer, c, end, color, int(rng.integers(1, 3)))
        layer = cv2.GaussianBlur(layer, (0, 0), float(rng.uniform(0.6, 2.0)))
        layer = cv2.resize(layer, (w, h), interpolation=cv2.INTER_LINEAR)
        alpha = np.float32(rng.uniform(0.25, 0.7))
        img = img * (1 - alpha) + layer.astype(np.float32) * alpha
    if rng.random() < 0.4:  # grain / texture
        sd = np.float32(rng.uniform(3, 15))
        img += sd * rng.standard_normal((h, w, 1 if rng.random() < 0.5 else 3), np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_shape(rng: np.random.Generator, wh: tuple[int, int],
                 near: Shape | None = None) -> Shape:
    """A random :class:`Shape` (class, size ``12 px .. min(W, H)/2`` log-uniform, aspect,
    angle, shading) centred inside the image, or near ``near`` (to create overlaps). The
    colour is left to the caller (it is chosen against the canvas, independently of the
    class)."""
    w, h = wh
    label = int(rng.integers(len(CLASS_NAMES)))
    extent = math.exp(rng.uniform(math.log(MIN_EXTENT_PX), math.log(min(w, h) / 2)))
    name = CLASS_NAMES[label]
    short = {"rectangle": 0.4, "circle": 0.7, "ring": 0.7}.get(name, 0.75)
    r = extent / 2
    radii = (r, r * rng.uniform(short, 1.0))
    if rng.random() < 0.5:
        radii = radii[::-1]
    if near is None:
        center = (rng.uniform(0.02, 0.98) * w, rng.uniform(0.02, 0.98) * h)
    else:
        d = rng.uniform(-1, 1, 2) * np.asarray(near.radii) * 1.5
        center = (float(np.clip(near.center[0] + d[0], 0, w - 1)),
                  float(np.clip(near.center[1] + d[1], 0, h - 1)))
    inner = rng.uniform(0.4, 0.6) if name in ("star", "ring") else 0.5
    shade = tuple(float(g) for g in rng.uniform(-1, 1, 2) * 40 / max(r, 1.0))
    return Shape(label=label, center=(float(center[0]), float(center[1])),
                 radii=(float(radii[0]), float(radii[1])), angle=float(rng.uniform(0, 360)),
                 inner=float(inner), shade=shade)


def _contrasting_color(rng: np.random.Generator, canvas: np.ndarray,
                       mask: np.ndarray) -> tuple[int, int, int]:
    """Random colour at least 80 (BGR L2) from the mean canvas colour under ``mask``."""
    under = np.array(cv2.mean(canvas, mask=mask.view(np.uint8))[:3])
    color = _random_color(rng)
    for _ in range(20):
        if np.linalg.norm(color - under) >= 80:
            break
        color = _random_color(rng)
    return int(color[0]), int(color[1]), int(color[2])


def _place_shapes(rng: np.random.Generator, canvas: np.ndarray) -> list[Shape]:
    """Draw 1..:data:`MAX_SHAPES` shapes, rejecting placements that would leave an earlier
    shape less than :data:`MIN_VISIBLE_FRACTION` visible; paints ``canvas`` in place."""
    wh = (canvas.shape[1], canvas.shape[0])
    shapes: list[Shape] = []
    visible: list[np.ndarray] = []
    full: list[int] = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        for _attempt in range(10):
            near = shapes[int(rng.integers(len(shapes)))] if (
                shapes and rng.random() < 0.3) else None
            s = random_shape(rng, wh, near)
            m = shape_mask(s, wh)
            area = int(m.sum())
            if area < 2 * MIN_VISIBLE_PX:
                continue
            if any(int((v & ~m).sum()) < MIN_VISIBLE_FRACTION * f for v, f in zip(visible,
                                                                                  full)):
                continue
            s = Shape(**{**asdict(s), "color": _contrasting_color(rng, canvas, m)})
            paint(canvas, m, s)
            visible = [v & ~m for v in visible] + [m]
            full.append(area)
            shapes.append(s)
            break
    return shapes


def make_scene(rng: np.random.Generator, size: int) -> Scene:
    """One random ``size x size`` image with its annotations (background, shapes, then
    sensor noise over everything)."""
    background = random_background(rng, (size, size))
    shapes = _place_shapes(rng, background.copy())
    scene = render_scene(background, shapes)
    sd = np.float32(rng.uniform(0, 6))
    noisy = scene.image + sd * rng.standard_normal(scene.image.shape, np.float32)
    image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return Scene(image, scene.boxes, scene.labels, scene.areas, scene.shapes)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Generator of image ``index`` of ``split`` (independent of the split's size)."""
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])


# ------------------------------------------------------------------------------------ writing

def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_json)`` of ``split`` under a dataset ``root``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    return root / split, root / "annotations" / f"{split}.json"


def _write_image(img_dir: Path, spec: SyntheticSpec, split: str,
                 index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render image ``index`` of ``split``, write it, return its ``(boxes, labels, areas)``."""
    scene = make_scene(scene_rng(spec.seed, split, index), spec.size)
    ok, buf = cv2.imencode(IMAGE_EXT, scene.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"image encoding failed for {split}/{index}")
    (img_dir / image_name(index)).write_bytes(buf.tobytes())
    return scene.boxes, scene.labels, scene.areas


def image_name(index: int) -> str:
    """File name of image ``index`` of a split."""
    return f"{index:06d}{IMAGE_EXT}"


def _coco_json(spec: SyntheticSpec, split: str, results: Sequence[tuple]) -> dict:
    """COCO dict from per-image ``(boxes (N, 4) xyxy, labels (N,), areas (N,))``."""
    images, anns = [], []
    for i, (boxes, labels, areas) in enumerate(results):
        images.append({"id": i + 1, "file_name": image_name(i), "height": spec.size,
                       "width": spec.size})
        for box, label, area in zip(boxes, labels, areas):
            x0, y0, x1, y1 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": i + 1,
                         "category_id": int(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": float(area), "iscrowd": 0})
    return {"info": {"description": f"nanodet_jax synthetic shapes ({split})",
                     "version": str(GENERATOR_VERSION)},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                           for k, n in enumerate(CLASS_NAMES)]}


def _write_split(root: Path, spec: SyntheticSpec, split: str, workers: int) -> None:
    img_dir, ann_file = split_paths(root, split)
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    n = spec.count(split)
    job = functools.partial(_write_image, img_dir, spec, split)
    if workers <= 1 or n < 32:
        results = [job(i) for i in range(n)]
    else:  # spawn: safe when the parent has JAX (threads) loaded
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(job, range(n), chunksize=16))
    ann_file.write_text(json.dumps(_coco_json(spec, split, results), separators=(",", ":")))


def default_workers() -> int:
    """Generation processes: the CPU count, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


def read_marker(root: str | Path) -> dict | None:
    """The marker of a complete synthetic dataset at ``root``, or ``None``."""
    p = Path(root) / MARKER
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def write_synthetic_dataset(out: str | Path, spec: SyntheticSpec,
                            workers: int | None = None) -> Path:
    """Generate ``spec`` into the new directory ``out`` atomically: everything is written to a
    temporary sibling directory which is renamed to ``out`` at the end, so an interrupted run
    leaves no partial dataset. ``out`` must not exist (an empty directory is replaced).
    ``workers`` processes render images (default :func:`default_workers`; the output does
    not depend on it). Returns ``out``."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for split in SPLITS:
            _write_split(tmp, spec, split, default_workers() if workers is None else workers)
        (tmp / MARKER).write_text(json.dumps(spec.marker(), indent=1))
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError as e:  # appeared meanwhile (another process)
            raise FileExistsError(f"{out} appeared while generating") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cache_base() -> Path:
    """Parent of the cache directories: ``$NANODET_DATA_DIR`` or ``~/.cache/nanodet_jax``."""
    env = os.environ.get("NANODET_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanodet_jax"


def synthetic_dataset_dir(seed: int = 0, num_train: int = SyntheticSpec.num_train,
                          num_val: int = SyntheticSpec.num_val,
                          size: int = SyntheticSpec.size) -> Path:
    """Default location of a synthetic dataset (pure: nothing is created):
    ``cache_base() / synthetic_<seed>_<train>_<val>_<size>``."""
    return cache_base() / SyntheticSpec(seed, num_train, num_val, size).dirname


def ensure_synthetic_dataset(root: str | Path | None = None, seed: int = 0,
                             num_train: int = SyntheticSpec.num_train,
                             num_val: int = SyntheticSpec.num_val,
                             size: int = SyntheticSpec.size,
                             workers: int | None = None) -> Path:
    """Return the root of a complete synthetic dataset for these settings, generating it on
    first use (``root`` default: :func:`synthetic_dataset_dir`).

    If ``root`` already holds something else (no marker, or a marker for other settings or
    another generator version), it is left untouched and the data goes to the first free or
    matching ``<root>-2``, ``<root>-3``... instead (with a warning); use the returned path.
    """
    spec = SyntheticSpec(seed, num_train, num_val, size)
    want = spec.marker()
    base = Path(root).expanduser() if root is not None else synthetic_dataset_dir(
        seed, num_train, num_val, size)
    for k in range(1, 1000):
        cand = base if k == 1 else base.with_name(f"{base.name}-{k}")
        if read_marker(cand) == want:
            return cand
        if cand.exists() and (not cand.is_dir() or any(cand.iterdir())):
            continue
        if cand != base:
            warnings.warn(f"{base} holds other data; writing the synthetic dataset to {cand}",
                          stacklevel=2)
        try:
            return write_synthetic_dataset(cand, spec, workers)
        except FileExistsError:  # a concurrent process won the race
            if read_marker(cand) == want:
                return cand
    raise RuntimeError(f"no free directory for the synthetic dataset next to {base}")


def ensure_synthetic_for_path(path: str | Path) -> Path | None:
    """If ``path`` (e.g. a config's ``data.train.ann_path``) lies inside a directory named
    like :attr:`SyntheticSpec.dirname`, make sure that dataset exists and return its root
    (see :func:`ensure_synthetic_dataset`; rewrite the config's paths with
    :func:`split_paths` if the returned root differs). Otherwise return ``None``."""
    p = Path(path).expanduser()
    for d in (p, *p.parents):
        spec = SyntheticSpec.from_dirname(d.name)
        if spec is not None:
            return ensure_synthetic_dataset(d, **asdict(spec))
    return None
