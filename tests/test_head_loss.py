"""NanoDet-Plus head loss (with / without AGM): parity with the reference fixtures."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.box_ops import center_priors
from nanodet_jax.head_loss import HeadLossConfig, head_loss, head_loss_and_targets

from .fixtures import keyed_params, load_npz

TARGET_FIELDS = ("labels", "label_scores", "label_weights", "bbox_targets", "dist_targets",
                 "num_pos")


@functools.lru_cache(maxsize=2)
def _load(path: Path) -> dict[str, np.ndarray]:
    return load_npz(path)


def _image_gts(data: dict[str, np.ndarray], group: str, i: int):
    """GT of image ``i`` for ``group``: the group's own ``gt_*/img{i}`` if present; else the
    shared top-level ``gt_*/img{i}`` when the group stores the targets it was assigned with
    (``with_aux``, ``no_aux``); else no GT, which the fixture README defines only for the
    ``*empty_gt*`` groups (a call without any GT). Any other group fails: which GTs it used
    cannot be read from the file."""
    if f"{group}/gt_bboxes/img{i}" in data:
        return data[f"{group}/gt_bboxes/img{i}"], data[f"{group}/gt_labels/img{i}"]
    if any(k.startswith(f"{group}/targets/") for k in data):
        if f"gt_bboxes/img{i}" not in data:
            pytest.fail(f"{group}: targets stored but no gt_bboxes/img{i} in the file")
        return data[f"gt_bboxes/img{i}"], data[f"gt_labels/img{i}"]
    if "empty_gt" not in group:
        pytest.fail(f"head-loss group {group!r} has neither its own gt_*/img{i} nor targets: "
                    "unknown case (the README defines GT-less groups as '*empty_gt*')")
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


def _pad(gts, extra: int = 3):
    """Stack per-image GTs to ``(B, G_max, ...)`` with garbage in the padding slots."""
    g_max = max(g.shape[0] for g, _ in gts) + extra
    b = len(gts)
    boxes = np.tile(np.array([-50.0, -50.0, 1e4, 1e4], np.float32), (b, g_max, 1))
    boxes[:, 1::2] = np.array([np.nan, 3.0, 2.0, np.nan], np.float32)
    labels = np.full((b, g_max), 10**6, np.int32)
    mask = np.zeros((b, g_max), bool)
    for i, (g, lab) in enumerate(gts):
        boxes[i, : len(g)], labels[i, : len(g)], mask[i, : len(g)] = g, lab, True
    return boxes, labels, mask


@functools.partial(jax.jit, static_argnames=("input_hw", "cfg"))
def _loss_and_grads(preds, aux_preds, gt_boxes, gt_labels, gt_mask, input_hw, cfg):
    def f(p, a):
        total, states, targets = head_loss_and_targets(p, a, gt_boxes, gt_labels, gt_mask,
                                                       input_hw, cfg)
        return total, (states, targets)

    argnums = (0, 1) if aux_preds is not None else 0
    return jax.value_and_grad(f, argnums=argnums, has_aux=True)(preds, aux_preds)


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / den) if den > 0 else float(np.linalg.norm(got))


def _config(data: dict[str, np.ndarray]) -> HeadLossConfig:
    """Class count from the file, reg_max from the width of ``preds`` (C + 4 (reg_max + 1));
    strides (not stored) are the config's [8, 16, 32, 64] and must give the file's prior
    count for its ``input_hw``; loss weights / topk are the reference config's."""
    num_classes = int(data["num_classes"])
    ch = data["preds"].shape[-1] - num_classes
    assert ch > 0 and ch % 4 == 0, f"preds width {data['preds'].shape[-1]} != C + 4 * bins"
    cfg = HeadLossConfig(num_classes=num_classes, reg_max=ch // 4 - 1)
    hw = tuple(int(v) for v in data["input_hw"])
    n = center_priors(*hw, cfg.strides).shape[0]
    assert n == data["preds"].shape[1], (
        f"strides {cfg.strides} give {n} priors for input_hw {hw}, the file has "
        f"{data['preds'].shape[1]}: unknown head strides")
    return cfg


def _setup(path, group):
    data = _load(path) if not isinstance(path, str) else load_npz(path)
    cfg = _config(data)
    hw = tuple(int(v) for v in data["input_hw"])
    b = data[f"{group}/grad_preds"].shape[0]
    has_aux = f"{group}/aux_loss_qfl" in data
    preds = data["preds"][:b]
    aux = data["aux_preds"][:b] if has_aux else None
    gts = [_image_gts(data, group, i) for i in range(b)]
    return data, cfg, hw, b, preds, aux, gts


@pytest.mark.parametrize("path,group", keyed_params("head_loss*.npz", "loss_total"))
def test_head_loss_matches_reference(path, group):
    data, cfg, hw, b, preds, aux, gts = _setup(path, group)
    gb, gl, gm = _pad(gts)
    (total, (states, targets)), grads = _loss_and_grads(preds, aux, gb, gl, gm, hw, cfg)

    names = ["loss_qfl", "loss_bbox", "loss_dfl"]
    names += ["aux_" + n for n in names] if aux is not None else []
    assert sorted(states) == sorted(names)
    for n in [*names, "loss_total"]:
        got = float(total if n == "loss_total" else states[n])
        ref = float(data[f"{group}/{n}"])
        assert abs(got - ref) <= 1e-5 * abs(ref), (n, got, ref)

    grads = grads if aux is not None else (grads,)
    for n, g in zip(("grad_preds", "grad_aux_preds"), grads):
        ref = data[f"{group}/{n}"]
        assert g.shape == ref.shape
        assert _rel(g, ref) <= 1e-4, (n, _rel(g, ref))
        c = cfg.num_classes  # box-bin part separately: much smaller than the class part
        assert _rel(g[..., c:], ref[..., c:]) <= 1e-4, (n, "reg", _rel(g[..., c:], ref[..., c:]))

    for i in range(b):
        t = {k[len(f"{group}/targets/img{i}/"):]: v for k, v in data.items()
             if k.startswith(f"{group}/targets/img{i}/")}
        for k, ref in t.items():
            got = np.asarray(getattr(targets, k)[i])
            if ref.dtype.kind in "iub":
                np.testing.assert_array_equal(got, ref, err_msg=f"img{i}/{k}")
            else:
                np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=f"img{i}/{k}")
        if t:
            assert set(t) == set(TARGET_FIELDS)


@pytest.mark.parametrize("path,group", keyed_params("head_loss*.npz", "loss_total"))
def test_head_loss_wrapper_and_padding_independent(path, group):
    """``head_loss`` equals the targets variant and does not depend on G_max / padding."""
    data, cfg, hw, b, preds, aux, gts = _setup(path, group)
    fn = jax.jit(head_loss, static_argnames=("input_hw", "cfg"))
    t1, s1 = fn(preds, aux, *_pad(gts, extra=1), input_hw=hw, cfg=cfg)
    t2, s2 = fn(preds, aux, *_pad(gts, extra=9), input_hw=hw, cfg=cfg)
    np.testing.assert_allclose(float(t1), float(data[f"{group}/loss_total"]), rtol=1e-5)
    for k in s1:
        np.testing.assert_allclose(float(s1[k]), float(s2[k]), rtol=1e-6, atol=0)


def test_head_loss_no_positive_and_degenerate_gts():
    """No positives (GT containing no prior) -> zero box terms with finite, zero box grads;
    degenerate / partly outside GTs keep everything finite."""
    cfg = HeadLossConfig(num_classes=4)
    hw = (64, 96)
    p = center_priors(*hw, cfg.strides).shape[0]
    rng = np.random.default_rng(0)
    preds = rng.normal(0, 1, (2, p, 4 + 32)).astype(np.float32)
    aux = rng.normal(0, 1, (2, p, 4 + 32)).astype(np.float32)
    gts = [(np.array([[1.0, 1.0, 6.0, 6.0]], np.float32), np.array([2])),
           (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))]
    (total, (states, targets)), (gp, ga) = _loss_and_grads(preds, aux, *_pad(gts), hw, cfg)
    assert int(jnp.sum(targets.num_pos)) == 0
    for n in ("loss_bbox", "loss_dfl", "aux_loss_bbox", "aux_loss_dfl"):
        assert float(states[n]) == 0.0
    assert np.all(np.asarray(gp)[..., 4:] == 0) and np.all(np.asarray(ga)[..., 4:] == 0)
    assert np.all(np.isfinite(np.asarray(gp))) and np.all(np.isfinite(np.asarray(ga)))
    assert np.isfinite(float(total)) and float(total) > 0

    gts = [(np.array([[10.0, 10.0, 10.0, 40.0], [-20.0, 5.0, 50.0, 70.0],
                      [30.0, 20.0, 90.0, 60.0]], np.float32), np.array([0, 1, 3])),
           (np.array([[0.0, 0.0, 96.0, 64.0]], np.float32), np.array([2]))]
    (total, (states, targets)), (gp, ga) = _loss_and_grads(preds, aux, *_pad(gts), hw, cfg)
    assert int(jnp.sum(targets.num_pos)) > 0
    assert all(np.isfinite(float(v)) and float(v) > 0 for v in states.values())
    assert np.all(np.isfinite(np.asarray(gp))) and np.all(np.isfinite(np.asarray(ga)))
    assert np.any(np.asarray(gp)[..., 4:] != 0)
