"""The full-model training objective: forward (train-mode BN) + AGM head loss.

``make_objective(model, cfg)`` returns ``objective(variables, batch, detach) ->
(loss, (loss_states, new_batch_stats))``, the single function the train step differentiates
(w.r.t. ``variables['params']``; see ``loss_and_grads``). ``detach`` is static: the
reference's ``epoch >= detach_epoch``.

``batch`` holds ``image`` (B, H, W, 3) float32 normalised BGR, ``gt_boxes`` (B, G, 4) xyxy in
input pixels, ``gt_labels`` (B, G) int32 and ``gt_mask`` (B, G) bool (GTs padded to G).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from nanodet_jax.head_loss import HeadLossConfig, head_loss
from nanodet_jax.precision import compute_dtype, model_outputs_f32

Array = jax.Array
Objective = Callable[[Mapping, Mapping, bool], tuple[Array, tuple[dict, dict]]]


def head_loss_config(cfg: Any) -> HeadLossConfig:
    """``HeadLossConfig`` from a full config (or its ``model.arch`` node)."""
    arch = cfg.model.arch if "model" in cfg else cfg
    head = arch.head
    loss = head.loss
    return HeadLossConfig(
        num_classes=int(head.num_classes), reg_max=int(head.reg_max),
        strides=tuple(int(s) for s in head.strides),
        qfl_beta=float(loss.loss_qfl.get("beta", 2.0)),
        qfl_weight=float(loss.loss_qfl.loss_weight),
        dfl_weight=float(loss.loss_dfl.loss_weight),
        giou_weight=float(loss.loss_bbox.loss_weight),
        topk=int(head.get("assigner_cfg", {"topk": 13}).get("topk", 13)))


def make_objective(model, cfg: Any) -> Objective:
    """Build ``objective(variables, batch, detach)`` for ``model`` (a ``NanoDetPlus``).

    With ``device.precision: 16`` the forward runs in bfloat16 (``nanodet_jax.precision``);
    predictions, losses, assignment and gradients stay float32."""
    loss_cfg = head_loss_config(cfg)
    dtype = compute_dtype(cfg) if "device" in cfg else jnp.float32

    def objective(variables: Mapping, batch: Mapping, detach: bool = False):
        images = batch["image"]
        (preds, aux_preds), new_state = model.apply(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]},
            images if dtype == jnp.float32 else images.astype(dtype),
            train=True, detach=detach, mutable=["batch_stats"])
        if dtype != jnp.float32:
            preds, aux_preds = model_outputs_f32((preds, aux_preds))
        loss, states = head_loss(preds, aux_preds, batch["gt_boxes"], batch["gt_labels"],
                                 batch["gt_mask"], tuple(images.shape[1:3]), loss_cfg)
        return loss, (states, new_state["batch_stats"])

    return objective


def loss_and_grads(objective: Objective, variables: Mapping, batch: Mapping, detach: bool):
    """``((loss, (states, new_batch_stats)), grads)`` with grads w.r.t. ``variables['params']``."""

    def f(params):
        return objective({"params": params, "batch_stats": variables["batch_stats"]}, batch,
                         detach)

    return jax.value_and_grad(f, has_aux=True)(variables["params"])
