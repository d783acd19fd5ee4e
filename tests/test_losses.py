"""Parity of QFL / DFL / GIoU losses and ``bbox_overlaps`` with ``losses*.npz``.

Cases are discovered from the ``<family>_<case>_loss`` keys; the case name encodes the call:
``[allzero_]weight`` (pass the row weight; ``allzero`` = all-zero weight), ``avgfactor``
(pass the family's documented avg_factor), the reduction (``none|mean|sum``, default
``mean``) and ``lw<x>`` (loss_weight, ``p`` = decimal point). An unparsable case fails.

Tolerance (values and gradients w.r.t. the predictions): elementwise
``|ours - ref| <= 1e-5 * (1 + |ref|)``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax import box_ops, losses
from tests.fixtures import fixture_params, load_npz

TOL = 1e-5
# avg_factor values are not stored in the file; they are documented in the fixture README.
AVG_FACTORS = {("qfl", True): 7.3, ("qfl", False): 13.0, ("dfl", True): 11.5,
               ("giou", True): 9.25}


def _max_err(ours, ref) -> float:
    """Largest ``|ours - ref| / (1 + |ref|)``."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref) / (1.0 + np.abs(ref)), initial=0.0))


def parse_case(family: str, case: str) -> dict:
    """Case name -> call settings ``{weight, allzero, avg_factor, reduction, loss_weight}``."""
    toks = case.split("_")
    out = {"weight": False, "allzero": False, "avg_factor": None, "reduction": "mean",
           "loss_weight": 1.0}
    if toks[:2] == ["allzero", "weight"]:
        out["weight"] = out["allzero"] = True
        toks = toks[2:]
    elif toks[:1] == ["weight"]:
        out["weight"] = True
        toks = toks[1:]
    if toks[:1] == ["avgfactor"]:
        key = (family, out["weight"])
        if key not in AVG_FACTORS:
            pytest.fail(f"{family}_{case}: unknown case: the file does not store avg_factor and "
                        f"the fixture README documents none for {family} with "
                        f"weight={out['weight']} (known: {sorted(AVG_FACTORS)})")
        out["avg_factor"] = AVG_FACTORS[key]
        toks = toks[1:]
    if toks[:1] and toks[0] in ("none", "mean", "sum"):
        out["reduction"] = toks[0]
        toks = toks[1:]
    if toks[:1] and re.fullmatch(r"lw\d+(p\d+)?", toks[0]):
        out["loss_weight"] = float(toks[0][2:].replace("p", "."))
        toks = toks[1:]
    if toks:
        pytest.fail(f"unknown loss case {family}_{case!r} (left over: {toks})")
    return out


def _call(family: str, d: dict, pred, cfg: dict):
    weight = None
    if cfg["weight"]:
        weight = jnp.asarray(d[f"{family}_weight"])
        if cfg["allzero"]:
            weight = jnp.zeros_like(weight)
    kw = dict(weight=weight, avg_factor=cfg["avg_factor"], reduction=cfg["reduction"],
              loss_weight=cfg["loss_weight"])
    if family == "qfl":
        return losses.quality_focal_loss(pred, jnp.asarray(d["qfl_labels"]),
                                         jnp.asarray(d["qfl_label_scores"]), beta=2.0, **kw)
    if family == "dfl":
        return losses.distribution_focal_loss(pred, jnp.asarray(d["dfl_target"]), **kw)
    return losses.giou_loss(pred, jnp.asarray(d["giou_target_boxes"]), eps=1e-6, **kw)


PRED_KEY = {"qfl": "qfl_pred_logits", "dfl": "dfl_pred_logits", "giou": "giou_pred_boxes"}


@pytest.mark.parametrize("family", ["qfl", "dfl", "giou"])
@pytest.mark.parametrize("path", fixture_params("losses*.npz"))
def test_loss_cases(path, family):
    d = load_npz(path)
    cases = sorted(k[len(family) + 1:-len("_loss")] for k in d
                   if k.startswith(family + "_") and k.endswith("_loss"))
    assert cases, f"no {family}_<case>_loss keys in {path}"
    pred = jnp.asarray(d[PRED_KEY[family]])
    cot = jnp.asarray(d[f"{family}_none_cotangent"])
    failures, worst = [], 0.0
    for case in cases:
        cfg = parse_case(family, case)

        def scalar(p, cfg=cfg):
            out = _call(family, d, p, cfg)
            return (jnp.sum(out * cot) if out.ndim else out), out

        (_, value), grad = jax.jit(jax.value_and_grad(scalar, has_aux=True))(pred)
        ref_v, ref_g = d[f"{family}_{case}_loss"], d[f"{family}_{case}_grad_pred"]
        if cfg["allzero"] and ref_v.ndim == 0:
            value = jnp.sum(value)  # 'none' short-circuit is zeros (N,) here, 0-d in the ref
        ev, eg = _max_err(value, ref_v), _max_err(grad, ref_g)
        worst = max(worst, ev, eg)
        if not (ev <= TOL and eg <= TOL):
            failures.append(f"{case}: value err {ev:.3g}, grad err {eg:.3g}")
    print(f"{family}: {len(cases)} cases, max err {worst:.3g}")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("path", fixture_params("losses*.npz"))
def test_bbox_overlaps(path):
    d = load_npz(path)
    keys = sorted(k for k in d if k.startswith("bbox_overlaps_"))
    assert keys, f"no bbox_overlaps_* keys in {path}"
    b1, b2 = jnp.asarray(d["giou_pred_boxes"]), jnp.asarray(d["giou_target_boxes"])
    for k in keys:
        m = re.fullmatch(r"bbox_overlaps_(aligned|pairwise)_(iou|giou)(?:_eps(.+))?", k)
        if m is None:
            pytest.fail(f"unknown bbox_overlaps key {k!r}")
        eps = float(m.group(3)) if m.group(3) else 1e-6
        ref = d[k]
        if m.group(1) == "aligned":
            out = box_ops.bbox_overlaps(b1, b2, mode=m.group(2), is_aligned=True, eps=eps)
        else:
            out = box_ops.bbox_overlaps(b1[: ref.shape[0]], b2[: ref.shape[1]],
                                        mode=m.group(2), eps=eps)
        assert _max_err(out, ref) <= TOL, (k, _max_err(out, ref))


def test_parse_case_rejects_unknown():
    with pytest.raises(pytest.fail.Exception):
        parse_case("qfl", "weight_avgfactor_mean_bogus")
    assert parse_case("giou", "weight_avgfactor_mean_lw2") == {
        "weight": True, "allzero": False, "avg_factor": 9.25, "reduction": "mean",
        "loss_weight": 2.0}


def test_reduction_rules():
    loss = jnp.array([1.0, 2.0, 3.0])
    w = jnp.array([1.0, 0.0, 2.0])
    assert float(losses.weight_reduce_loss(loss, w, "mean", 3.5)) == pytest.approx(7.0 / 3.5)
    np.testing.assert_array_equal(losses.weight_reduce_loss(loss, w, "none", 3.5), [1, 0, 6])
    assert float(losses.weight_reduce_loss(loss, w, "mean")) == pytest.approx(7.0 / 3)
    with pytest.raises(ValueError):
        losses.weight_reduce_loss(loss, w, "sum", 2.0)


def test_giou_allzero_short_circuit_under_jit():
    """All-zero weights give exactly 0 (jit, traced weight) with a zero gradient; any
    positive weight switches back to the real loss."""
    pred = jnp.array([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 5.0]])
    tgt = jnp.array([[1.0, 1.0, 5.0, 5.0], [0.0, 0.0, 2.0, 2.0]])
    f = jax.jit(jax.value_and_grad(
        lambda p, w: losses.giou_loss(p, tgt, w, avg_factor=1.0, loss_weight=2.0)))
    v0, g0 = f(pred, jnp.zeros(2))
    assert float(v0) == 0.0 and not np.any(np.asarray(g0))
    v1, g1 = f(pred, jnp.array([0.0, 1.0]))
    expect = 2.0 * (1.0 - box_ops.bbox_overlaps(pred[1:], tgt[1:], "giou", True))[0]
    assert float(v1) == pytest.approx(float(expect), rel=1e-6)
    assert np.any(np.asarray(g1[1])) and not np.any(np.asarray(g1[0]))


def test_dfl_integer_target_is_plain_cross_entropy():
    logits = jnp.array([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    out = losses.distribution_focal_loss(logits, jnp.array([2.0, 0.5]), reduction="none")
    logp = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(out[0], -logp[0, 2], rtol=1e-6)
    np.testing.assert_allclose(out[1], np.log(4.0), rtol=1e-6)


@pytest.mark.parametrize("z", [0.0, 0.3, 1.0])
def test_bce_gradient_at_zero_logit(z):
    """torch's BCE-with-logits gradient is sigmoid(x) - z, also at x == 0 exactly (zero
    logits occur in real head outputs and in the head-loss fixture)."""
    g = jax.grad(lambda x: losses.bce_with_logits(x, z))(0.0)
    assert float(g) == pytest.approx(0.5 - z, abs=1e-7)
