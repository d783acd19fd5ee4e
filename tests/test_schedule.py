"""Learning-rate schedule and optimizer parity with PyTorch (the reference trainer's rules).

Oracle: torch's own ``torch.optim.lr_scheduler`` classes and optimizers, driven step by step
by the reference's warmup rule (``nanodet/trainer/task.py: optimizer_step``, copied below) and
stepped once per epoch, plus ``clip_grad_norm_``.

Tolerances: lrs ``<= 1e-6`` relative to torch's double lr (the port stores float32 roundings
of the same doubles); parameters after each update ``|ours - torch| <= 1e-6 (1 + |torch|)``.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from nanodet_jax.config import ConfigError, nanodet_plus_recipe
from nanodet_jax.train.optim import (
    current_lr,
    make_optimizer,
    reference_chain,
    update_count,
)
from nanodet_jax.train.schedule import lr_tables, make_lr_schedule
from tests.fixtures import assert_close

COCO_STEPS = 1232  # 118,287 images // 96


def _schedule_cfg(warmup=("linear", 500, 1e-4), lr_schedule=None, total_epochs=300,
                  lr=1e-3) -> dict:
    name, steps, ratio = warmup
    return {"optimizer": {"name": "AdamW", "lr": lr, "weight_decay": 0.05},
            "warmup": {"name": name, "steps": steps, "ratio": ratio},
            "total_epochs": total_epochs,
            "lr_schedule": lr_schedule or {"name": "CosineAnnealingLR", "T_max": 300,
                                           "eta_min": 5e-5}}


def _reference_k(warmup: dict, global_step: int) -> float:
    """The reference's warmup factor (``optimizer_step``), verbatim."""
    if warmup["name"] == "constant":
        return warmup["ratio"]
    if warmup["name"] == "linear":
        return 1 - (1 - global_step / warmup["steps"]) * (1 - warmup["ratio"])
    if warmup["name"] == "exp":
        return warmup["ratio"] ** (1 - global_step / warmup["steps"])
    raise Exception("Unsupported warm up type!")


def _warmup_active(warmup: dict, g: int) -> bool:
    return warmup["name"] is not None and warmup["steps"] > 0 and g <= warmup["steps"]


def _torch_scheduler(optimizer, lr_schedule: dict):
    kwargs = {k: v for k, v in lr_schedule.items() if k != "name"}
    return getattr(torch.optim.lr_scheduler, lr_schedule["name"])(optimizer, **kwargs)


def _torch_lrs(cfg: dict, steps_per_epoch: int) -> np.ndarray:
    """float64 ``(total_epochs * steps_per_epoch,)``: the lr torch applies at each update."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg["optimizer"]["lr"])
    sched = _torch_scheduler(opt, cfg["lr_schedule"])
    opt.step()  # no grad: a no-op that silences the "scheduler before optimizer" warning
    group, lrs = opt.param_groups[0], []
    for g in range(cfg["total_epochs"] * steps_per_epoch):
        if _warmup_active(cfg["warmup"], g):
            group["lr"] = group["initial_lr"] * _reference_k(cfg["warmup"], g)
        lrs.append(group["lr"])
        if (g + 1) % steps_per_epoch == 0:
            sched.step()
    return np.array(lrs, np.float64)


COSINE = {"name": "CosineAnnealingLR", "T_max": 8, "eta_min": 1e-4}
# (id, schedule cfg, steps per epoch): tiny datasets where the warmup spans epoch ends
CASES = [
    ("coco", _schedule_cfg(), COCO_STEPS),
    ("tiny-linear", _schedule_cfg(("linear", 10, 1e-3), COSINE, 8, lr=0.02), 3),
    ("tiny-exp", _schedule_cfg(("exp", 10, 1e-3), COSINE, 8, lr=0.02), 3),
    ("tiny-constant", _schedule_cfg(("constant", 10, 0.1), COSINE, 8, lr=0.02), 3),
    ("tiny-ends-at-epoch-end", _schedule_cfg(("linear", 5, 0.01), COSINE, 8), 3),
    ("tiny-ends-at-epoch-start", _schedule_cfg(("linear", 6, 0.01), COSINE, 8), 3),
    ("tiny-no-warmup", _schedule_cfg(("linear", 0, 0.01), COSINE, 8), 3),
    ("tiny-warmup-null", _schedule_cfg((None, 7, 0.01), COSINE, 8), 3),
    ("cosine-restart", _schedule_cfg(("linear", 4, 0.01),
                                     {"name": "CosineAnnealingLR", "T_max": 3,
                                      "eta_min": 1e-5}, 15), 2),
    ("multistep", _schedule_cfg(("linear", 7, 0.01),
                                {"name": "MultiStepLR", "milestones": [2, 5, 5],
                                 "gamma": 0.5}, 9), 3),
    ("step", _schedule_cfg(("exp", 4, 0.01), {"name": "StepLR", "step_size": 2,
                                               "gamma": 0.3}, 9), 3),
    ("exponential", _schedule_cfg(("constant", 4, 0.2), {"name": "ExponentialLR",
                                                         "gamma": 0.8}, 9), 3),
]


@pytest.mark.parametrize("cfg, steps_per_epoch", [pytest.param(c, s, id=i)
                                                  for i, c, s in CASES])
def test_schedule_matches_torch_over_whole_run(cfg, steps_per_epoch):
    ref = _torch_lrs(cfg, steps_per_epoch)
    got = np.asarray(make_lr_schedule(cfg, steps_per_epoch)(jnp.arange(ref.size)), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def test_tiny_warmup_spanning_epochs_is_shifted():
    """Warmup to step 10 over 3-step epochs: epoch 3 (steps 9..11) ends the warmup, step 11
    keeps ``lr_base`` and the cosine recursion restarts from ``lr_base`` at epoch 4."""
    cfg = CASES[1][1]
    warm, epochs = lr_tables(cfg, 3)
    assert warm.shape == (11,) and epochs.shape == (9,)
    lr = make_lr_schedule(cfg, 3)
    assert float(lr(jnp.int32(11))) == np.float32(0.02)
    ratio = (1 + np.cos(np.pi * 4 / 8)) / (1 + np.cos(np.pi * 3 / 8))
    assert float(lr(jnp.int32(12))) == pytest.approx(1e-4 + (0.02 - 1e-4) * ratio, rel=1e-6)
    assert epochs[4] > 1e-4 + (0.02 - 1e-4) * (1 + np.cos(np.pi * 4 / 8)) / 2  # not closed form


def test_spec_acceptance_numbers():
    lr = make_lr_schedule(_schedule_cfg(), COCO_STEPS)
    got = np.asarray(lr(jnp.array([0, 250, 500], jnp.int32)), np.float64)
    np.testing.assert_allclose(got, [1e-7, 5.0005e-4, 1e-3], rtol=1e-6)
    # closed-form cosine per epoch once the warmup ends inside epoch 0
    e = np.arange(300)
    closed = 5e-5 + (1e-3 - 5e-5) * (1 + np.cos(np.pi * e / 300)) / 2
    np.testing.assert_allclose(np.asarray(lr(jnp.asarray(e * COCO_STEPS + 600))), closed,
                               rtol=1e-6)


def test_schedule_is_jittable():
    lr = make_lr_schedule(CASES[1][1], 3)
    steps = [0, 5, 10, 11, 12, 23, 24, 1000]
    jitted = jax.jit(lr)
    for g in steps:
        assert float(jitted(jnp.int32(g))) == float(lr(g))
    assert jax.jit(lr)(jnp.zeros((2, 3), jnp.int32)).shape == (2, 3)


@pytest.mark.parametrize("patch, field", [
    ({"lr_schedule": {"name": "CosineLR", "T_max": 3}}, "schedule.lr_schedule.name"),
    ({"lr_schedule": {"name": "CosineAnnealingLR", "T_max": 3, "eta": 0}},
     "schedule.lr_schedule.eta"),
    ({"lr_schedule": {"name": "CosineAnnealingLR"}}, "schedule.lr_schedule.T_max"),
    ({"lr_schedule": {"name": "StepLR", "step_size": 0}}, "schedule.lr_schedule.step_size"),
    ({"lr_schedule": {"name": "MultiStepLR", "milestones": 3}},
     "schedule.lr_schedule.milestones"),
    ({"warmup": {"name": "cosine", "steps": 3, "ratio": 0.1}}, "schedule.warmup.name"),
    ({"warmup": {"name": "linear", "steps": -1, "ratio": 0.1}}, "schedule.warmup.steps"),
    ({"warmup": {"name": "linear", "steps": 5}}, "schedule.warmup.ratio"),
    ({"total_epochs": 0}, "schedule.total_epochs"),
])
def test_schedule_config_errors_name_the_field(patch, field):
    cfg = {**_schedule_cfg(), **patch}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_lr_schedule(cfg, 10)


def test_unknown_scheduler_lists_accepted_names():
    with pytest.raises(ConfigError, match="CosineAnnealingLR.*MultiStepLR.*StepLR"):
        make_lr_schedule({**_schedule_cfg(), "lr_schedule": {"name": "OneCycleLR"}}, 10)


# ---------------------------------------------------------------------------------------------
# optimizer

TINY_SCHEDULE = _schedule_cfg(("linear", 4, 0.1), {"name": "CosineAnnealingLR", "T_max": 4,
                                                   "eta_min": 1e-4}, 4, lr=0.02)
SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,)}, "s": ()}
OPTIMIZERS = [
    ("AdamW", {"name": "AdamW", "lr": 0.02, "weight_decay": 0.05}),
    ("AdamW-amsgrad", {"name": "AdamW", "lr": 0.02, "weight_decay": 0.05, "amsgrad": True,
                       "betas": [0.8, 0.99], "eps": 1e-6}),
    ("Adam", {"name": "Adam", "lr": 0.02, "weight_decay": 0.01}),
    ("SGD-nesterov", {"name": "SGD", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3,
                      "nesterov": True}),
    ("SGD-dampening", {"name": "SGD", "lr": 0.02, "momentum": 0.8, "dampening": 0.3,
                       "weight_decay": 0.0}),
    ("SGD-plain", {"name": "SGD", "lr": 0.02, "weight_decay": 0.02}),
]


def _tree(rng: np.random.Generator, scale: float = 1.0) -> dict:
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s)).astype(np.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def _grad_scales(n: int) -> list[float]:
    """Large gradients on even steps (global norm > 35: clipped), small on odd ones."""
    return [60.0 if g % 2 == 0 else 0.5 for g in range(n)]


def _torch_run(opt_cfg: dict, params0: dict, grads: list, clip: float | None,
               steps_per_epoch: int) -> tuple[list, list]:
    leaves0, treedef = jax.tree.flatten(params0)
    ps = [torch.nn.Parameter(torch.tensor(x)) for x in leaves0]
    kwargs = {k: (tuple(v) if k == "betas" else v) for k, v in opt_cfg.items() if k != "name"}
    opt = getattr(torch.optim, opt_cfg["name"])(ps, **kwargs)
    sched = _torch_scheduler(opt, TINY_SCHEDULE["lr_schedule"])
    group, params, lrs = opt.param_groups[0], [], []
    for g, grad in enumerate(grads):
        if _warmup_active(TINY_SCHEDULE["warmup"], g):
            group["lr"] = group["initial_lr"] * _reference_k(TINY_SCHEDULE["warmup"], g)
        for p, x in zip(ps, jax.tree.leaves(grad)):
            p.grad = torch.tensor(x)
        if clip:
            torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
        lrs.append(group["lr"])
        params.append(jax.tree.unflatten(treedef, [p.detach().numpy().copy() for p in ps]))
        if (g + 1) % steps_per_epoch == 0:
            sched.step()
    return params, lrs


@pytest.mark.parametrize("opt_cfg", [pytest.param(c, id=i) for i, c in OPTIMIZERS])
@pytest.mark.parametrize("clip", [35.0, None], ids=["clip35", "noclip"])
def test_optimizer_matches_torch(opt_cfg, clip):
    steps_per_epoch, n = 3, 12
    rng = np.random.default_rng(0)
    params0 = _tree(rng)
    grads = [_tree(rng, s) for s in _grad_scales(n)]
    norms = [float(optax.tree.norm(g)) for g in grads]
    assert min(norms) < 35 < max(norms)  # clipping triggers on some steps only
    ref_params, ref_lrs = _torch_run(opt_cfg, params0, grads, clip, steps_per_epoch)

    cfg = {"schedule": {**TINY_SCHEDULE, "optimizer": opt_cfg}, "grad_clip": clip}
    tx = make_optimizer(cfg, steps_per_epoch)

    @jax.jit
    def step(params, state, grad):
        updates, state = tx.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    params, state = params0, tx.init(params0)
    for g in range(n):
        params, state = step(params, state, grads[g])
        assert int(update_count(state)) == g + 1
        assert float(current_lr(state)) == pytest.approx(ref_lrs[g], rel=1e-6)
        for (path, got), ref in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(ref_params[g])):
            assert_close(f"step {g} {jax.tree_util.keystr(path)}", got, ref, tol=1e-6)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_flat_optimizer_equals_the_chain_leaf_by_leaf(name):
    """``make_optimizer`` runs its chain on one flat vector (``flat``): the same updates as
    the chain applied leaf by leaf, and one buffer per moment, whatever the leaf count."""
    opt_cfg = {"name": name, "lr": 0.01, "weight_decay": 0.05,
               **({"momentum": 0.9} if name == "SGD" else {})}
    cfg = {"schedule": {**TINY_SCHEDULE, "optimizer": opt_cfg}, "grad_clip": 35}
    flat_tx, chain = make_optimizer(cfg, 3), reference_chain(cfg, 3)
    rng = np.random.default_rng(1)
    params = _tree(rng)
    s_flat, s_tree = flat_tx.init(params), chain.init(params)
    one_leaf = flat_tx.init({"w": jnp.zeros(7)})
    assert jax.tree.structure(s_flat.inner) == jax.tree.structure(one_leaf.inner)
    for g in [_tree(rng, 50.0), _tree(rng, 1.0), _tree(rng, 2.0)]:
        u_flat, s_flat = jax.jit(flat_tx.update)(g, s_flat, params)
        u_tree, s_tree = jax.jit(chain.update)(g, s_tree, params)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(u_flat),
                                jax.tree.leaves(u_tree)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close(jax.tree_util.keystr(path), a, b, tol=1e-6)
        params = optax.apply_updates(params, u_flat)


def test_optimizer_from_recipe_config():
    cfg = ml_collections.ConfigDict(nanodet_plus_recipe())
    tx = make_optimizer(cfg, COCO_STEPS)
    params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    state = tx.init(params)
    assert float(current_lr(state)) == pytest.approx(1e-7, rel=1e-6)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert int(update_count(state)) == 1
    assert float(current_lr(state)) == pytest.approx(1e-7, rel=1e-6)


@pytest.mark.parametrize("optimizer, grad_clip, field", [
    ({"name": "RMSprop", "lr": 0.1}, 35, "schedule.optimizer.name"),
    ({"name": "AdamW", "lr": 0.1, "momentum": 0.9}, 35, "schedule.optimizer.momentum"),
    ({"name": "AdamW", "lr": 0.1, "betas": [0.9]}, 35, "schedule.optimizer.betas"),
    ({"name": "AdamW", "lr": 0.1, "no_norm_decay": True}, 35,
     "schedule.optimizer.no_norm_decay"),
    ({"name": "SGD", "lr": 0.1, "nesterov": True}, 35, "schedule.optimizer.nesterov"),
    ({"name": "SGD", "lr": -0.1}, 35, "schedule.optimizer.lr"),
    ({"name": "AdamW", "lr": 0.1}, -1, "grad_clip"),
])
def test_optimizer_config_errors_name_the_field(optimizer, grad_clip, field):
    schedule = copy.deepcopy(TINY_SCHEDULE)
    schedule["optimizer"] = optimizer
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_optimizer({"schedule": schedule, "grad_clip": grad_clip}, 3)
