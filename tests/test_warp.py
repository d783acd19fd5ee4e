"""``nanodet_jax.data.warp``: the reference's bilinear ``warpPerspective``, the same on every CPU.

Three pins: (1) both code paths (axis-aligned and general) equal a per-pixel scalar model
of OpenCV's baseline algorithm written out with numpy float32 scalars (any machine);
(2) on x86-64, where OpenCV's baseline (dispatch off) is SSE2 code without fused
multiply-adds, the warp equals ``cv2.warpPerspective`` bit for bit on random images and
matrices; (3) the val-pipeline fixtures (``test_transforms``) pin it against the reference.
"""

from __future__ import annotations

import platform

import cv2
import numpy as np
import pytest

from nanodet_jax.data import warp as W

F = np.float32


def _scalar_model(img: np.ndarray, matrix: np.ndarray, dst_wh: tuple[int, int]) -> np.ndarray:
    """One destination pixel at a time, as OpenCV's baseline code computes it (see the
    module docstring of ``nanodet_jax.data.warp``); ``img (H, W, C)``."""
    m = [F(v) for v in W.invert_3x3(matrix).ravel()]
    w, h = dst_wh
    src_h, src_w, chans = img.shape
    out = np.zeros((h, w, chans), img.dtype)
    vector_end = w // 8 * 8
    with np.errstate(all="ignore"):
        for yi in range(h):
            y = F(yi)
            for xi in range(w):
                x = F(xi)
                if xi < vector_end:
                    sx, sy, sw = (m[0] * x + (m[1] * y + m[2]), m[3] * x + (m[4] * y + m[5]),
                                  m[6] * x + (m[7] * y + m[8]))
                else:
                    sx, sy, sw = (x * m[0] + y * m[1] + m[2], x * m[3] + y * m[4] + m[5],
                                  x * m[6] + y * m[7] + m[8])
                sx, sy = sx / sw, sy / sw
                if not (np.isfinite(sx) and np.isfinite(sy)):
                    continue
                ix, iy = int(np.floor(sx)), int(np.floor(sy))
                if not (-1 <= ix < src_w and -1 <= iy < src_h):
                    continue
                ax, ay = sx - F(ix), sy - F(iy)

                def p(dy: int, dx: int, ix: int = ix, iy: int = iy) -> np.ndarray:
                    r, c = iy + dy, ix + dx
                    inside = 0 <= r < src_h and 0 <= c < src_w
                    return img[r, c].astype(F) if inside else np.zeros(chans, F)

                v0 = p(0, 0) + ax * (p(0, 1) - p(0, 0))
                v1 = p(1, 0) + ax * (p(1, 1) - p(1, 0))
                v = v0 + ay * (v1 - v0)
                if img.dtype != np.float32:
                    v = np.clip(np.rint(v), 0, np.iinfo(img.dtype).max)
                out[yi, xi] = v.astype(img.dtype)
    return out


def _image(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if dtype == np.float32:
        return (rng.normal(size=shape) * 50).astype(F)
    return rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


def _matrix(rng: np.random.Generator, kind: str, src_wh, dst_wh) -> np.ndarray:
    """Source->destination matrices: ``axis`` (scale/flip/translate: the training default and
    validation), ``affine`` (rotation/shear), ``perspective``."""
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    m = np.diag([sx * rng.choice([1, -1, 2.5, 0.4]), sy * rng.choice([1, -1, 2.5, 0.4]), 1.0])
    m[:2, 2] = rng.normal(size=2) * 0.3 * np.array(dst_wh)
    if kind != "axis":
        m[:2, :2] += rng.normal(size=(2, 2)) * 0.2 * min(sx, sy)
    if kind == "perspective":
        m[2, :2] = rng.normal(size=2) * 3e-3
    return m


CASES = [(kind, dtype, chans) for kind in ("axis", "affine", "perspective")
         for dtype, chans in ((np.uint8, 3), (np.uint8, 1), (np.uint16, 4), (np.float32, 3))]


@pytest.mark.parametrize("kind,dtype,chans", CASES,
                         ids=[f"{k}-{np.dtype(d).name}-c{c}" for k, d, c in CASES])
def test_equals_the_scalar_model(kind, dtype, chans):
    rng = np.random.default_rng([7, len(kind), chans, np.dtype(dtype).itemsize])
    for _ in range(3):
        src_wh = tuple(int(v) for v in rng.integers(2, 40, 2))
        dst_wh = tuple(int(v) for v in rng.integers(1, 30, 2))  # widths off the 8-column grid
        img = _image(rng, (src_wh[1], src_wh[0], chans), dtype)
        m = _matrix(rng, kind, src_wh, dst_wh)
        got = W.warp_perspective(img, m, dst_wh)
        assert got.shape == (dst_wh[1], dst_wh[0], chans) and got.dtype == img.dtype
        np.testing.assert_array_equal(got, _scalar_model(img, m, dst_wh))
        # the general path on an axis-aligned matrix: same pixels as the separable path
        inverse = W.invert_3x3(m).ravel().astype(F)
        np.testing.assert_array_equal(got, W._warp_general(img, inverse, dst_wh))


# OpenCV's baseline build is FMA-free SSE2 on x86-64 only (compilers fuse a*b+c on other
# ISAs); there the scalar model and the reference fixtures pin the warp.
x86_64_only = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                 reason="OpenCV's baseline code is FMA-free only on x86-64")


@x86_64_only
def test_equals_opencv_baseline_on_random_warps():
    rng = np.random.default_rng(11)
    before = cv2.useOptimized()
    try:
        for i in range(120):
            kind = ("axis", "affine", "perspective")[i % 3]
            dtype, chans = ((np.uint8, 3), (np.uint8, 1), (np.uint16, 4), (np.float32, 3))[i % 4]
            src_wh = tuple(int(v) for v in rng.integers(2, 200, 2))
            dst_wh = tuple(int(v) for v in rng.integers(1, 200, 2))
            img = _image(rng, (src_wh[1], src_wh[0], chans), dtype)
            m = _matrix(rng, kind, src_wh, dst_wh)
            cv2.setUseOptimized(False)
            want = cv2.warpPerspective(img, m, dst_wh, flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            cv2.setUseOptimized(before)
            got = W.warp_perspective(img, m, dst_wh)
            assert got.dtype == want.dtype, i
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"case {i}")
    finally:
        cv2.setUseOptimized(before)


@x86_64_only
def test_inverse_is_opencvs_cofactor_formula():
    rng = np.random.default_rng(3)
    for _ in range(50):
        m = np.eye(3) + rng.normal(size=(3, 3)) * 0.5
        assert np.array_equal(W.invert_3x3(m), cv2.invert(m, flags=cv2.DECOMP_LU)[1])


def test_bad_input_is_named():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="singular"):
        W.warp_perspective(img, np.zeros((3, 3)), (4, 4))
    with pytest.raises(TypeError, match="float64"):
        W.warp_perspective(img.astype(np.float64), np.eye(3), (4, 4))
    with pytest.raises(ValueError, match="H, W >= 2"):
        W.warp_perspective(img[:1], np.eye(3), (4, 4))


def test_grayscale_keeps_its_shape_and_far_pixels_are_black():
    img = np.full((10, 12), 200, np.uint8)
    out = W.warp_perspective(img, np.array([[1.0, 0, 100], [0, 1, 0], [0, 0, 1]]), (20, 6))
    assert out.shape == (6, 20) and not out.any()


def test_taps_far_into_a_large_source_are_exact():
    """Flat pixel indices past 2**24 (float32's integer limit) must still be exact."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (4200, 4200, 1), dtype=np.uint8)
    m = np.linalg.inv(np.array([[0.9, 0.2, 4100.0], [-0.1, 1.1, 4150.0], [0, 0, 1]]))
    got = W.warp_perspective(img, m, (9, 7))
    np.testing.assert_array_equal(got, _scalar_model(img, m, (9, 7)))
