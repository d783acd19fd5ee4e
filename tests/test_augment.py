"""Training augmentation (spec §11.2-11.5): identity = validation, matrix composition, flips,
box clipping, the distributions of the drawn parameters, keyed reproducibility."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from nanodet_jax.config import nanodet_plus_recipe
from nanodet_jax.data import augment as A
from nanodet_jax.data import transforms as T
from tests.fixtures import fixture_params, group, load_npz

RECIPE = nanodet_plus_recipe("1.0x", 320)["data"]["train"]["pipeline"]
# Every key non-trivial (the recipe leaves perspective/rotation/shear at 0).
FULL = {**RECIPE, "perspective": 0.0005, "rotation": 15.0, "shear": 4.0,
        "stretch": [[0.8, 1.2], [0.7, 1.1]]}
N_DRAWS = 4000


def _image(seed: int = 0, wh: tuple[int, int] = (53, 37)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8)


def _boxes(seed: int, wh: tuple[int, int], n: int = 6) -> np.ndarray:
    """``(n, 4)`` float32 xyxy boxes, some partly outside a ``wh`` image."""
    r = np.random.default_rng(seed)
    xy = r.uniform(-0.2, 1.0, (n, 2)) * wh
    size = r.uniform(0.05, 0.6, (n, 2)) * wh
    return np.concatenate([xy, xy + size], 1).astype(np.float32)


# ----------------------------------------------------------------------- identity = validation

@pytest.mark.parametrize("path", fixture_params("val_pipeline*.npz"))
def test_identity_params_reproduce_val_fixture(path):
    """``AugParams()`` through the training path equals the reference val pipeline fixture
    (and ``val_transform``) bit for bit, image, matrix and boxes."""
    d = load_npz(path)
    raw = d["raw_image_bgr_uint8"]
    boxes = {"xml": d["xml_gt_bboxes"]}
    for variant in sorted(k[: -len("/img_chw")] for k in d if k.endswith("/img_chw")):
        g = group(d, variant)
        dst = tuple(int(v) for v in g["dst_shape_wh"])
        for keep_ratio in (False, True):
            val = T.val_transform(raw, dst, keep_ratio, d["normalize_mean_bgr"],
                                  d["normalize_std_bgr"], boxes=boxes)
            got = A.train_transform(raw, dst, A.AugParams(), keep_ratio,
                                    d["normalize_mean_bgr"], d["normalize_std_bgr"],
                                    boxes=boxes)
            assert np.array_equal(got.img, val.img), (variant, keep_ratio)
            assert np.array_equal(got.warp_matrix, val.warp_matrix), (variant, keep_ratio)
            assert np.array_equal(got.boxes["xml"], val.boxes["xml"]), (variant, keep_ratio)
            if got.img.shape == g["img_chw"].shape[1:] + (3,) and np.abs(
                    got.warp_matrix - g["warp_matrix"]).max() <= 1e-9:
                ref = g["img_chw"].transpose(1, 2, 0)
                assert np.abs(got.img - ref).max() <= 1e-5, variant
                assert np.abs(got.boxes["xml"] - g["gt_bboxes_xml"]).max() <= 1e-5


@pytest.mark.parametrize("keep_ratio", [False, True])
def test_identity_params_equal_val_transform(keep_ratio):
    img = _image(1, (61, 45))
    boxes = {"gt": _boxes(2, (61, 45)), "empty": np.zeros((0, 4), np.float32)}
    val = T.val_transform(img, (64, 32), keep_ratio, boxes=boxes)
    got = A.train_transform(img, (64, 32), A.AugParams(), keep_ratio, boxes=boxes)
    assert got.img.dtype == np.float32 and got.warp_matrix.dtype == np.float64
    assert np.array_equal(got.img, val.img) and np.array_equal(got.warp_matrix, val.warp_matrix)
    for k in boxes:
        assert np.array_equal(got.boxes[k], val.boxes[k]), k
    assert got.src_wh == val.src_wh and got.out_wh == val.out_wh
    np.testing.assert_array_equal(A.aug_matrix(A.AugParams(), (61, 45)), np.eye(3))


def test_validation_config_draws_identity():
    """A pipeline with only ``normalize`` (the val config) draws the identity on every key."""
    rng = np.random.default_rng(0)
    val_cfg = nanodet_plus_recipe("1.0x", 320)["data"]["val"]["pipeline"]
    for _ in range(50):
        assert A.draw_params(rng, val_cfg) == A.AugParams()


# ---------------------------------------------------------------------------- composition

def _spec_matrix(p: A.AugParams, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Spec §11.2 written out independently (keep_ratio False)."""
    w, h = src
    cn = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]], float)
    pm = np.array([[1, 0, 0], [0, 1, 0], [p.perspective[0], p.perspective[1], 1]], float)
    scl = np.diag([p.scale, p.scale, 1.0])
    st = np.diag([p.stretch[0], p.stretch[1], 1.0])
    a = math.radians(p.rotation)
    r = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]])
    sh = np.array([[1, math.tan(math.radians(p.shear[0])), 0],
                   [math.tan(math.radians(p.shear[1])), 1, 0], [0, 0, 1]])
    f = np.diag([-1.0 if p.flip else 1.0, 1, 1])
    t = np.array([[1, 0, p.translate[0] * w], [0, 1, p.translate[1] * h], [0, 0, 1]])
    rs = np.diag([dst[0] / w, dst[1] / h, 1.0])
    return rs @ t @ f @ sh @ r @ st @ scl @ pm @ cn


def test_matrix_matches_spec_composition_and_transform():
    img = _image(3, (80, 60))
    boxes = {"gt": _boxes(4, (80, 60))}
    rng = np.random.default_rng(5)
    for _ in range(20):
        p = A.draw_params(rng, FULL)
        m = A.augment_matrix(p, (80, 60), (96, 64), keep_ratio=False)
        np.testing.assert_allclose(m, _spec_matrix(p, (80, 60), (96, 64)), rtol=1e-12,
                                   atol=1e-12)
        out = A.train_transform(img, (96, 64), p, boxes=boxes)
        assert np.array_equal(out.warp_matrix, m)
        assert out.out_wh == (96, 64)
        np.testing.assert_array_equal(out.boxes["gt"], T.warp_boxes(boxes["gt"], m, 96, 64))
        warped = T.warp_image(img, m, (96, 64))
        expect = T.normalize(A.color_jitter(T.to_unit_float(warped), p))
        assert np.array_equal(out.img, expect)


def test_keep_ratio_matrix_and_size():
    p = A.draw_params(np.random.default_rng(1), FULL)
    src, dst = (200, 100), (64, 64)
    m = A.augment_matrix(p, src, dst, keep_ratio=True, divisible=32)
    assert A.output_wh(src, dst, True, 32) == (64, 32)
    np.testing.assert_array_equal(
        m, T.resize_matrix(src, (64, 32), True) @ A.aug_matrix(p, src))
    out = A.train_transform(_image(0, src), dst, p, keep_ratio=True, divisible=32)
    assert out.out_wh == (64, 32) and np.array_equal(out.warp_matrix, m)


def test_colour_order_and_no_clipping():
    """brightness, then contrast, then saturation, in float32, values leave [0, 1] freely."""
    x = np.linspace(0, 1, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    p = A.AugParams(brightness=0.2, contrast=1.4, saturation=0.5)
    y = (x + np.float32(0.2)) * np.float32(1.4)
    assert y.max() > 1.5  # would be clipped by a wrong implementation
    hsv = cv2.cvtColor(y, cv2.COLOR_BGR2HSV)
    hsv[..., 1] *= np.float32(0.5)
    expect = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    np.testing.assert_array_equal(A.color_jitter(x, p), expect)
    np.testing.assert_array_equal(A.color_jitter(x, A.AugParams(brightness=-0.3)),
                                  x - np.float32(0.3))
    assert A.color_jitter(x, A.AugParams()) is x
    assert A.color_jitter(x, A.AugParams(contrast=2.0)).max() == pytest.approx(2.0)
    assert np.array_equal(x, np.linspace(0, 1, 60, dtype=np.float32).reshape(4, 5, 3)), (
        "color_jitter modified its input")


# ----------------------------------------------------------------------------------- flips

def test_flip_twice_is_identity():
    src = (53, 37)
    f = A.aug_matrix(A.AugParams(flip=True), src)
    np.testing.assert_array_equal(f, [[-1, 0, 53], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(f @ f, np.eye(3))
    boxes = _boxes(7, src, 20)
    clipped = T.warp_boxes(boxes, np.eye(3), *src)
    once = T.warp_boxes(boxes, f, *src)
    np.testing.assert_array_equal(once[:, [0, 2]], 53 - clipped[:, [2, 0]])
    np.testing.assert_allclose(T.warp_boxes(once, f, *src), clipped, rtol=0, atol=1e-5)
    grid = np.array([[0, 0, 53, 37], [2.5, 3, 10.25, 36], [-4, -1, 20, 5]], np.float32)
    np.testing.assert_array_equal(T.warp_boxes(T.warp_boxes(grid, f, *src), f, *src),
                                  T.warp_boxes(grid, np.eye(3), *src))  # exact on a grid
    # Image: the reference maps x -> W - x (no half-pixel shift), so column u shows source
    # column W - u: one column lost to the black border per flip.
    img = _image(2, src)
    once_img = T.shape_transform(img, src, aug_matrix=f).img
    assert np.array_equal(once_img[:, 1:], img[:, :0:-1]) and not once_img[:, 0].any()
    twice = T.shape_transform(once_img, src, aug_matrix=f).img
    assert np.array_equal(twice[:, 1:], img[:, 1:])


# ------------------------------------------------------------------------------ box clipping

@pytest.mark.parametrize("keep_ratio", [False, True])
def test_warped_boxes_inside_image(keep_ratio):
    rng = np.random.default_rng(11)
    wild = {**FULL, "perspective": 0.002, "rotation": 45.0, "shear": 10.0, "translate": 0.5,
            "scale": [0.3, 2.5]}
    for i in range(300):
        src = (int(rng.integers(20, 400)), int(rng.integers(20, 400)))
        dst = (int(rng.integers(1, 11)) * 32, int(rng.integers(1, 11)) * 32)
        p = A.draw_params(rng, wild)
        m = A.augment_matrix(p, src, dst, keep_ratio)
        w, h = A.output_wh(src, dst, keep_ratio)
        b = T.warp_boxes(_boxes(i, src, 8), m, w, h)
        assert b.dtype == np.float32 and b.shape == (8, 4)
        assert np.all(b[:, [0, 2]] >= 0) and np.all(b[:, [0, 2]] <= w), (i, b)
        assert np.all(b[:, [1, 3]] >= 0) and np.all(b[:, [1, 3]] <= h), (i, b)
        assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
    out = A.random_train_transform(_image(0, (90, 70)), A.sample_rng(0, 0, 0), wild,
                                   (64, 64), keep_ratio, boxes={"gt": _boxes(0, (90, 70))})
    b, (w, h) = out.boxes["gt"], out.out_wh
    assert np.all((b >= 0) & (b <= [w, h, w, h]))


# --------------------------------------------------------------------------- distributions

def _ks_uniform(x: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the sample ``x`` and ``U(low, high)``."""
    f = np.sort((x - low) / (high - low))
    n = len(f)
    i = np.arange(1, n + 1)
    return float(max((i / n - f).max(), (f - (i - 1) / n).max()))


def _check_uniform(name: str, x: np.ndarray, low: float, high: float) -> None:
    """All in range, both ends reached (within 1% of the width), mean within 4 standard
    errors, KS distance below 1.95/sqrt(n) (p ~ 0.001; 0.031 at n = 4000)."""
    n, width = len(x), high - low
    assert n > 1000, (name, n)
    assert x.min() >= low and x.max() <= high, (name, x.min(), x.max())
    assert x.min() - low < 0.01 * width and high - x.max() < 0.01 * width, name
    se = width / math.sqrt(12 * n)
    assert abs(x.mean() - (low + high) / 2) < 4 * se, (name, x.mean(), se)
    d = _ks_uniform(x, low, high)
    assert d < 1.95 / math.sqrt(n), (name, d)


def _check_coin(name: str, x: np.ndarray, prob: float) -> None:
    sd = math.sqrt(prob * (1 - prob) / len(x))
    assert abs(x.mean() - prob) < 4 * sd, (name, x.mean(), prob, sd)


def test_parameter_distributions():
    rng = np.random.default_rng(2024)
    draws = [A.draw_params(rng, FULL) for _ in range(N_DRAWS)]
    col = {f: np.array([getattr(d, f) for d in draws], dtype=object)
           for f in A.AugParams.__dataclass_fields__}

    def arr(f, j=None):
        return np.array([v if j is None else v[j] for v in col[f]], float)

    p, t, rot, sh = FULL["perspective"], FULL["translate"], FULL["rotation"], FULL["shear"]
    for j in (0, 1):
        _check_uniform(f"perspective[{j}]", arr("perspective", j), -p, p)
        _check_uniform(f"stretch[{j}]", arr("stretch", j), *FULL["stretch"][j])
        _check_uniform(f"shear[{j}]", arr("shear", j), -sh, sh)
        _check_uniform(f"translate[{j}]", arr("translate", j), 0.5 - t, 0.5 + t)
    _check_uniform("scale", arr("scale"), *FULL["scale"])
    _check_uniform("rotation", arr("rotation"), -rot, rot)
    _check_coin("flip", arr("flip"), FULL["flip"])
    colour = {"brightness": (-FULL["brightness"], FULL["brightness"]),
              "contrast": tuple(FULL["contrast"]), "saturation": tuple(FULL["saturation"])}
    coins = {}
    for name, (low, high) in colour.items():
        on = np.array([v is not None for v in col[name]])
        _check_coin(f"{name} coin", on, 0.5)
        _check_uniform(name, np.array([v for v in col[name] if v is not None], float),
                       low, high)
        coins[name] = on
    # independent coins: every on/off combination of flip and the 3 colour coins ~ 1/16
    combo = (arr("flip").astype(int) * 8 + coins["brightness"] * 4 + coins["contrast"] * 2
             + coins["saturation"])
    freq = np.bincount(combo, minlength=16) / N_DRAWS
    sd = math.sqrt(1 / 16 * 15 / 16 / N_DRAWS)
    assert np.all(np.abs(freq - 1 / 16) < 4 * sd), freq


def test_recipe_ranges_and_multi_scale():
    """The COCO recipe: scale/stretch/translate drawn, rotation/shear/perspective exactly 0."""
    rng = np.random.default_rng(7)
    draws = [A.draw_params(rng, RECIPE) for _ in range(500)]
    assert all(d.rotation == 0 and d.shear == (0, 0) and d.perspective == (0, 0) for d in draws)
    assert min(d.scale for d in draws) >= 0.6 and max(d.scale for d in draws) <= 1.4
    sizes = np.array([A.draw_input_size(rng, (320, 256), (0.5, 1.5)) for _ in range(N_DRAWS)])
    assert sizes.dtype.kind == "i"
    # int(320 f) with f ~ U(0.5, 1.5): uniform on the integers 160..479 (centred with +0.5)
    _check_uniform("multi_scale width", sizes[:, 0] + 0.5, 160, 480)
    assert np.all(np.abs(sizes[:, 1] - 0.8 * sizes[:, 0]) <= 1)  # same factor on both axes
    assert A.draw_input_size(rng, (320, 256)) == (320, 256)


def test_bad_config_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown key.*'sclae'"):
        A.draw_params(rng, {"sclae": [0.5, 1.5]})
    with pytest.raises(ValueError, match=r"pipeline.scale must be \[low, high\]"):
        A.draw_params(rng, {"scale": [1.5, 0.5]})
    with pytest.raises(ValueError, match=r"pipeline.stretch\[1\]"):
        A.draw_params(rng, {"stretch": [[0.8, 1.2], 1.0]})
    with pytest.raises(ValueError, match="pipeline.flip"):
        A.draw_params(rng, {"flip": 1.5})
    with pytest.raises(ValueError, match="seed, epoch and index"):
        A.sample_rng(0, -1, 3)


# ------------------------------------------------------------------------------ keyed draws

def test_same_key_same_sample_regardless_of_order():
    img = _image(9, (70, 50))
    boxes = {"gt": _boxes(9, (70, 50))}

    def sample(epoch: int, index: int) -> T.Transformed:
        return A.random_train_transform(img, A.sample_rng(123, epoch, index), FULL, (64, 64),
                                        multi_scale=(0.75, 1.25), boxes=boxes)

    keys = [(e, i) for e in (0, 1) for i in range(6)]
    forward = {k: sample(*k) for k in keys}
    order = np.random.default_rng(0).permutation(len(keys))
    backward = {keys[j]: sample(*keys[j]) for j in order[::-1]}
    for k in keys:
        assert np.array_equal(forward[k].img, backward[k].img), k
        assert np.array_equal(forward[k].warp_matrix, backward[k].warp_matrix), k
        assert np.array_equal(forward[k].boxes["gt"], backward[k].boxes["gt"]), k
    mats = {forward[k].warp_matrix.tobytes() for k in keys}
    assert len(mats) == len(keys), "different keys must give different samples"
    assert A.draw_params(A.sample_rng(1, 0, 0), FULL) != A.draw_params(A.sample_rng(2, 0, 0),
                                                                       FULL)
