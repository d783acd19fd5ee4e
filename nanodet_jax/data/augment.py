"""Training augmentation of the reference pipeline (spec §11.2, §11.3, §11.5), numpy + OpenCV.

Three pure layers, so that every random quantity is explicit and testable:

* :func:`draw_params` turns a generator and the ``pipeline`` config (reference keys
  ``perspective, scale, stretch, rotation, shear, translate, flip, brightness, contrast,
  saturation, normalize, divisible``) into a frozen :class:`AugParams`;
* :func:`aug_matrix` / :func:`augment_matrix` build the warp
  ``M = Resize · T · F · Sh · R · Str · Scl · P · Cn`` from those values (no randomness);
* :func:`train_transform` applies the parameters: warp + boxes through
  :func:`~nanodet_jax.data.transforms.shape_transform`, then colour jitter in the reference
  order (brightness, contrast, saturation; no clipping) and :func:`normalize`. It returns the
  same :class:`Transformed` as ``val_transform``; :class:`AugParams` ``()`` (identity)
  reproduces ``val_transform`` bit for bit.

:func:`random_train_transform` chains them for one sample (multi-scale size first, then the
parameters, as the reference does). Randomness is keyed: :func:`sample_rng` ``(seed, epoch,
index)`` gives the same sample whatever the worker count or visiting order (the reference
uses Python's ``random`` per worker; bit-exact streams are not a goal, spec §11.7).

Every draw is made on every sample, whether or not its key is configured, so the stream
layout (and therefore a sample) does not depend on which keys a config sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from nanodet_jax.data.transforms import (
    DEFAULT_MEAN_BGR,
    DEFAULT_STD_BGR,
    SizeWH,
    Transformed,
    minimum_dst_shape,
    normalize,
    resize_matrix,
    scale_matrix,
    shape_transform,
    to_unit_float,
    translate_matrix,
)

PIPELINE_KEYS = ("perspective", "scale", "stretch", "rotation", "shear", "translate", "flip",
                 "brightness", "contrast", "saturation", "normalize", "divisible")


@dataclass(frozen=True)
class AugParams:
    """Drawn values of one training sample; the defaults are the identity (= validation).

    * ``perspective`` ``(px, py)``: ``P[2, 0], P[2, 1]``.
    * ``scale``: isotropic factor; ``stretch`` ``(sx, sy)``: per-axis factors.
    * ``rotation``: degrees, OpenCV convention; ``shear`` ``(x, y)``: degrees.
    * ``flip``: horizontal mirror about the image centre.
    * ``translate`` ``(tx, ty)``: where the image centre goes, as fractions of the raw
      ``(W, H)`` (``0.5, 0.5`` = stays centred).
    * ``brightness`` (added), ``contrast`` (multiplied), ``saturation`` (HSV S multiplied):
      ``None`` when the sample's coin said "off" (or the key is not configured).
    """

    perspective: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    stretch: tuple[float, float] = (1.0, 1.0)
    rotation: float = 0.0
    shear: tuple[float, float] = (0.0, 0.0)
    flip: bool = False
    translate: tuple[float, float] = (0.5, 0.5)
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator keyed by ``(seed, epoch, index)`` (non-negative ints): one independent
    stream per sample, identical in every worker and call order."""
    key = [int(seed), int(epoch), int(index)]
    if min(key) < 0:
        raise ValueError(f"sample_rng: seed, epoch and index must be >= 0, got {tuple(key)}")
    return np.random.default_rng(key)


# ------------------------------------------------------------------------------ config parsing

def _as_dict(cfg: Any) -> dict:
    """A plain dict from a mapping or an ``ml_collections.ConfigDict`` (``None`` -> ``{}``)."""
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _number(cfg: dict, key: str, default: float, low: float = 0.0,
            high: float = float("inf")) -> float:
    v = cfg.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not low <= v <= high:
        raise ValueError(f"pipeline.{key} must be a number in [{low}, {high}], got {v!r}")
    return float(v)


def _pair(v: Any, name: str) -> tuple[float, float]:
    """``[low, high]`` -> floats, with ``low <= high``."""
    ok = (isinstance(v, Sequence) and len(v) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
          and v[0] <= v[1])
    if not ok:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {v!r}")
    return float(v[0]), float(v[1])


def _range(cfg: dict, key: str, default: tuple[float, float]) -> tuple[float, float]:
    return _pair(cfg.get(key, default), f"pipeline.{key}")


def _stretch(cfg: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    v = cfg.get("stretch", ((1, 1), (1, 1)))
    if not (isinstance(v, Sequence) and len(v) == 2):
        raise ValueError(f"pipeline.stretch must be [[w_low, w_high], [h_low, h_high]], "
                         f"got {v!r}")
    return _pair(v[0], "pipeline.stretch[0]"), _pair(v[1], "pipeline.stretch[1]")


def check_pipeline(pipeline_cfg: Any) -> dict:
    """Validate a ``pipeline`` config and return it as a plain dict; unknown keys are an
    error naming them (the reference silently ignores them)."""
    cfg = _as_dict(pipeline_cfg)
    unknown = sorted(set(cfg) - set(PIPELINE_KEYS))
    if unknown:
        raise ValueError(f"pipeline: unknown key(s) {unknown} (accepted: {list(PIPELINE_KEYS)})")
    return cfg


def normalize_stats(pipeline_cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` (0..255 units, BGR) from ``pipeline.normalize`` = ``[mean, std]``,
    defaulting to the ImageNet values of the reference."""
    v = check_pipeline(pipeline_cfg).get("normalize")
    if v is None:
        return DEFAULT_MEAN_BGR, DEFAULT_STD_BGR
    if not (isinstance(v, Sequence) and len(v) == 2 and all(len(x) == 3 for x in v)):
        raise ValueError(f"pipeline.normalize must be [[3 means], [3 stds]], got {v!r}")
    return tuple(float(x) for x in v[0]), tuple(float(x) for x in v[1])


# ---------------------------------------------------------------------------------- drawing

def draw_params(rng: np.random.Generator, pipeline_cfg: Any) -> AugParams:
    """Draw one sample's :class:`AugParams` from ``pipeline_cfg`` (reference keys; missing
    keys take the reference defaults, i.e. no augmentation).

    Shape draws are made on every sample (spec §11.2): ``P ~ U(-p, p)²``, scale ``~ U(a, b)``,
    stretch ``~ U`` per axis, rotation/shear ``~ U(-deg, deg)``, flip with probability
    ``flip``, centre ``~ U(0.5 - t, 0.5 + t)`` per axis. Colour: an independent fair coin per
    brightness ``U(-d, d)`` / contrast ``U(a, b)`` / saturation ``U(a, b)`` (spec §11.3).
    """
    cfg = check_pipeline(pipeline_cfg)
    p = _number(cfg, "perspective", 0.0)
    scale = _range(cfg, "scale", (1.0, 1.0))
    (wr, hr) = _stretch(cfg)
    rot = _number(cfg, "rotation", 0.0)
    shear = _number(cfg, "shear", 0.0)
    flip = _number(cfg, "flip", 0.0, 0.0, 1.0)
    t = _number(cfg, "translate", 0.0)
    bright = _number(cfg, "brightness", 0.0)
    contrast = _range(cfg, "contrast", (1.0, 1.0))
    sat = _range(cfg, "saturation", (1.0, 1.0))

    persp = (float(rng.uniform(-p, p)), float(rng.uniform(-p, p)))
    s = float(rng.uniform(*scale))
    st = (float(rng.uniform(*wr)), float(rng.uniform(*hr)))
    a = float(rng.uniform(-rot, rot))
    sh = (float(rng.uniform(-shear, shear)), float(rng.uniform(-shear, shear)))
    flipped = bool(rng.random() < flip)
    tr = (float(rng.uniform(0.5 - t, 0.5 + t)), float(rng.uniform(0.5 - t, 0.5 + t)))

    def coin(key: str, low: float, high: float) -> float | None:
        on, v = rng.random() < 0.5, float(rng.uniform(low, high))
        return v if on and key in cfg else None

    return AugParams(perspective=persp, scale=s, stretch=st, rotation=a, shear=sh,
                     flip=flipped, translate=tr,
                     brightness=coin("brightness", -bright, bright),
                     contrast=coin("contrast", *contrast),
                     saturation=coin("saturation", *sat))


def draw_input_size(rng: np.random.Generator, input_wh: SizeWH,
                    multi_scale: Sequence[float] | None = None) -> SizeWH:
    """Multi-scale target size (spec §11.5): ``f ~ U(a, b)``, ``(int(W·f), int(H·f))``;
    ``input_wh`` unchanged (and nothing drawn) when ``multi_scale`` is ``None``."""
    if multi_scale is None:
        return int(input_wh[0]), int(input_wh[1])
    a, b = _pair(multi_scale, "multi_scale")
    if a <= 0:
        raise ValueError(f"multi_scale must be positive, got {list(multi_scale)!r}")
    f = float(rng.uniform(a, b))
    return int(input_wh[0] * f), int(input_wh[1] * f)


# --------------------------------------------------------------------------------- matrices

def perspective_matrix(px: float, py: float) -> np.ndarray:
    """``(3, 3)`` float64 with ``P[2, 0] = px``, ``P[2, 1] = py``."""
    m = np.eye(3)
    m[2, 0], m[2, 1] = px, py
    return m


def rotation_matrix(degrees: float) -> np.ndarray:
    """``(3, 3)`` float64 rotation about the origin, ``[[cos, sin], [-sin, cos]]`` (OpenCV
    ``getRotationMatrix2D`` convention: positive angles turn counter-clockwise on screen)."""
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D((0.0, 0.0), float(degrees), 1.0)
    return m


def shear_matrix(x_degrees: float, y_degrees: float) -> np.ndarray:
    """``(3, 3)`` float64 with ``[0, 1] = tan(x°)``, ``[1, 0] = tan(y°)``."""
    m = np.eye(3)
    m[0, 1] = math.tan(x_degrees * math.pi / 180)
    m[1, 0] = math.tan(y_degrees * math.pi / 180)
    return m


def flip_matrix(flip: bool) -> np.ndarray:
    """``(3, 3)`` float64 ``diag(-1, 1, 1)`` if ``flip`` else identity (mirror ``x -> -x``)."""
    return np.diag([-1.0 if flip else 1.0, 1.0, 1.0])


def aug_matrix(params: AugParams, src_wh: SizeWH) -> np.ndarray:
    """Random part ``A = T · F · Sh · R · Str · Scl · P · Cn`` ``(3, 3)`` float64 in source
    pixels of a ``src_wh`` image (multiplied in the reference's order; identity params give
    the exact identity)."""
    w, h = float(src_wh[0]), float(src_wh[1])
    m = translate_matrix(-w / 2, -h / 2)
    for step in (perspective_matrix(*params.perspective),
                 scale_matrix(params.scale, params.scale),
                 scale_matrix(*params.stretch),
                 rotation_matrix(params.rotation),
                 shear_matrix(*params.shear),
                 flip_matrix(params.flip)):
        m = step @ m
    return translate_matrix(params.translate[0] * w, params.translate[1] * h) @ m


def output_wh(src_wh: SizeWH, dst_wh: SizeWH, keep_ratio: bool, divisible: int = 0) -> SizeWH:
    """Size of the warped image: ``dst_wh``, or with ``keep_ratio`` the aspect-preserving
    :func:`~nanodet_jax.data.transforms.minimum_dst_shape` (as ``shape_transform``)."""
    if keep_ratio:
        return minimum_dst_shape(src_wh, dst_wh, divisible)
    return int(dst_wh[0]), int(dst_wh[1])


def augment_matrix(params: AugParams, src_wh: SizeWH, dst_wh: SizeWH, keep_ratio: bool,
                   divisible: int = 0) -> np.ndarray:
    """Full warp ``M = Resize · A`` ``(3, 3)`` float64 from a ``src_wh`` image to the
    :func:`output_wh` of ``dst_wh`` (the ``warp_matrix`` that :func:`train_transform`
    returns)."""
    out = output_wh(src_wh, dst_wh, keep_ratio, divisible)
    return resize_matrix(src_wh, out, keep_ratio) @ aug_matrix(params, src_wh)


# ----------------------------------------------------------------------------------- colour

def color_jitter(img_unit: np.ndarray, params: AugParams) -> np.ndarray:
    """Reference colour augmentation of a float32 ``(H, W, 3)`` BGR image in ``[0, 1]``
    units: ``+ brightness``, then ``· contrast``, then HSV ``S · saturation``; no clipping
    (values may leave ``[0, 1]``). Returns float32 ``(H, W, 3)``; the input is not modified
    and is returned as is when every colour parameter is ``None``."""
    img = np.asarray(img_unit, np.float32)
    if params.brightness is None and params.contrast is None and params.saturation is None:
        return img
    return _color_jitter_(img.copy(), params)


def _color_jitter_(img: np.ndarray, params: AugParams) -> np.ndarray:
    """:func:`color_jitter` overwriting ``img`` (float32, owned by the caller)."""
    if params.brightness is not None:
        img += np.float32(params.brightness)
    if params.contrast is not None:
        img *= np.float32(params.contrast)
    if params.saturation is not None:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[..., 1] *= np.float32(params.saturation)
        cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=img)
    return img


# -------------------------------------------------------------------------------- transforms

def train_transform(img: np.ndarray, dst_wh: SizeWH, params: AugParams,
                    keep_ratio: bool = False, mean: Sequence[float] = DEFAULT_MEAN_BGR,
                    std: Sequence[float] = DEFAULT_STD_BGR, divisible: int = 0,
                    boxes: Mapping[str, np.ndarray] | None = None) -> Transformed:
    """Training pipeline for given parameters: warp ``img (H, W, 3)`` uint8 BGR and every
    ``(n, 4)`` xyxy array in ``boxes`` by :func:`augment_matrix` (boxes through their four
    corners, clipped, none dropped), colour-jitter, normalise.

    Returns :class:`Transformed` with ``img (h, w, 3)`` float32, ``warp_matrix (3, 3)``
    float64; ``AugParams()`` reproduces ``val_transform`` exactly.
    """
    src_wh = (int(img.shape[1]), int(img.shape[0]))
    t = shape_transform(img, dst_wh, keep_ratio, aug_matrix(params, src_wh), divisible, boxes)
    t.img = normalize(_color_jitter_(to_unit_float(t.img), params), mean, std, inplace=True)
    return t


def random_train_transform(img: np.ndarray, rng: np.random.Generator, pipeline_cfg: Any,
                           input_wh: SizeWH, keep_ratio: bool = False,
                           multi_scale: Sequence[float] | None = None,
                           boxes: Mapping[str, np.ndarray] | None = None) -> Transformed:
    """One random training sample: :func:`draw_input_size` (``multi_scale``), then
    :func:`draw_params` from ``pipeline_cfg`` (the dataset's ``pipeline``), then
    :func:`train_transform` with the config's ``normalize`` and ``divisible``.

    ``rng`` is normally :func:`sample_rng` ``(seed, epoch, index)``.
    """
    cfg = check_pipeline(pipeline_cfg)
    dst_wh = draw_input_size(rng, input_wh, multi_scale)
    params = draw_params(rng, cfg)
    mean, std = normalize_stats(cfg)
    divisible = int(cfg.get("divisible", 0) or 0)
    return train_transform(img, dst_wh, params, keep_ratio, mean, std, divisible, boxes)
