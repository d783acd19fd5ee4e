"""The NanoDet-Plus detector: backbone -> GhostPAN -> NanoDetPlusHead, plus the training-only
Assign Guidance Module (``aux_fpn`` + ``aux_head``) of spec §7.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class NanoDetPlus(nn.Module):
    """``images`` (B, H, W, 3) float32, normalised BGR, H and W multiples of 32.

    * ``train=False`` (default): returns the main head output (B, P, C + 4K), raw logits.
    * ``train=True``: BatchNorm uses batch statistics (call with ``mutable=['batch_stats']``)
      and returns ``(head_out, aux_head_out)``; the aux head sees
      ``concat([fpn_l, aux_fpn_l])``. ``detach=True`` (static; the reference's
      ``epoch >= detach_epoch``) stops the gradient of the backbone features entering
      ``aux_fpn`` and of the main-neck features entering the aux head, so auxiliary losses
      train only ``aux_fpn``/``aux_head``. Forward values do not change.
    * ``aux`` overrides whether the aux branch runs (default: ``train``), e.g. for
      validation losses in eval mode.
    """

    backbone: nn.Module
    fpn: nn.Module
    head: nn.Module
    aux_fpn: nn.Module | None = None
    aux_head: nn.Module | None = None

    @property
    def has_aux(self) -> bool:
        return self.aux_fpn is not None and self.aux_head is not None

    def __call__(self, images: Array, train: bool = False, detach: bool = False,
                 aux: bool | None = None):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"NanoDetPlus: images must be (B, H, W, 3) NHWC, got {images.shape}")
        h, w = images.shape[1:3]
        if h % 32 or w % 32:
            raise ValueError(f"NanoDetPlus: input height and width must be multiples of 32, got "
                             f"{h}x{w}; pad the batch (bottom/right) to a multiple of 32")
        feats = self.backbone(images, train)
        fpn_feats = self.fpn(feats, train)
        head_out = self.head(fpn_feats, train)
        run_aux = train if aux is None else aux
        if not run_aux:
            return head_out
        if not self.has_aux:
            raise ValueError("NanoDetPlus: this model has no aux_fpn/aux_head (config "
                             "model.arch.aux_head) but the aux branch was requested")
        if detach:
            feats = [lax.stop_gradient(f) for f in feats]
            fpn_feats = [lax.stop_gradient(f) for f in fpn_feats]
        aux_feats = self.aux_fpn(feats, train)
        dual = [jnp.concatenate([f, a], axis=-1) for f, a in zip(fpn_feats, aux_feats)]
        return head_out, self.aux_head(dual, train)
