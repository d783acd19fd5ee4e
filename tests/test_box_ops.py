"""Parity of ``nanodet_jax.box_ops`` with ``box_ops*.npz`` plus a few invariants.

Tolerance for float outputs and gradients: elementwise ``|ours - ref| <= 1e-5 * (1 + |ref|)``;
priors must be bit-exact. Sizes, strides, max_shape and max_dis are read from the keys.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax import box_ops
from tests.fixtures import fixture_params, load_npz

TOL = 1e-5
FILES = fixture_params("box_ops*.npz")


def _max_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref) / (1.0 + np.abs(ref)), initial=0.0))


def _reg_max(d) -> int:
    return int(d["integral_project_buffer"].shape[0]) - 1


@pytest.mark.parametrize("path", FILES)
def test_integral(path):
    d = load_npz(path)
    reg_max = _reg_max(d)
    np.testing.assert_array_equal(d["integral_project_buffer"], np.arange(reg_max + 1))
    names = sorted(m.group(1) for k in d if (m := re.fullmatch(r"integral_([^_]+)_logits", k)))
    assert names, "no integral_<name>_logits keys"
    for name in names:
        x, cot = jnp.asarray(d[f"integral_{name}_logits"]), d[f"integral_{name}_cotangent"]
        out, vjp = jax.vjp(lambda v: box_ops.distribution_project(v, reg_max), x)
        (grad,) = vjp(jnp.asarray(cot))
        assert _max_err(out, d[f"integral_{name}_out"]) <= TOL, name
        assert _max_err(grad, d[f"integral_{name}_grad_logits"]) <= TOL, name


@pytest.mark.parametrize("path", FILES)
def test_distance2bbox(path):
    d = load_npz(path)
    pts, dist = jnp.asarray(d["distance2bbox_points"]), jnp.asarray(d["distance2bbox_distances"])
    assert _max_err(box_ops.distance2bbox(pts, dist), d["distance2bbox_out"]) <= TOL
    h, w = (int(v) for v in d["distance2bbox_max_shape_hw"])
    out = box_ops.distance2bbox(pts, dist, max_shape=(h, w))
    assert _max_err(out, d["distance2bbox_out_max_shape"]) <= TOL


@pytest.mark.parametrize("path", FILES)
def test_bbox2distance(path):
    d = load_npz(path)
    pts, boxes = jnp.asarray(d["bbox2distance_points"]), jnp.asarray(d["bbox2distance_boxes"])
    assert _max_err(box_ops.bbox2distance(pts, boxes), d["bbox2distance_out"]) <= TOL
    clipped = [k for k in d if re.fullmatch(r"bbox2distance_out_max_dis\d+(\.\d+)?", k)]
    assert clipped, "no bbox2distance_out_max_dis<k> key"
    for k in clipped:
        max_dis = float(k[len("bbox2distance_out_max_dis"):])
        assert _max_err(box_ops.bbox2distance(pts, boxes, max_dis), d[k]) <= TOL, k


@pytest.mark.parametrize("path", FILES)
def test_head_style_dist_targets(path):
    """``bbox2distance(points, boxes) / stride`` clipped to ``[0, reg_max - 0.1]``."""
    d = load_npz(path)
    pts, boxes = jnp.asarray(d["bbox2distance_points"]), jnp.asarray(d["bbox2distance_boxes"])
    strides = jnp.asarray(d["head_style_dist_strides"])[:, None]
    out = jnp.clip(box_ops.bbox2distance(pts, boxes) / strides, 0, _reg_max(d) - 0.1)
    assert _max_err(out, d["head_style_dist_targets"]) <= TOL


@pytest.mark.parametrize("path", FILES)
def test_center_priors(path):
    d = load_npz(path)
    pat = re.compile(r"center_priors_h(\d+)_w(\d+)_(stride(\d+)|all)")
    sizes: dict[tuple[int, int], list[int]] = {}
    keys = [(k, m) for k in d if (m := pat.fullmatch(k))]
    assert keys, "no center_priors_* keys"
    for _, m in keys:
        if m.group(4):
            sizes.setdefault((int(m.group(1)), int(m.group(2))), []).append(int(m.group(4)))
    for k, m in keys:
        h, w = int(m.group(1)), int(m.group(2))
        if not m.group(4) and (h, w) not in sizes:
            pytest.fail(f"{k}: no per-stride keys for h{h}_w{w} to take the strides from")
        strides = [int(m.group(4))] if m.group(4) else sorted(sizes[(h, w)])
        out = box_ops.center_priors(h, w, strides)
        assert out.dtype == np.float32 and out.shape == d[k].shape, k
        np.testing.assert_array_equal(out, d[k], err_msg=k)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    pts = jnp.asarray(rng.uniform(0, 300, (64, 2)), jnp.float32)
    dist = jnp.asarray(rng.uniform(0, 50, (64, 4)), jnp.float32)
    boxes = box_ops.distance2bbox(pts, dist)
    np.testing.assert_allclose(box_ops.bbox2distance(pts, boxes), dist, atol=1e-4)


def test_integral_of_one_hot_bins_and_prior_counts():
    reg_max = 7
    bins = jnp.array([0, 3, 6, 7])
    logits = jnp.where(jax.nn.one_hot(bins, reg_max + 1) > 0, 60.0, -60.0).reshape(-1)
    np.testing.assert_allclose(box_ops.distribution_project(logits, reg_max), bins, atol=1e-6)
    for (h, w), n in {(320, 320): 2125, (416, 416): 3598}.items():
        pri = box_ops.center_priors(h, w, [8, 16, 32, 64])
        assert pri.shape == (n, 4)
        np.testing.assert_array_equal(pri[1], [8, 0, 8, 8])
    assert box_ops.center_priors(320, 320, [8, 16, 32, 64])[1600].tolist() == [0, 0, 16, 16]
