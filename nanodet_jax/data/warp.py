"""Bilinear perspective warp, bit-identical on every CPU to OpenCV's baseline ``warpPerspective``.

The reference resizes and augments with ``cv2.warpPerspective(img, M, (w, h))`` (bilinear,
constant 0 border). OpenCV >= 4.11 computes it in float32 with universal intrinsics and picks
the instruction set at run time, so the *same* call gives different pixels on different CPUs:
with AVX-512 the network input differs from the reference fixtures by one uint8 step on ~0.6 %
of the pixels (vector width changes which columns take the scalar tail, and fused
multiply-adds change the last bit of the float math). :func:`warp_perspective` replays the
baseline (SSE2, 4 float lanes, no FMA) code path in numpy, whose float32 element-wise
arithmetic is plain IEEE on every machine:

1. ``Minv = M^-1`` in float64 with OpenCV's 3x3 cofactor formula (``cv::invert``, DECOMP_LU),
   then cast to float32 ``m``;
2. source coordinates in float32: vector columns ``x < 8*(w//8)`` use
   ``m0*x + (m1*y + m2)`` (same for ``y`` and ``w``), the scalar tail columns use
   ``(m0*x + m1*y) + m2``; then ``sx = X / W``, ``sy = Y / W``;
3. ``ix = floor(sx)``, ``ax = sx - ix`` (float32), likewise for ``y``; a destination pixel
   whose 2x2 neighbourhood misses the source entirely (``ix < -1`` or ``ix >= W_src``, same
   for ``y``) is the border value; otherwise out-of-image neighbours read the border value;
4. ``v0 = p00 + ax*(p01 - p00)``, ``v1 = p10 + ax*(p11 - p10)``, ``v = v0 + ay*(v1 - v0)``
   in float32, rounded half-to-even and saturated for integer images.

``tests/test_warp.py`` pins this against ``cv2.warpPerspective`` with OpenCV's dispatch off
(the baseline) on random images and matrices, and the val-pipeline fixtures pin it against the
reference. Cost for a 640x480 -> 320x320 BGR image on one core: ~1.7 ms for scale / flip /
translate (a separable two-pass path), ~4 ms with rotation, shear or perspective, against
~0.2 ms for OpenCV's SIMD code (``scripts/benchmark.py --suite data``, ``warp_ms``).
"""

from __future__ import annotations

import cv2
import numpy as np

_F32 = np.float32
_VECTOR_COLUMNS = 8  # OpenCV's baseline unroll: 2 x 4 float32 lanes per iteration
_FAR = 2.0 ** 30  # |coordinate| clamp: still far outside any image, no int32 overflow
_BLOCK_VALUES = 32768  # float32 values per block array (128 KiB: stays in L2 cache)


def invert_3x3(matrix: np.ndarray) -> np.ndarray:
    """``(3, 3)`` float64 inverse by OpenCV's cofactor formula (the one ``warpPerspective``
    applies to its matrix), evaluated in the same order so the bits match.

    Raises ``ValueError`` for a singular matrix (OpenCV would silently output a black image).
    """
    s = [[float(v) for v in row] for row in np.asarray(matrix, np.float64).reshape(3, 3)]
    d = (s[0][0] * (s[1][1] * s[2][2] - s[1][2] * s[2][1])
         - s[0][1] * (s[1][0] * s[2][2] - s[1][2] * s[2][0])
         + s[0][2] * (s[1][0] * s[2][1] - s[1][1] * s[2][0]))
    if d == 0.0:
        raise ValueError(f"warp matrix is singular (determinant 0): {s}")
    d = 1.0 / d
    return np.array([
        [(s[1][1] * s[2][2] - s[1][2] * s[2][1]) * d, (s[0][2] * s[2][1] - s[0][1] * s[2][2]) * d,
         (s[0][1] * s[1][2] - s[0][2] * s[1][1]) * d],
        [(s[1][2] * s[2][0] - s[1][0] * s[2][2]) * d, (s[0][0] * s[2][2] - s[0][2] * s[2][0]) * d,
         (s[0][2] * s[1][0] - s[0][0] * s[1][2]) * d],
        [(s[1][0] * s[2][1] - s[1][1] * s[2][0]) * d, (s[0][1] * s[2][0] - s[0][0] * s[2][1]) * d,
         (s[0][0] * s[1][1] - s[0][1] * s[1][0]) * d]], np.float64)


def source_coords(matrix: np.ndarray, dst_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Float32 source coordinates ``(sx, sy)``, each ``(h, w)``, of every destination pixel
    for the source->destination ``matrix (3, 3)`` (steps 1-2 of the module docstring)."""
    return _coords(invert_3x3(matrix).ravel().astype(_F32), dst_wh)


def _coords(m: np.ndarray, dst_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`source_coords` from the float32 inverse ``m (9,)``."""
    w, h = int(dst_wh[0]), int(dst_wh[1])
    x = np.arange(w, dtype=_F32)[None, :]
    y = np.arange(h, dtype=_F32)[:, None]
    sx = m[0] * x + (m[1] * y + m[2])
    sy = m[3] * x + (m[4] * y + m[5])
    sw = m[6] * x + (m[7] * y + m[8])
    t0 = w // _VECTOR_COLUMNS * _VECTOR_COLUMNS
    if t0 < w:  # scalar tail: left-to-right sum
        xt = x[:, t0:]
        sx[:, t0:] = xt * m[0] + y * m[1] + m[2]
        sy[:, t0:] = xt * m[3] + y * m[4] + m[5]
        sw[:, t0:] = xt * m[6] + y * m[7] + m[8]
    with np.errstate(divide="ignore", invalid="ignore"):
        return sx / sw, sy / sw


def _axis_aligned_coords(m: np.ndarray, dst_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`source_coords` when the float32 inverse ``m (9,)`` has ``m1 = m3 = m6 = m7 = 0``
    (scale + translate + flip): ``sx (w,)`` depends on the column only, ``sy (h,)`` on the
    row only. The zero terms drop out exactly in both the vector and the tail order
    (``0*x + v = v``), and ``W = m8`` everywhere."""
    w, h = int(dst_wh[0]), int(dst_wh[1])
    sx = m[0] * np.arange(w, dtype=_F32) + m[2]
    sy = m[4] * np.arange(h, dtype=_F32) + m[5]
    if m[8] != 1:
        sx /= m[8]
        sy /= m[8]
    return sx, sy


def _lerp_(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``b <- a + t*(b - a)`` in place, float32, in OpenCV's order of operations."""
    b -= a
    b *= t
    b += a
    return b


def _store_(v: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float32 ``v`` -> ``dtype`` values (integers: round half-to-even, saturate; in place)."""
    if dtype != np.float32:
        np.rint(v, out=v)
        np.clip(v, 0, np.iinfo(dtype).max, out=v)
    return v


def _pixels(src: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` -> ``(H, W)`` array of opaque C-channel pixels (one void item each): numpy
    gathers whole pixels at once instead of C small copies."""
    return src.view(np.dtype((np.void, src.shape[2] * src.itemsize))).reshape(src.shape[:2])


def _warp_axis_aligned(src: np.ndarray, m: np.ndarray, dst_wh: tuple[int, int]) -> np.ndarray:
    """Separable warp of ``src (H, W, C)``: each output row is the vertical lerp of two
    horizontally interpolated source rows, computed only for the rows some output row
    needs, in blocks of output rows that stay in cache. Same float32 operations per pixel
    as :func:`_warp_general`."""
    w, h = int(dst_wh[0]), int(dst_wh[1])
    src_h, src_w, chans = src.shape
    sx, sy = _axis_aligned_coords(m, dst_wh)
    fx, fy = _floor(sx), _floor(sy)
    ax = np.repeat(sx - fx, chans)
    ay = (sy - fy)[:, None]
    # Column / row of the top-left tap in a source padded by one zero pixel on each side.
    c0 = np.clip(fx, -1, src_w - 1).astype(np.intp) + 1
    r0 = np.clip(fy, -1, src_h - 1).astype(np.intp) + 1
    need = np.unique(np.concatenate([r0, r0 + 1]))  # source rows read (padded numbering)
    top = np.searchsorted(need, r0)  # index in `need` of each output row's p00 row
    pixels = _pixels(src)
    cols = [np.clip(c - 1, 0, src_w - 1) for c in (c0, c0 + 1)]
    # taps outside the image read 0: a few edge columns (zeroed per block) and the padding
    # rows 0 and H+1 (zeroed where a block reads them)
    col_off = [np.flatnonzero((c < 1) | (c > src_w)) for c in (c0, c0 + 1)]
    out = np.empty((h, w * chans), src.dtype)
    step = _block_rows(w * chans)
    for y0 in range(0, h, step):
        tb = top[y0:y0 + step]
        lo, hi = int(tb.min()), int(tb.max()) + 2
        rows = need[lo:hi]
        block = pixels.take(np.clip(rows - 1, 0, src_h - 1), axis=0)  # (R, W) pixels
        pad_rows = np.flatnonzero((rows < 1) | (rows > src_h))
        taps = []
        for c, off in zip(cols, col_off):
            t = block.take(c, axis=1).view(src.dtype).astype(_F32).reshape(len(rows), w, chans)
            if off.size:
                t[:, off] = 0
            if pad_rows.size:
                t[pad_rows] = 0
            taps.append(t.reshape(len(rows), w * chans))
        hrow = _lerp_(taps[0], taps[1], ax)  # horizontal lerp of each source row read
        v = _lerp_(hrow[tb - lo], hrow[tb + 1 - lo], ay[y0:y0 + len(tb)])
        out[y0:y0 + len(tb)] = _store_(v, src.dtype)
    out = out.reshape(h, w, chans)
    out[~_reaches(fy, src_h)] = 0
    out[:, ~_reaches(fx, src_w)] = 0
    return out


def _warp_general(src: np.ndarray, m: np.ndarray, dst_wh: tuple[int, int]) -> np.ndarray:
    """Warp of ``src (H, W, C)`` by any float32 inverse matrix ``m (9,)``: four gathered taps
    per output pixel, in blocks of output rows that stay in cache."""
    w, h = int(dst_wh[0]), int(dst_wh[1])
    src_h, src_w, chans = src.shape
    sx, sy = _coords(m, dst_wh)
    # out-of-image taps read 0 (an exact copy; cv2's is several times faster than numpy's)
    pad = cv2.copyMakeBorder(src, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    pad = pad.reshape(src_h + 2, src_w + 2, chans)
    flat = _pixels(pad).reshape(-1)
    row = src_w + 2
    out = np.empty((h, w, chans), src.dtype)
    step = _block_rows(w * chans)
    for y0 in range(0, h, step):
        fx, fy = _floor(sx[y0:y0 + step]), _floor(sy[y0:y0 + step])
        # per value, not per pixel: the lerps then run over long contiguous arrays
        ax = np.repeat((sx[y0:y0 + step] - fx).ravel(), chans)
        ay = np.repeat((sy[y0:y0 + step] - fy).ravel(), chans)
        inside = (_reaches(fx, src_w) & _reaches(fy, src_h)).ravel()
        ix = np.clip(fx, -1, src_w - 1).astype(np.intp).ravel()
        iy = np.clip(fy, -1, src_h - 1).astype(np.intp).ravel()
        i00 = np.where(inside, (iy + 1) * row + ix + 1, 0)

        def tap(offset: int, i00: np.ndarray = i00) -> np.ndarray:
            return flat.take(i00 + offset).view(src.dtype).astype(_F32)

        v0 = _lerp_(tap(0), tap(1), ax)
        v = _lerp_(v0, _lerp_(tap(row), tap(row + 1), ax), ay).reshape(-1, chans)
        v[~inside] = 0
        out[y0:y0 + step] = _store_(v, src.dtype).reshape(-1, w, chans)
    return out


def _floor(s: np.ndarray) -> np.ndarray:
    """``floor(s)`` with NaN and +-inf sent far outside any image (OpenCV's float->int
    conversion gives INT_MIN there, i.e. border)."""
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=-_FAR, posinf=_FAR, neginf=-_FAR)
    return np.floor(s)


def _reaches(f: np.ndarray, size: int) -> np.ndarray:
    """Whether a pixel whose top-left tap is at ``floor`` coordinate ``f`` has a tap inside
    ``[0, size)`` along that axis (``-1 <= f < size``); a pixel that fails on either axis is
    the border value (NaN fails)."""
    return (f >= -1) & (f < size)


def _block_rows(row_values: int) -> int:
    """Output rows per block so that one float32 block array is ~128 KiB."""
    return max(1, _BLOCK_VALUES // max(row_values, 1))


def warp_perspective(img: np.ndarray, matrix: np.ndarray, dst_wh: tuple[int, int]) -> np.ndarray:
    """Bilinear warp of ``img (H, W[, C])`` to ``(h, w[, C])`` = ``dst_wh[::-1]``, pixels
    outside the source are 0; ``matrix (3, 3)`` maps source to destination pixels (like
    ``cv2.warpPerspective`` without ``WARP_INVERSE_MAP``). dtype is kept: uint8/uint16 are
    rounded half-to-even and saturated, float32 is returned as computed."""
    img = np.asarray(img)
    if img.dtype not in (np.uint8, np.uint16, np.float32):
        raise TypeError(f"warp_perspective: image dtype {img.dtype} is not supported "
                        "(use uint8, uint16 or float32)")
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 2:
        raise ValueError(f"warp_perspective: image shape {img.shape} is not (H, W[, C]) "
                         "with H, W >= 2")
    dst_wh = (int(dst_wh[0]), int(dst_wh[1]))
    src = np.ascontiguousarray(img.reshape(img.shape[0], img.shape[1], -1))
    m = invert_3x3(matrix).ravel().astype(_F32)
    if m[1] == 0 and m[3] == 0 and m[6] == 0 and m[7] == 0 and m[8] != 0 and np.isfinite(m).all():
        out = _warp_axis_aligned(src, m, dst_wh)
    else:
        out = _warp_general(src, m, dst_wh)
    return out.reshape(dst_wh[::-1] + img.shape[2:])
