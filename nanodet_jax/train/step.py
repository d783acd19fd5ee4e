"""The one jit-compiled training step.

``train_step(state, batch, detach) -> (state, metrics)``: train-mode forward with the AGM,
assignment, both head losses (``nanodet_jax.objective``), gradients, the optimizer (grad
clip + the reference's optimizer with the learning rate computed from ``state.step``), the
EMA update. A non-finite loss or gradient leaves params, optimizer state, BN statistics and
EMA untouched (the update is skipped inside the step, no host sync) and is counted.

``detach`` is static (the reference's ``epoch >= detach_epoch``): a run compiles exactly two
variants. The state argument is donated. Metrics stay on the device; fetch them only when
logging. :func:`jit_train_step` with a mesh runs the same step data-parallel over every
device (``nanodet_jax.train.sharding``). On CPU it compiles with Eigen convolutions and
native conv gradients (``nanodet_jax.models.dense_conv.eigen_conv_options``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh

from nanodet_jax.models.dense_conv import eigen_conv_options, native_conv_gradients
from nanodet_jax.objective import loss_and_grads
from nanodet_jax.train.ema import ema_update
from nanodet_jax.train.sharding import batch_sharding, replicated
from nanodet_jax.train.state import TrainState
from nanodet_jax.train.tree_reduce import all_finite, global_norm

Array = jax.Array
Metrics = dict[str, Array]
StepFn = Callable[[TrainState, dict, bool], tuple[TrainState, Metrics]]

# XLA runs its HLO verifier (a debug check of the compiler's own invariants) after every pass
# pipeline: ~100 runs over the step's ~45k instructions, 1.7-2.2 s of the m_320 step's
# compile on a 2-core VM (jax.profiler trace of the compile: RunInvariantCheckers). The step
# skips it; a program XLA mis-compiles is then not caught by XLA itself.
STEP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "hlo-verifier"}


def step_compiler_options() -> dict:
    """The options the train step compiles with: Eigen convolutions on CPU
    (:func:`~nanodet_jax.models.dense_conv.eigen_conv_options`) and
    :data:`STEP_COMPILER_OPTIONS`."""
    return {**eigen_conv_options(), **STEP_COMPILER_OPTIONS}


def make_train_step(objective: Callable, optimizer: optax.GradientTransformation,
                    lr_schedule: Callable[[Array], Array]) -> StepFn:
    """Build the (un-jitted) step; :func:`jit_train_step` compiles it.

    ``objective`` is ``make_objective(model, cfg)``; ``lr_schedule(step)`` gives the learning
    rate the update at ``step`` uses (for logging; the optimizer computes the same value).
    The batch holds ``image (B, H, W, 3)``, ``gt_boxes (B, G, 4)``, ``gt_labels (B, G)``,
    ``gt_mask (B, G)``; other keys are ignored.
    """

    def step(state: TrainState, batch: dict, detach: bool) -> tuple[TrainState, Metrics]:
        inputs = {k: batch[k] for k in ("image", "gt_boxes", "gt_labels", "gt_mask")}
        (loss, (terms, new_bn)), grads = loss_and_grads(objective, state.variables, inputs,
                                                        detach)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & all_finite(grads)
        lr = lr_schedule(state.step)
        # The update is computed unconditionally and each leaf keeps its old value when the
        # step is not finite (a select fused into the kernel computing the new value): a
        # lax.cond would add a branch, and copies of the state leaves, to compile for a
        # choice that costs nothing at run time (the optimizer works on one flat vector).
        def keep(new: Any, old: Any) -> Any:  # lax.select: no jnp.where call per leaf
            return jax.tree.map(
                lambda a, b: lax.select(lax.broadcast(finite, a.shape), a, b), new, old)

        with jax.named_scope("update"):  # op_name scope: benchmarks/step_profile.py
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = keep(optax.apply_updates(state.params, updates), state.params)
            batch_stats = keep(new_bn, state.batch_stats)
            step_count = state.step + finite.astype(state.step.dtype)
            # from the kept values, so that each new value has one user (the select) and is
            # computed in the select's kernel; a skipped step drops this EMA anyway
            ema = ema_update(state.ema, {"params": params, "batch_stats": batch_stats},
                             step_count)
            rng, _ = jax.random.split(state.rng)
            streak = jnp.where(finite, 0, state.bad_streak + 1).astype(state.bad_streak.dtype)
            state = state.replace(
                step=step_count, params=params, batch_stats=batch_stats,
                opt_state=keep(opt_state, state.opt_state), ema=keep(ema, state.ema), rng=rng,
                skipped=state.skipped + (~finite).astype(state.skipped.dtype),
                bad_streak=streak)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "lr": lr, "finite": finite}
        return state, metrics

    return step


def jit_train_step(step: StepFn, mesh: Mesh | None = None) -> StepFn:
    """``jax.jit`` with ``detach`` static and the state donated.

    With a ``mesh`` (:func:`nanodet_jax.train.sharding.make_mesh`) the step runs on all of
    its devices: the state comes in and goes out replicated, the batch comes in split along
    its leading axis over ``data`` (global ``jax.Array``s from
    :func:`~nanodet_jax.train.sharding.global_batch`; host arrays are split by jit), the
    metrics come out replicated. The math is the one-device step's (jit has global
    semantics: BN statistics and losses are over the global batch).
    """
    conv_options = eigen_conv_options()
    options = step_compiler_options()

    def traced(state: TrainState, batch: dict, detach: bool) -> tuple[TrainState, Metrics]:
        with native_conv_gradients(bool(conv_options)):
            return step(state, batch, detach)

    if mesh is None:
        return jax.jit(traced, static_argnums=(2,), donate_argnums=(0,),
                       compiler_options=options)
    rep = replicated(mesh)

    def on_mesh(state: TrainState, batch: dict, detach: bool) -> tuple[TrainState, Metrics]:
        # per-image work that XLA would not keep split (the assigner's top-k) shard_maps
        # over the mesh it finds here
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return traced(state, batch, detach)

    return jax.jit(on_mesh, static_argnums=(2,), donate_argnums=(0,),
                   in_shardings=(rep, batch_sharding(mesh)), out_shardings=(rep, rep),
                   compiler_options=options)


def fresh_train_step(cfg: Any, steps_per_epoch: int, seed: int = 0) -> tuple[StepFn, TrainState]:
    """The jitted step of ``cfg`` (its model, optimizer and lr schedule for
    ``steps_per_epoch``) and a freshly initialised state (``PRNGKey(seed)`` for the weights,
    ``PRNGKey(seed + 1)`` for the state's RNG): what benchmarks and tests train from."""
    from nanodet_jax.models import build_model, init_train_variables
    from nanodet_jax.objective import make_objective
    from nanodet_jax.train.optim import make_optimizer
    from nanodet_jax.train.schedule import make_lr_schedule
    from nanodet_jax.train.state import create_train_state

    model = build_model(cfg)
    optimizer = make_optimizer(cfg, steps_per_epoch)
    step = jit_train_step(make_train_step(make_objective(model, cfg), optimizer,
                                          make_lr_schedule(cfg.schedule, steps_per_epoch)))
    state = create_train_state(init_train_variables(cfg, jax.random.PRNGKey(seed)), optimizer,
                               jax.random.PRNGKey(seed + 1))
    return step, state
