"""Dynamic Soft Label Assigner: parity with the reference fixtures and invariants."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.assigner import (
    assign_and_build_targets,
    assign_and_build_targets_batch,
    assign_costs,
    dsl_assign,
)
from nanodet_jax.box_ops import center_priors, distance2bbox

from .fixtures import fixture_params, keyed_params, load_npz

TARGET_KEYS = ("labels", "label_scores", "label_weights", "bbox_targets", "dist_targets",
               "num_pos")


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> dict[str, np.ndarray]:
    return load_npz(path)


def _case(path, case: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    data = _load(path) if not isinstance(path, str) else load_npz(path)
    p = case + "/"
    return {k[len(p):]: v for k, v in data.items() if k.startswith(p)}, data["priors"]


def _num_classes(c: dict[str, np.ndarray]) -> int:
    """Class count of a case = width of its logits; it is also the background label."""
    return c["pred_logits"].shape[-1]


def _pad_gts(boxes: np.ndarray, labels: np.ndarray, g_max: int, seed: int = 0):
    """Pad to ``g_max`` with garbage (image-covering, NaN, inverted boxes; wild labels)."""
    rng = np.random.default_rng(seed)
    g = boxes.shape[0]
    garbage = np.stack([np.array([-1e3, -1e3, 1e4, 1e4], np.float32),
                        np.array([np.nan, 0.0, np.nan, 50.0], np.float32),
                        np.array([300.0, 300.0, 5.0, 5.0], np.float32)])
    pb = np.empty((g_max, 4), np.float32)
    pb[:g] = boxes
    pb[g:] = garbage[rng.integers(0, len(garbage), g_max - g)]
    pl = rng.choice(np.array([-1, 0, 3, 10**6]), g_max).astype(np.int32)
    pl[:g] = labels
    return pb, pl, np.arange(g_max) < g


_targets_jit = jax.jit(assign_and_build_targets, static_argnames=("num_classes",))
_targets_batch_jit = jax.jit(assign_and_build_targets_batch, static_argnames=("num_classes",))


def _check_against_fixture(c: dict[str, np.ndarray], assign, targets) -> None:
    ref_gt = c["out_assigned_gt_inds"] - 1  # fixture: 0 = negative, j + 1 = GT j
    np.testing.assert_array_equal(np.asarray(assign.assigned_gt), ref_gt)
    np.testing.assert_array_equal(np.asarray(assign.fg), ref_gt >= 0)
    ref_labels = np.where(ref_gt >= 0, c["out_assigned_labels"], _num_classes(c))
    np.testing.assert_array_equal(np.asarray(targets.labels), ref_labels)
    for k in TARGET_KEYS:
        got, ref = np.asarray(getattr(targets, k)), c["tgt_" + k]
        assert got.shape == ref.shape, k
        if ref.dtype.kind in "iub":
            np.testing.assert_array_equal(got, ref, err_msg=k)
        else:
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=k)
    fg = ref_gt >= 0
    np.testing.assert_allclose(np.asarray(assign.label_scores)[fg], c["out_max_overlaps"][fg],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("path,case", keyed_params("assigner*.npz", "pred_logits"))
def test_assigner_matches_reference_padded(path, case):
    c, priors = _case(path, case)
    g = c["gt_bboxes"].shape[0]
    g_max = 16 * ((g + 5) // 16 + 1)  # strictly more than G, few distinct shapes
    gb, gl, gm = _pad_gts(c["gt_bboxes"], c["gt_labels"], g_max, seed=g)
    a, t = _targets_jit(c["pred_logits"], c["decoded_bboxes"], priors, gb, gl, gm,
                        num_classes=_num_classes(c))
    _check_against_fixture(c, a, t)
    assert int(t.num_pos) == int(c["tgt_num_pos"])
    assert np.all(np.asarray(a.assigned_gt) < g)


@pytest.mark.parametrize("path,case", keyed_params("assigner*.npz", "pred_logits"))
def test_assigner_costs_match_reference_debug(path, case):
    """Valid mask, IoUs, cost matrix and dynamic k against the reference's internals."""
    c, priors = _case(path, case)
    if "dbg_valid_mask" not in c:  # early-exit cases: nothing is inside any GT, or no GT
        costs = assign_costs(c["pred_logits"], c["decoded_bboxes"], priors, c["gt_bboxes"],
                             c["gt_labels"], np.ones(c["gt_labels"].shape, bool))
        assert not np.any(np.asarray(costs.valid))
        assert np.all(c["out_assigned_gt_inds"] == 0)
        return
    g = c["gt_bboxes"].shape[0]
    gb, gl, gm = _pad_gts(c["gt_bboxes"], c["gt_labels"], g + 3, seed=1)
    costs = jax.jit(assign_costs)(c["pred_logits"], c["decoded_bboxes"], priors, gb, gl, gm)
    valid = np.asarray(costs.valid)
    np.testing.assert_array_equal(valid, c["dbg_valid_mask"])
    ious = np.asarray(costs.ious).T[valid][:, :g]  # (G, P) -> valid rows of (P, G)
    np.testing.assert_allclose(ious, c["dbg_pairwise_ious"], rtol=0, atol=1e-6)
    cost = np.asarray(costs.cost).T[valid][:, :g]
    np.testing.assert_allclose(cost, c["dbg_cost_matrix"], rtol=1e-6, atol=1e-6)
    assert np.all(np.isposinf(np.asarray(costs.cost)[:, ~valid]))
    assert np.all(np.isposinf(np.asarray(costs.cost)[g:]))
    np.testing.assert_array_equal(np.asarray(costs.dynamic_ks)[:g], c["dbg_dynamic_ks"])
    np.testing.assert_array_equal(np.asarray(costs.dynamic_ks)[g:], 0)


@pytest.mark.parametrize("path", fixture_params("assigner*.npz"))
def test_assigner_fixture_priors_match_input_hw(path):
    """The file's ``priors`` are the head's priors for its ``input_hw`` (strides read from the
    priors' stride column): the cases above run on exactly the reference's priors."""
    data = _load(path) if not isinstance(path, str) else load_npz(path)
    h, w = (int(v) for v in data["input_hw"])
    strides = sorted({int(s) for s in data["priors"][:, 2]})
    np.testing.assert_array_equal(center_priors(h, w, strides), data["priors"])


@pytest.mark.parametrize("path", fixture_params("assigner*.npz"))
def test_assigner_batched_vmap(path):
    """All cases of a file in one vmapped, jitted call with a common G_max."""
    params = [p for p in keyed_params("assigner*.npz", "pred_logits") if p.values[0] == path]
    cases = [_case(path, p.values[1]) for p in params]
    assert cases
    priors = cases[0][1]
    g_max = max(c["gt_bboxes"].shape[0] for c, _ in cases) + 3
    padded = [_pad_gts(c["gt_bboxes"], c["gt_labels"], g_max, seed=i)
              for i, (c, _) in enumerate(cases)]
    stack = [np.stack(x) for x in zip(*padded)]
    a, t = _targets_batch_jit(np.stack([c["pred_logits"] for c, _ in cases]),
                              np.stack([c["decoded_bboxes"] for c, _ in cases]), priors,
                              *stack, num_classes=_num_classes(cases[0][0]))
    for i, (c, _) in enumerate(cases):
        _check_against_fixture(c, jax.tree.map(lambda x, i=i: x[i], a),
                               jax.tree.map(lambda x, i=i: x[i], t))


# --------------------------------------------------------------------------- invariants

H = W = 128
C = 5
G_MAX = 8
PRIORS = center_priors(H, W, (8, 16, 32, 64))


def _random_image(seed: int, n_gt: int, tiny: bool = False):
    rng = np.random.default_rng(seed)
    p = PRIORS.shape[0]
    logits = rng.normal(0, 2, (p, C)).astype(np.float32)
    dist = rng.uniform(0, 5, (p, 4)).astype(np.float32) * PRIORS[:, 2:3]
    boxes = np.asarray(distance2bbox(PRIORS[:, :2], dist))
    xy = rng.uniform(-10, 120, (n_gt, 2))
    wh = rng.uniform(0, 70, (n_gt, 2)) * (rng.uniform(size=(n_gt, 1)) > 0.1)  # some degenerate
    gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    if tiny and n_gt:  # a 5x5 box strictly between prior points: contains no prior
        gt[0] = [1.0, 1.0, 6.0, 6.0]
    labels = rng.integers(0, C, n_gt).astype(np.int32)
    gb, gl, gm = _pad_gts(gt, labels, G_MAX, seed=seed)
    return logits, boxes, gb, gl, gm


_assign_jit = jax.jit(dsl_assign)


def _numpy_reference(logits, boxes, gt, labels):
    """Straightforward per-spec DSLA on the valid subset with the full (V, G, C) cost."""
    p = logits.shape[0]
    out = np.full(p, -1)
    if gt.shape[0] == 0:
        return out
    pts = PRIORS[:, None, :2]
    d = np.concatenate([pts - gt[None, :, :2], gt[None, :, 2:] - pts], -1).min(-1)
    valid = (d > 0).any(1)
    if not valid.any():
        return out
    b, x = boxes[valid], logits[valid].astype(np.float64)
    lt = np.maximum(b[:, None, :2], gt[None, :, :2])
    rb = np.minimum(b[:, None, 2:], gt[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    iou = inter / np.maximum(area(b)[:, None] + area(gt)[None] - inter, 1e-6)
    soft = np.eye(C)[labels][None] * iou[..., None]                      # (V, G, C)
    xs = np.broadcast_to(x[:, None, :], soft.shape)
    sig = 1 / (1 + np.exp(-xs))
    bce = (1 - soft) * xs + np.log1p(np.exp(-xs))
    cost = (bce * np.abs(soft - sig) ** 2).sum(-1) - 3.0 * np.log(iou + 1e-7)
    kc = min(13, b.shape[0])
    ks = np.maximum(np.sort(iou, 0)[::-1][:kc].sum(0).astype(int), 1)
    m = np.zeros_like(cost)
    for j in range(gt.shape[0]):
        m[np.argsort(cost[:, j], kind="stable")[: ks[j]], j] = 1
    multi = m.sum(1) > 1
    m[multi] = 0
    m[multi, cost[multi].argmin(1)] = 1
    sub = np.where(m.sum(1) > 0, m.argmax(1), -1)
    out[valid] = sub
    return out


@pytest.mark.parametrize("seed", range(12))
def test_assigner_matches_numpy_reference_random(seed):
    n_gt = seed % (G_MAX + 1)
    logits, boxes, gb, gl, gm = _random_image(seed, n_gt, tiny=seed % 4 == 1)
    a = _assign_jit(logits, boxes, PRIORS, gb, gl, gm)
    ref = _numpy_reference(logits, boxes, gb[:n_gt], gl[:n_gt])
    np.testing.assert_array_equal(np.asarray(a.assigned_gt), ref)


@pytest.mark.parametrize("seed", range(100, 106))
def test_assigner_invariants_random(seed):
    n_gt = 2 + seed % 6
    logits, boxes, gb, gl, gm = _random_image(seed, n_gt)
    a = _assign_jit(logits, boxes, PRIORS, gb, gl, gm)
    costs = assign_costs(logits, boxes, PRIORS, gb, gl, gm)
    fg, gt_idx = np.asarray(a.fg), np.asarray(a.assigned_gt)
    assert np.array_equal(fg, gt_idx >= 0)
    assert np.all(gt_idx < n_gt)  # padding GTs never assigned
    pts = PRIORS[:, None, :2]
    real = gb[:n_gt]
    inside = (np.concatenate([pts - real[None, :, :2], real[None, :, 2:] - pts], -1)
              .min(-1) > 0)
    assert np.all(inside[fg].any(1))  # every positive lies inside some (real) GT
    ks = np.asarray(costs.dynamic_ks)
    assert ks.max() <= 13 and np.all(ks[:n_gt] >= 1) and np.all(ks[n_gt:] == 0)
    assert fg.sum() <= ks.sum()
    # each GT selects its k_g <= 13 cheapest valid priors; a prior selected once goes to that
    # GT, a prior selected by several GTs goes to its cheapest GT over all real GTs
    cost = np.asarray(costs.cost).T  # (P, G)
    sel = np.zeros((PRIORS.shape[0], n_gt), bool)
    for j in range(n_gt):
        sel[np.argsort(cost[:, j], kind="stable")[: ks[j]], j] = True
    sel &= np.asarray(costs.valid)[:, None]
    assert np.all(sel.sum(0) <= 13)
    n_sel = sel.sum(1)
    np.testing.assert_array_equal(fg, n_sel > 0)
    single = n_sel == 1
    np.testing.assert_array_equal(gt_idx[single], sel[single].argmax(1))
    np.testing.assert_array_equal(gt_idx[n_sel > 1], cost[n_sel > 1, :n_gt].argmin(1))
    assert np.all(np.bincount(gt_idx[single], minlength=n_gt) <= 13)
    np.testing.assert_allclose(np.asarray(a.label_scores)[fg],
                               np.asarray(costs.ious)[gt_idx[fg], fg], rtol=0, atol=1e-6)
    assert np.all(np.asarray(a.label_scores)[~fg] == 0)

    # permuting the GTs (and interleaving the padding slots) permutes the assignment
    perm = np.random.default_rng(seed).permutation(G_MAX)
    a2 = _assign_jit(logits, boxes, PRIORS, gb[perm], gl[perm], gm[perm])
    inv = np.argsort(perm)
    np.testing.assert_array_equal(np.asarray(a2.fg), fg)
    np.testing.assert_array_equal(np.asarray(a2.assigned_gt)[fg], inv[gt_idx[fg]])
    np.testing.assert_array_equal(np.asarray(a2.label_scores), np.asarray(a.label_scores))


def test_assigner_zero_gt_and_empty_priors():
    logits, boxes, gb, gl, _ = _random_image(7, 4)
    a, t = _targets_jit(logits, boxes, PRIORS, gb, gl, np.zeros(G_MAX, bool), num_classes=C)
    assert not np.any(np.asarray(a.fg)) and int(t.num_pos) == 0
    assert np.all(np.asarray(t.labels) == C) and np.all(np.asarray(t.label_weights) == 1)
    assert np.all(np.asarray(t.bbox_targets) == 0) and np.all(np.asarray(t.dist_targets) == 0)
    assert np.all(np.isfinite(np.asarray(t.label_scores)))
    # one real GT that contains no prior point: early-exit path, no positive
    gb2 = gb.copy()
    gb2[0] = [1.0, 1.0, 6.0, 6.0]
    a = _assign_jit(logits, boxes, PRIORS, gb2, gl, np.arange(G_MAX) < 1)
    assert not np.any(np.asarray(a.fg))
    # a GT on prior coordinates: strictly-inside test (edges are not inside)
    gb3 = gb.copy()
    gb3[0] = [8.0, 8.0, 16.0, 16.0]  # prior (8, 8) and (16, 16) lie on the edges
    costs = assign_costs(logits, boxes, PRIORS, gb3, gl, np.arange(G_MAX) < 1)
    assert not np.any(np.asarray(costs.valid))


def test_assigner_jit_batch_shapes():
    imgs = [_random_image(s, s % 5) for s in range(3)]
    x, b, gb, gl, gm = (np.stack(z) for z in zip(*imgs))
    gm[2] = False
    a, t = _targets_batch_jit(x, b, PRIORS, gb, gl, gm, num_classes=C)
    p = PRIORS.shape[0]
    assert a.assigned_gt.shape == (3, p) and t.dist_targets.shape == (3, p, 4)
    assert t.num_pos.shape == (3,) and int(t.num_pos[2]) == 0
    for i in range(3):
        single = _assign_jit(x[i], b[i], PRIORS, gb[i], gl[i], gm[i])
        np.testing.assert_array_equal(np.asarray(a.assigned_gt[i]),
                                      np.asarray(single.assigned_gt))
    # the assigner never back-propagates into its inputs
    g = jax.grad(lambda z: jnp.sum(dsl_assign(z, b[0], PRIORS, gb[0], gl[0], gm[0])
                                   .label_scores))(x[0])
    assert np.all(np.asarray(g) == 0)
