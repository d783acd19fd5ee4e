"""Whole-tree reductions: the same values as the per-leaf forms, compiled as one reduction."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanodet_jax.train.tree_reduce import all_finite, concat_leaves, global_norm

SHAPES = [(3, 3, 1, 24), (24,), (1, 1, 24, 48), (48,), (), (5, 5, 1, 96), (96,), (7,)]


def _tree(rng, dtype=np.float32, n=8):
    return {f"layer{i}": {"kernel": rng.normal(size=SHAPES[i % len(SHAPES)]).astype(dtype)}
            for i in range(n)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_global_norm_is_optax_tree_norm(dtype):
    tree = _tree(np.random.default_rng(0), dtype)
    with jax.enable_x64(dtype == np.float64):
        tree = jax.tree.map(jnp.asarray, tree)
        got, want = global_norm(tree), optax.tree.norm(tree)
        assert got.dtype == want.dtype == dtype
        ref = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                          for x in jax.tree.leaves(tree)))
        np.testing.assert_allclose(float(got), ref, rtol=1e-6 if dtype == np.float32 else 1e-14)
        np.testing.assert_allclose(float(got), float(want),
                                   rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_concat_leaves_order_and_empty_tree():
    tree = {"b": jnp.arange(3.0).reshape(3, 1), "a": jnp.float32(7.0)}
    np.testing.assert_array_equal(concat_leaves(tree), [7.0, 0.0, 1.0, 2.0])  # leaves order
    assert concat_leaves({}).shape == (0,)
    assert float(global_norm({})) == 0.0 and bool(all_finite({}))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_in_any_leaf(bad):
    rng = np.random.default_rng(1)
    tree = _tree(rng)
    assert bool(all_finite(tree))
    for name in tree:
        broken = jax.tree.map(np.copy, tree)
        broken[name]["kernel"].reshape(-1)[-1] = bad
        assert not bool(all_finite(broken)), name
        assert not np.isfinite(float(global_norm(broken)))
    # large finite values stay finite for all_finite (its answer is not derived from the norm)
    assert bool(all_finite({"x": np.full(4, 3e38, np.float32)}))


def test_whole_tree_reductions_compile_to_a_constant_number_of_kernels():
    """The point of the module: the kernel count of ``global_norm`` + ``all_finite`` does not
    grow with the number of leaves (per-leaf reductions give one kernel per leaf or more)."""
    def kernels(n_leaves, norm, finite):
        tree = jax.tree.map(jnp.asarray, _tree(np.random.default_rng(2), n=n_leaves))
        hlo = jax.jit(lambda t: (norm(t), finite(t))).lower(tree).compile().as_text()
        entry = hlo[hlo.index("\nENTRY"):]
        return len(re.findall(r"= \S+ (?:fusion|reduce|copy|concatenate)\(", entry))

    def per_leaf_finite(t):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)]))

    ours = kernels(16, global_norm, all_finite), kernels(64, global_norm, all_finite)
    assert ours[0] == ours[1] <= 8, ours  # 7 on XLA:CPU 0.10: concat, sum, sqrt, 4 for all()
    # the per-leaf forms this replaces: the count grows with the leaves
    per_leaf = kernels(64, optax.tree.norm, per_leaf_finite)
    assert per_leaf >= 64, per_leaf
