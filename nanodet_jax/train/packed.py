"""Train-state trees the step never reads leaf by leaf, stored as one flat vector per dtype.

Why: XLA:CPU compiles one kernel per output buffer of the train step. The EMA (every
parameter and BatchNorm buffer) and Adam's two moments are ~1,800 of NanoDet-Plus's ~2,700
state leaves; updated leaf by leaf they are ~1,800 kernel instances that every HLO pass and
the thunk emitter walk. Stored flat, each is updated by one elementwise kernel over the
concatenated leaves. The m_320 batch-8 train step's lowering + compile went from 27.6-28.7
to 21.9-23.1 s (README, Performance); the arithmetic is the same, element by element.

* :class:`PackedTree`: a pytree of arrays as ``buffers`` (one ``(N_d,)`` vector per dtype, in
  order of first appearance) and a static layout. :meth:`PackedTree.pack` /
  :meth:`PackedTree.unpack` convert exactly (bit for bit; unpack is jitted, so it works on
  global arrays of a multi-host mesh). The EMA is one (``TrainState.ema``).
* :func:`unravel_at`: the inverse of :func:`~nanodet_jax.train.tree_reduce.concat_leaves`
  (a tree as one vector of its promoted dtype). It slices at **runtime** offsets
  (``starts``, int32 scalars that live in the train state): with static offsets every leaf's
  slice would be a distinct kernel to compile, with runtime ones all leaves of one shape
  share one. The optimizer, which runs on one flat vector (``optim.flat``), uses them.
* :func:`tree_view` / :func:`from_tree_view`: a state with every ``PackedTree`` replaced by
  its tree and back (checkpoints keep the per-leaf layout on disk: ``ema/params/...``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


@flax.struct.dataclass
class PackedTree:
    """A pytree stored as one flat vector per dtype.

    ``buffers``: ``(N_d,)`` per dtype group (the pytree's leaves); ``treedef``, ``groups``
    (dtype per buffer) and ``leaves`` (per leaf: buffer index, offset, shape) are static.
    """

    buffers: tuple[Array, ...]
    treedef: Any = flax.struct.field(pytree_node=False)
    groups: tuple[str, ...] = flax.struct.field(pytree_node=False)
    leaves: tuple[tuple[int, int, tuple[int, ...]], ...] = flax.struct.field(pytree_node=False)

    @classmethod
    def pack(cls, tree: Any) -> PackedTree:
        """``tree`` (arrays) packed; its leaves keep their dtypes (one buffer per dtype)."""
        values, treedef = jax.tree.flatten(tree)
        groups: list[str] = []
        sizes: list[int] = []
        leaves = []
        for v in values:
            name = jnp.dtype(v.dtype).name
            if name not in groups:
                groups.append(name)
                sizes.append(0)
            g = groups.index(name)
            leaves.append((g, sizes[g], tuple(np.shape(v))))
            sizes[g] += int(np.size(v))
        packed = cls((), treedef, tuple(groups), tuple(leaves))
        return packed.replace(buffers=packed.pack_values(tree))

    def pack_values(self, tree: Any) -> tuple[Array, ...]:
        """The buffers of ``tree`` (same structure, shapes and dtypes) in this layout."""
        values = self.treedef.flatten_up_to(tree)
        parts: list[list[Array]] = [[] for _ in self.groups]
        for (g, _, _), v in zip(self.leaves, values, strict=True):
            parts[g].append(jnp.ravel(v).astype(self.groups[g]))
        return tuple(jnp.concatenate(p) if len(p) > 1 else p[0] for p in parts)

    def unpack(self) -> Any:
        """The tree (each leaf a copy of its slice, bit for bit)."""
        return _unpack(self.buffers, self.treedef, self.leaves)


@partial(jax.jit, static_argnums=(1, 2))
def _unpack(buffers: tuple[Array, ...], treedef: Any,
            leaves: tuple[tuple[int, int, tuple[int, ...]], ...]) -> Any:
    values = [lax.slice(buffers[g], (start,), (start + int(np.prod(shape, dtype=np.int64)),))
              .reshape(shape) for g, start, shape in leaves]
    return jax.tree.unflatten(treedef, values)


def leaf_starts(tree: Any) -> tuple[Array, ...]:
    """int32 ``()`` per leaf of ``tree``: where it starts in ``concat_leaves(tree)`` (each its own
    buffer: a train state is donated leaf by leaf)."""
    starts = np.cumsum([0] + [int(np.size(x)) for x in jax.tree.leaves(tree)])[:-1]
    return tuple(jnp.array(s, jnp.int32) for s in starts)


def unravel_at(flat: Array, starts: tuple[Array, ...], like: Any) -> Any:
    """The inverse of ``concat_leaves``: a tree shaped and typed like ``like`` whose leaves are
    ``flat[starts[i] : starts[i] + size_i]``. ``starts`` are runtime values
    (:func:`leaf_starts`), so that XLA compiles one kernel per leaf shape."""
    values, treedef = jax.tree.flatten(like)
    out = [lax.dynamic_slice(flat, (s,), (int(np.size(v)),)).reshape(np.shape(v))
           .astype(v.dtype) for s, v in zip(starts, values, strict=True)]
    return jax.tree.unflatten(treedef, out)


def _is_packed(x: Any) -> bool:
    return isinstance(x, PackedTree)


def tree_view(tree: Any) -> Any:
    """``tree`` with every :class:`PackedTree` in it unpacked."""
    return jax.tree.map(lambda x: x.unpack() if _is_packed(x) else x, tree, is_leaf=_is_packed)


def from_tree_view(template: Any, view: Any) -> Any:
    """The inverse of :func:`tree_view`: ``view``'s values in ``template``'s structure (each
    :class:`PackedTree` of ``template`` packed again, with its buffers' shardings)."""

    def restore(t: Any, v: Any) -> Any:
        if not _is_packed(t):
            return v
        shardings = tuple(getattr(b, "sharding", None) for b in t.buffers)
        out = (None if any(s is None for s in shardings) else shardings)
        return t.replace(buffers=jax.jit(t.pack_values, out_shardings=out)(v))

    return jax.tree.map(restore, template, view, is_leaf=_is_packed)
