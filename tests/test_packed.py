"""Flat train-state storage (``nanodet_jax.train.packed``): exact round trips, the EMA and Adam
in flat form equal to their per-leaf forms, and the point of it all: the number of compiled
kernels does not grow with the number of leaves."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.train.ema import ema_update
from nanodet_jax.train.packed import (
    PackedTree,
    from_tree_view,
    leaf_starts,
    tree_view,
    unravel_at,
)
from nanodet_jax.train.tree_reduce import concat_leaves


def _variables(seed: int = 0) -> dict:
    """A variables-like tree with float32, int32 and bfloat16 leaves and a scalar."""
    rng = np.random.default_rng(seed)
    return {"params": {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
                                "bias": rng.standard_normal(4).astype(np.float32)},
                       "half": jnp.asarray(rng.standard_normal(5), jnp.bfloat16)},
            "batch_stats": {"mean": rng.standard_normal(4).astype(np.float32),
                            "count": np.asarray(7 + seed, np.int32)}}


def _assert_trees_equal(got, want) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == np.shape(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pack_unpack_round_trip_is_exact_with_one_buffer_per_dtype():
    tree = _variables()
    packed = PackedTree.pack(tree)
    assert packed.groups == ("int32", "float32", "bfloat16")  # first seen in leaf order
    assert [b.shape for b in packed.buffers] == [(1,), (4 + 4 + 3 * 3 * 2 * 4,), (5,)]
    assert [b.dtype.name for b in packed.buffers] == list(packed.groups)
    _assert_trees_equal(packed.unpack(), tree)
    _assert_trees_equal(jax.jit(lambda p: p.unpack())(packed), tree)  # inside a jit too
    # values of another tree of the same structure, in the same layout
    other = _variables(1)
    _assert_trees_equal(packed.replace(buffers=packed.pack_values(other)).unpack(), other)


def test_pack_values_refuses_another_structure():
    packed = PackedTree.pack(_variables())
    with pytest.raises(ValueError):
        packed.pack_values({"params": {}})


def test_unravel_at_inverts_concat_leaves_at_runtime_offsets():
    tree = jax.tree.map(jnp.asarray, _variables()["params"])
    tree["half"] = tree["half"].astype(jnp.float32)
    starts = leaf_starts(tree)
    assert [int(s) for s in starts] == [0, 4, 76]  # conv.bias, conv.kernel, half (key order)
    flat = concat_leaves(tree)
    _assert_trees_equal(jax.jit(unravel_at)(flat, starts, tree), tree)
    # leaves keep their own dtype when the flat vector is wider
    like = {"a": jnp.zeros(2, jnp.bfloat16), "b": jnp.zeros((1, 2), jnp.float32)}
    out = unravel_at(jnp.arange(4.0), leaf_starts(like), like)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].tolist() == [[2.0, 3.0]]


def test_leaf_starts_are_separate_buffers():
    """A train state is donated leaf by leaf: no two start offsets may share a buffer."""
    starts = leaf_starts({"a": jnp.zeros(3), "b": jnp.zeros(3), "c": jnp.zeros(3)})
    ptrs = [s.unsafe_buffer_pointer() for s in starts]
    assert len(set(ptrs)) == len(ptrs)


def _distinct_kernels(n_leaves: int, fn) -> int:
    """Distinct fused computations XLA compiles for ``fn`` on ``n_leaves`` (4, 4) leaves."""
    tree = {f"w{i:03d}": jnp.full((4, 4), float(i)) for i in range(n_leaves)}
    hlo = jax.jit(fn).lower(tree, leaf_starts(tree)).compile().as_text()
    bodies = re.findall(r"\n%?(fused\S*|wrapped\S*) .*?\{\n(.*?)\n\}", hlo, re.S)
    # a kernel's identity: its body without instruction names and metadata
    return len({re.sub(r"%[\w.\-]+|, metadata=\{[^}]*\}", "", body) for _, body in bodies})


def test_runtime_offsets_compile_one_kernel_per_leaf_shape():
    """The point of ``unravel_at``: with runtime offsets the slices of equally shaped leaves
    share one compiled kernel; with static offsets each leaf is a kernel of its own."""
    def runtime(tree, starts):
        flat = concat_leaves(tree) * 2.0
        return unravel_at(flat, starts, tree)

    def static(tree, starts):
        del starts
        flat = concat_leaves(tree) * 2.0
        return jax.tree.unflatten(jax.tree.structure(tree), [
            jax.lax.slice(flat, (16 * i,), (16 * i + 16,)).reshape(4, 4)
            for i in range(len(jax.tree.leaves(tree)))])

    ours = _distinct_kernels(8, runtime), _distinct_kernels(32, runtime)
    assert ours[1] <= ours[0] <= 4, ours  # does not grow with the leaves
    assert _distinct_kernels(32, static) >= 32


def test_tree_view_round_trip_keeps_the_packed_layout():
    state = {"step": jnp.int32(3), "ema": PackedTree.pack(_variables()),
             "params": {"w": jnp.ones(2)}}
    view = tree_view(state)
    assert isinstance(view["ema"], dict) and view["step"] is state["step"]
    _assert_trees_equal(view["ema"], _variables())
    back = from_tree_view(state, view)
    assert isinstance(back["ema"], PackedTree)
    assert (back["ema"].treedef, back["ema"].groups, back["ema"].leaves) == (
        state["ema"].treedef, state["ema"].groups, state["ema"].leaves)
    for a, b in zip(back["ema"].buffers, state["ema"].buffers, strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("step", [1, 700])
def test_packed_ema_update_equals_the_per_leaf_update(step):
    """Same elementwise math, float and (truncating) integer leaves, bit for bit (run
    op by op: inside one jit XLA may contract a multiply-add of either form differently)."""
    ema, values = _variables(0), _variables(1)
    ema["params"]["half"] = ema["params"]["half"].astype(jnp.float32)
    values["params"]["half"] = values["params"]["half"].astype(jnp.float32)
    values["batch_stats"]["count"] = np.asarray(1000, np.int32)
    want = ema_update(jax.tree.map(jnp.asarray, ema), values, step)
    got = ema_update(PackedTree.pack(ema), values, step)
    assert isinstance(got, PackedTree)
    _assert_trees_equal(got.unpack(), want)
    assert 7 < int(want["batch_stats"]["count"]) < 1000
