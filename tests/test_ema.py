"""``ExpMovingAverager`` parity with ``ema*.npz`` (every run found in every file).

Per run ``<run>/...``: the decay of each update (``decay_used``) and the averaged state after
each update (``ema_after_update``), for the float tensors (params, BN statistics) and the
integer ``num_batches_tracked`` (int64 in torch, int32 here; the float32 average is truncated).

Tolerances:
* ``decay_used``: ``<= 1e-12`` relative under ``jax.enable_x64``; float32 ``<= 1e-6``;
* one update from the reference's previous state: ints exact, floats within ``1e-6`` of the
  terms' magnitude ``|ema| (1 - d) + |value| d`` (XLA may fuse the multiply-adds, so results
  are not bit-identical where the two terms nearly cancel);
* the whole chain of 50 updates from the initial state: ints exact, floats
  ``|ours - ref| <= 1e-6 (1 + |ref|)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nanodet_jax.config import ConfigError, nanodet_plus_recipe
from nanodet_jax.train.ema import (
    averager_base,
    ema_decay,
    ema_init,
    ema_keep,
    ema_update,
)
from tests.fixtures import assert_close, group, keyed_params, load_npz

RUNS = keyed_params("ema*.npz", "iterations")


def _as_port(x: np.ndarray) -> jax.Array:
    """A reference tensor as the port holds it (int64 counters become int32)."""
    x = np.asarray(x)
    return jnp.asarray(x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) else x)


def _run(path, run: str) -> tuple[float, dict]:
    """``(base decay, the run's keys)``; a failing keyed param (reason in ``path``) fails."""
    data = load_npz(path)
    return float(data["config_decay"]), group(data, run)


def _state(tree: dict[str, np.ndarray], k: int | None = None) -> dict[str, jax.Array]:
    return {n: _as_port(v if k is None else v[k]) for n, v in tree.items()}


@pytest.mark.parametrize("path, run", RUNS)
def test_decay_used(path, run):
    base, r = _run(path, run)
    iters, ref = r["iterations"], r["decay_used"]
    with jax.enable_x64(True):
        d64 = np.asarray(ema_decay(jnp.asarray(iters, jnp.int64), base))
        keep64 = np.asarray(ema_keep(jnp.asarray(iters, jnp.int64), base))
    assert d64.dtype == np.float64
    np.testing.assert_allclose(d64, ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(keep64, 1 - ref, rtol=1e-12, atol=0)
    steps = jnp.asarray(iters, jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.jit(ema_decay, static_argnums=1)(steps, base)),
                               ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ema_keep(steps, base)), 1 - ref, rtol=1e-6)


@pytest.mark.parametrize("path, run", RUNS)
def test_each_update_from_reference_state(path, run):
    base, r = _run(path, run)
    init, values, after = group(r, "initial"), group(r, "model_value_per_step"), group(
        r, "ema_after_update")
    assert set(values) == set(after) == set(init)
    update = jax.jit(ema_update, static_argnums=3)
    for k, it in enumerate(r["iterations"]):
        prev = _state(init) if k == 0 else _state(after, k - 1)
        value = _state(values, k)
        got = update(prev, value, jnp.int32(it), base)
        d = r["decay_used"][k]
        for name, ref in after.items():
            ours, ref = np.asarray(got[name]), ref[k]
            assert ours.dtype == prev[name].dtype, name
            if np.issubdtype(ref.dtype, np.integer):
                assert np.array_equal(ours, ref), f"{run} step {k} {name}: {ours} != {ref}"
                continue
            scale = (np.abs(np.asarray(prev[name], np.float64)) * (1 - d)
                     + np.abs(np.asarray(value[name], np.float64)) * d)
            err = np.abs(ours.astype(np.float64) - ref)
            assert np.all(err <= 1e-6 * scale), (
                f"{run} step {k} {name}: max err/scale {np.max(err / scale):.3e}")


@pytest.mark.parametrize("path, run", RUNS)
def test_whole_chain(path, run):
    base, r = _run(path, run)
    values, after = group(r, "model_value_per_step"), group(r, "ema_after_update")
    ema = ema_init(_state(group(r, "initial")))
    update = jax.jit(ema_update, static_argnums=3)
    for k, it in enumerate(r["iterations"]):
        ema = update(ema, _state(values, k), jnp.int32(it), base)
        for name, ref in after.items():
            if np.issubdtype(ref.dtype, np.integer):
                assert np.array_equal(np.asarray(ema[name]), ref[k]), f"{run} {k} {name}"
            else:
                assert_close(f"{run} step {k} {name}", ema[name], ref[k], tol=1e-6)


def test_spec_acceptance_decay_is_weight_of_new_value():
    """Spec §17: d(1) = 0.99900070, d(1000) = 0.60630622 -- weights of the NEW value (the
    old average keeps 1 - d: 0.00099930 and 0.39369378)."""
    d = np.asarray(ema_decay(jnp.array([1, 1000], jnp.int32)), np.float64)
    np.testing.assert_allclose(d, [0.99900070, 0.60630622], atol=5e-8)
    keep = np.asarray(ema_keep(jnp.array([1, 1000], jnp.int32)), np.float64)
    np.testing.assert_allclose(keep, [0.00099930, 0.39369378], atol=5e-9)
    new = ema_update({"w": jnp.zeros(())}, {"w": jnp.ones(())}, 1)
    assert float(new["w"]) == pytest.approx(0.99900070, abs=5e-8)


def test_init_copies_tree_and_dtypes():
    variables = {"params": {"w": jnp.ones((2, 3))},
                 "batch_stats": {"mean": jnp.zeros(3), "n": jnp.array(5, jnp.int32)}}
    ema = ema_init(variables)
    assert jax.tree.structure(ema) == jax.tree.structure(variables)
    assert jax.tree.map(lambda a: a.dtype, ema) == jax.tree.map(lambda a: a.dtype, variables)
    out = ema_update(ema, jax.tree.map(lambda a: a + 7, variables), jnp.int32(1))
    assert out["batch_stats"]["n"].dtype == jnp.int32
    assert int(out["batch_stats"]["n"]) == 11  # trunc(5 * 0.000999 + 12 * 0.999) = 11


def test_averager_base_from_config():
    assert averager_base(ml_collections.ConfigDict(nanodet_plus_recipe())) == 0.9998
    bad = nanodet_plus_recipe()
    bad["model"]["weight_averager"] = {"name": "SWA", "decay": 0.9}
    with pytest.raises(ConfigError, match=r"model\.weight_averager\.name.*ExpMovingAverager"):
        averager_base(bad)
    bad["model"]["weight_averager"] = {"name": "ExpMovingAverager", "decay": 1.5}
    with pytest.raises(ConfigError, match=r"model\.weight_averager\.decay"):
        averager_base(bad)
