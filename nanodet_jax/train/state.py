"""The training state: one pytree holding everything a run needs to continue exactly."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from nanodet_jax.train.ema import ema_init
from nanodet_jax.train.packed import PackedTree

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """``step``: optimizer updates done (int32; the reference's ``global_step``);
    ``params`` / ``batch_stats``: the live model variables; ``opt_state``: optimizer state of
    ``params`` only (BN statistics are not optimised; ``num_batches_tracked`` is an integer
    ``batch_stats`` leaf and never reaches the optimizer); ``ema``: the reference's
    ``ExpMovingAverager`` copy of ``{'params', 'batch_stats'}`` (integer leaves follow its
    truncating rule), stored as a :class:`~nanodet_jax.train.packed.PackedTree` (one flat
    buffer per dtype; :attr:`ema_variables` is the tree); ``rng``: a PRNG key (split once
    per step; kept so a resumed run draws what an uninterrupted one would); ``skipped``:
    updates skipped for a non-finite loss or gradient, ``bad_streak``: how many of the latest
    steps were skipped in a row."""

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any
    rng: Array
    skipped: Array
    bad_streak: Array

    @property
    def variables(self) -> dict:
        """Live ``{'params', 'batch_stats'}`` (what ``model.apply`` takes)."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def ema_variables(self) -> dict:
        """The EMA ``{'params', 'batch_stats'}`` as a tree (what evaluation and exports
        use)."""
        return self.ema.unpack()


def create_train_state(variables: dict, optimizer: optax.GradientTransformation,
                       rng: Array) -> TrainState:
    """A fresh state at step 0 (the EMA starts as a copy of ``variables``, as the
    reference's ``load_from(model)`` at fit start)."""
    # own buffers for every leaf (the state is donated leaf by leaf; an init may share
    # arrays between leaves, e.g. aux_fpn starting as fpn)
    variables = jax.tree.map(jnp.array, variables)

    def zero() -> Array:  # a buffer of its own: the state is donated leaf by leaf
        return jnp.zeros((), jnp.int32)

    return TrainState(step=zero(), params=variables["params"],
                      batch_stats=variables["batch_stats"],
                      opt_state=optimizer.init(variables["params"]),
                      ema=PackedTree.pack(ema_init({"params": variables["params"],
                                                    "batch_stats": variables["batch_stats"]})),
                      rng=rng, skipped=zero(), bad_streak=zero())
