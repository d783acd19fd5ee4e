"""Host-side image and box transforms of the reference data pipeline (numpy + OpenCV).

Spec §11.2-11.6. Everything here runs on the host, per image, before batching:

* geometry is a 3x3 float64 homogeneous matrix ``M`` (source pixel -> destination pixel);
  ``M = Resize @ A`` where ``A`` is the augmentation matrix (identity for validation: the
  reference's centre/translate pair cancels exactly with the val defaults, spec §11.4), so
  the training pipeline only has to build ``A`` and call :func:`shape_transform`;
* :func:`warp_image` is the reference's ``cv2.warpPerspective`` (bilinear, constant 0
  border; a destination pixel ``u`` samples ``M^-1 u``, no half-pixel offset), replayed
  bit-exactly by :func:`nanodet_jax.data.warp.warp_perspective`: OpenCV's own result
  depends on the CPU's instruction set (see that module);
* :func:`warp_boxes` transforms the 4 corners in float64, takes min/max, clips, casts to
  float32; no box is dropped (quirk #3);
* colour: :func:`to_unit_float` (``uint8 / 255`` in float32), then (training: colour jitter),
  then :func:`normalize` ``(img - mean/255) / (std/255)`` in float32, BGR order;
* :func:`collate_images` zero-pads at the bottom/right to a multiple of 32 *after*
  normalisation (pad value 0 = the mean colour, unlike the black warp border).

Sizes are ``(width, height)`` like the reference config's ``input_size``; image arrays are
``(H, W, C)`` HWC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from nanodet_jax.data.warp import warp_perspective

SizeWH = tuple[int, int]

DEFAULT_MEAN_BGR = (103.53, 116.28, 123.675)
DEFAULT_STD_BGR = (57.375, 57.12, 58.395)


def translate_matrix(tx: float, ty: float) -> np.ndarray:
    """``(3, 3)`` float64 translation by ``(tx, ty)``."""
    m = np.eye(3)
    m[0, 2], m[1, 2] = tx, ty
    return m


def scale_matrix(sx: float, sy: float) -> np.ndarray:
    """``(3, 3)`` float64 axis-aligned scaling."""
    return np.diag([float(sx), float(sy), 1.0])


def _fit_ratio(src_wh: SizeWH, dst_wh: SizeWH) -> float:
    """Aspect-preserving scale that fits ``src`` into ``dst`` (``min(dw/sw, dh/sh)``, chosen by
    comparing the aspect ratios as the reference does)."""
    (sw, sh), (dw, dh) = src_wh, dst_wh
    return dh / sh if sw / sh < dw / dh else dw / sw


def minimum_dst_shape(src_wh: SizeWH, dst_wh: SizeWH, divisible: int = 0) -> SizeWH:
    """``keep_ratio`` output size: the largest aspect-preserving ``(w, h)`` inside ``dst_wh``
    (``int()`` truncation), optionally rounded up to a multiple of ``divisible``."""
    r = _fit_ratio(src_wh, dst_wh)
    w, h = int(r * src_wh[0]), int(r * src_wh[1])
    if divisible and divisible > 0:
        w = max(divisible, -(-w // divisible) * divisible)
        h = max(divisible, -(-h // divisible) * divisible)
    return w, h


def resize_matrix(src_wh: SizeWH, dst_wh: SizeWH, keep_ratio: bool) -> np.ndarray:
    """Reference resize matrix ``(3, 3)`` float64 from a ``src_wh`` image to ``dst_wh``.

    ``keep_ratio=False``: ``diag(dw/sw, dh/sh, 1)`` (stretch). ``keep_ratio=True``: centre
    the source, scale isotropically by the fit ratio of ``src`` into ``dst`` and move to the
    destination centre. With :func:`minimum_dst_shape` as ``dst_wh`` (what the pipeline
    does) the ratio is recomputed from that shrunk size.
    """
    (sw, sh), (dw, dh) = src_wh, dst_wh
    if not keep_ratio:
        return scale_matrix(dw / sw, dh / sh)
    r = _fit_ratio(src_wh, dst_wh)
    return translate_matrix(0.5 * dw, 0.5 * dh) @ scale_matrix(r, r) @ translate_matrix(
        -sw / 2, -sh / 2)


def warp_image(img: np.ndarray, matrix: np.ndarray, dst_wh: SizeWH) -> np.ndarray:
    """The reference's ``cv2.warpPerspective`` of ``img (H, W, C)`` to ``(dst_h, dst_w, C)``
    (bilinear, constant 0 border), identical on every CPU; dtype is kept."""
    return warp_perspective(img, matrix, (int(dst_wh[0]), int(dst_wh[1])))


def warp_boxes(boxes: np.ndarray, matrix: np.ndarray, width: float, height: float) -> np.ndarray:
    """Map xyxy ``boxes (N, 4)`` through ``matrix (3, 3)``; returns ``(N, 4)`` float32.

    Corners ``(x1,y1), (x2,y2), (x1,y2), (x2,y1)`` are transformed in float64 (homogeneous
    divide), the axis-aligned hull is clipped to ``[0, width] x [0, height]``.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if b.shape[0] == 0:
        return np.zeros((0, 4), np.float32)
    xs = b[:, [0, 2, 0, 2]]
    ys = b[:, [1, 3, 3, 1]]
    m = np.asarray(matrix, np.float64)
    den = m[2, 0] * xs + m[2, 1] * ys + m[2, 2]
    u = (m[0, 0] * xs + m[0, 1] * ys + m[0, 2]) / den
    v = (m[1, 0] * xs + m[1, 1] * ys + m[1, 2]) / den
    out = np.stack([u.min(1).clip(0, width), v.min(1).clip(0, height),
                    u.max(1).clip(0, width), v.max(1).clip(0, height)], axis=1)
    return out.astype(np.float32)


def to_unit_float(img: np.ndarray) -> np.ndarray:
    """``uint8`` image -> float32 ``img / 255`` (the colour stage's starting point), a new
    array."""
    out = np.asarray(img).astype(np.float32)
    out /= 255
    return out


def normalize(img_unit: np.ndarray, mean: Sequence[float] = DEFAULT_MEAN_BGR,
              std: Sequence[float] = DEFAULT_STD_BGR, *, inplace: bool = False) -> np.ndarray:
    """``(img - mean/255) / (std/255)`` in float32 for a ``(H, W, 3)`` image already scaled
    by 1/255 (:func:`to_unit_float`); ``mean``/``std`` in 0..255 units, channel order of the
    image (BGR). ``inplace``: overwrite ``img_unit`` (a float32 array the caller owns) instead
    of allocating: the pipelines' images are ~1 MB, and a fresh array that size costs as
    much as the arithmetic (page faults)."""
    mean = np.asarray(mean, np.float32).reshape(1, 1, -1) / 255
    std = np.asarray(std, np.float32).reshape(1, 1, -1) / 255
    out = np.subtract(img_unit, mean, out=img_unit if inplace else None)
    out /= std
    return out


@dataclass
class Transformed:
    """One image after the shape transform (and, for :func:`val_transform`, normalisation).

    ``img (h, w, 3)``: uint8 after :func:`shape_transform`, float32 normalised after
    :func:`val_transform`. ``warp_matrix (3, 3)`` float64 maps original -> transformed
    pixels; ``src_wh`` is the original ``(width, height)``; ``boxes`` holds every box array
    passed in, warped and clipped (``(n, 4)`` float32).
    """

    img: np.ndarray
    warp_matrix: np.ndarray
    src_wh: SizeWH
    boxes: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def out_wh(self) -> SizeWH:
        return int(self.img.shape[1]), int(self.img.shape[0])


def shape_transform(img: np.ndarray, dst_wh: SizeWH, keep_ratio: bool = False,
                    aug_matrix: np.ndarray | None = None, divisible: int = 0,
                    boxes: Mapping[str, np.ndarray] | None = None) -> Transformed:
    """Reference ``ShapeTransform``: ``M = resize_matrix(...) @ aug_matrix``, warp the image
    and every box array in ``boxes`` (e.g. ``gt_bboxes``, ``gt_bboxes_ignore``).

    With ``keep_ratio`` the output shrinks to :func:`minimum_dst_shape` (not padded: padding
    happens at collation). ``aug_matrix`` (default identity) is the random part of training
    augmentation, expressed in source pixels (spec §11.2).
    """
    src_wh = (int(img.shape[1]), int(img.shape[0]))
    out_wh = minimum_dst_shape(src_wh, dst_wh, divisible) if keep_ratio else (
        int(dst_wh[0]), int(dst_wh[1]))
    m = resize_matrix(src_wh, out_wh, keep_ratio)
    if aug_matrix is not None:
        m = m @ np.asarray(aug_matrix, np.float64)
    warped = {k: warp_boxes(v, m, *out_wh) for k, v in (boxes or {}).items()}
    return Transformed(warp_image(img, m, out_wh), m, src_wh, warped)


def val_transform(img: np.ndarray, dst_wh: SizeWH, keep_ratio: bool = False,
                  mean: Sequence[float] = DEFAULT_MEAN_BGR, std: Sequence[float] = DEFAULT_STD_BGR,
                  boxes: Mapping[str, np.ndarray] | None = None) -> Transformed:
    """Validation/test pipeline (spec §11.4): resize warp + normalisation, no randomness.

    ``img (H, W, 3)`` uint8 BGR -> :class:`Transformed` with ``img (h, w, 3)`` float32.
    """
    t = shape_transform(img, dst_wh, keep_ratio, boxes=boxes)
    t.img = normalize(to_unit_float(t.img), mean, std, inplace=True)
    return t


def collate_images(images: Sequence[np.ndarray], divisible: int = 32) -> np.ndarray:
    """Stack ``(h_i, w_i, C)`` images into ``(B, H, W, C)``, zero-padded at the bottom/right to
    the batch maximum rounded up to a multiple of ``divisible``."""
    if not images:
        raise ValueError("collate_images: empty batch")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    if divisible and divisible > 0:
        h, w = -(-h // divisible) * divisible, -(-w // divisible) * divisible
    out = np.zeros((len(images), h, w, images[0].shape[2]), images[0].dtype)
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = im
    return out
