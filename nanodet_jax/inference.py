"""Detector API: BGR images in, detections in original-image pixels out.

    det = Detector.from_checkpoint("configs/nanodet_plus_m_320.py", "model.ckpt")
    result = det(cv2.imread("img.jpg"))           # one image -> ImageDetections
    results = det([img_a, img_b])                 # list (any sizes) -> list[ImageDetections]
    print(det.last_timings)                       # preprocess / compile / infer ms

Each image goes through the validation transform of the config (``data.val``: input size,
``keep_ratio``, normalisation) on the host; the batch is zero-padded (bottom/right) to a
multiple of 32, then ONE jitted function runs the forward pass and the reference
post-processing on the device: decode, class-aware NMS, inverse warp to the original image
(with ``M^-1`` computed per image on the host in float64) and clipping. Compiled functions
are cached per batch shape ``(B, H, W)``.

Thresholds: the defaults are the reference's evaluation settings (score > 0.05, NMS IoU 0.6,
at most 100 detections per image), so the output equals the reference ``post_process``.
A display threshold (the demo's ``--score-thr 0.35``) is a separate choice: pass it as
``score_thr`` here; removing candidates at or below it before NMS gives the same
detections as filtering the evaluation output afterwards (lower-scored boxes never
suppress higher ones), up to the float rounding of the class offsets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nanodet_jax import postprocess as pp
from nanodet_jax.checkpoint import load_variables
from nanodet_jax.config import load_config
from nanodet_jax.data.transforms import collate_images, val_transform
from nanodet_jax.models import build_model

AUX_MODULES = ("aux_fpn", "aux_head")


@dataclass(frozen=True)
class ImageDetections:
    """Detections of one image, in descending score order.

    boxes ``(N, 4)`` float32 xyxy in original-image pixels; scores ``(N,)`` float32;
    labels ``(N,)`` int64 class indices; class_names ``N`` names (``class_names[i]`` is the
    class of detection ``i``).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_dict(self) -> dict[str, list]:
        """JSON-ready ``{"boxes", "scores", "labels", "class_names"}`` (plain lists)."""
        return {"boxes": self.boxes.tolist(), "scores": self.scores.tolist(),
                "labels": self.labels.tolist(), "class_names": list(self.class_names)}


def _as_config(config: str | Path | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config if isinstance(config, ml_collections.ConfigDict) else load_config(config)


def inference_variables(variables: dict) -> dict:
    """``{'params', 'batch_stats'}`` without the training-only AGM (``aux_fpn``/``aux_head``)."""
    return {col: {k: v for k, v in variables.get(col, {}).items() if k not in AUX_MODULES}
            for col in ("params", "batch_stats")}


class Detector:
    """NanoDet-Plus inference on uint8 BGR images (see the module docstring).

    Args:
      cfg: full config (``model.arch``, ``data.val``, ``class_names``).
      variables: ``{'params', 'batch_stats'}`` (AGM entries are dropped).
      input_size: network input ``(width, height)``; default ``cfg.data.val.input_size``.
      keep_ratio: default ``cfg.data.val.keep_ratio``.
      score_thr, iou_thr, max_num, pre_nms_top_k: post-processing (reference evaluation
        defaults; see :func:`nanodet_jax.postprocess.postprocess`).
      precision: optional ``jax.default_matmul_precision`` used while tracing (e.g.
        ``"highest"`` to avoid TF32 convolutions on GPUs); ``None`` keeps JAX's default.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, variables: dict, *,
                 input_size: Sequence[int] | None = None, keep_ratio: bool | None = None,
                 score_thr: float = 0.05, iou_thr: float = 0.6, max_num: int = 100,
                 pre_nms_top_k: int = 1000, precision: str | None = None):
        val = cfg.data.val
        self.cfg = cfg
        self.class_names = list(cfg.class_names)
        self.input_wh = tuple(int(v) for v in (input_size or val.input_size))
        self.keep_ratio = bool(val.keep_ratio if keep_ratio is None else keep_ratio)
        mean, std = val.pipeline.get("normalize", [None, None])
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        head = cfg.model.arch.head
        self.strides, self.reg_max = tuple(int(s) for s in head.strides), int(head.reg_max)
        self.score_thr, self.iou_thr = float(score_thr), float(iou_thr)
        self.max_num, self.pre_nms_top_k = int(max_num), int(pre_nms_top_k)
        self.precision = precision
        self.model = build_model(cfg, with_aux=False)
        self.variables = jax.device_put(inference_variables(variables))
        self._compiled: dict[tuple[int, int, int], Any] = {}
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_checkpoint(cls, config: str | Path | ml_collections.ConfigDict,
                        checkpoint: str | Path, *, prefer_ema: bool = True,
                        input_size: Sequence[int] | None = None, keep_ratio: bool | None = None,
                        score_thr: float = 0.05, iou_thr: float = 0.6, max_num: int = 100,
                        pre_nms_top_k: int = 1000, precision: str | None = None) -> Detector:
        """Build from a config (``.py``/``.yml`` path or ``ConfigDict``) and a checkpoint
        (orbax directory or reference ``.ckpt``/``.pth``; EMA weights when ``prefer_ema``)."""
        cfg = _as_config(config)
        variables = load_variables(checkpoint, cfg, prefer_ema=prefer_ema)
        return cls(cfg, variables, input_size=input_size, keep_ratio=keep_ratio,
                   score_thr=score_thr, iou_thr=iou_thr, max_num=max_num,
                   pre_nms_top_k=pre_nms_top_k, precision=precision)

    # -- host side ---------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
        """Val transform + collation of uint8 BGR ``(H_i, W_i, 3)`` images.

        Returns ``batch (B, H, W, 3)`` float32 (H, W multiples of 32), ``inv_warp (B, 3, 3)``
        float32 (``M^-1`` computed in float64) and ``img_hw (B, 2)`` int32 original sizes.
        """
        outs, inv, hw = [], [], []
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"image {i}: expected a uint8 (H, W, 3) BGR array, got "
                                 f"{img.dtype} {img.shape}")
            kw = {} if self.mean is None else {"mean": self.mean, "std": self.std}
            t = val_transform(img, self.input_wh, self.keep_ratio, **kw)
            outs.append(t.img)
            inv.append(np.linalg.inv(t.warp_matrix))
            hw.append(img.shape[:2])
        return (collate_images(outs, 32), np.asarray(inv, np.float32),
                np.asarray(hw, np.int32))

    # -- device side -------------------------------------------------------------------

    def _forward_postprocess(self, variables: dict, batch: jax.Array, inv_warp: jax.Array,
                             img_hw: jax.Array) -> pp.Detections:
        preds = self.model.apply(variables, batch, train=False)
        return pp.postprocess(preds, batch.shape[1:3], inv_warp, img_hw, self.strides,
                              self.reg_max, self.score_thr, self.iou_thr, self.max_num,
                              self.pre_nms_top_k, inverse_given=True)

    def compiled(self, batch_shape: tuple[int, int, int]) -> Any:
        """The compiled forward + post-process for ``(B, H, W)`` (cached; compiled and run once
        on zeros the first time)."""
        fn = self._compiled.get(batch_shape)
        if fn is None:
            b, h, w = batch_shape
            args = (self.variables, jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
                    jax.ShapeDtypeStruct((b, 3, 3), jnp.float32),
                    jax.ShapeDtypeStruct((b, 2), jnp.int32))
            jitted = jax.jit(self._forward_postprocess)
            if self.precision is None:
                fn = jitted.lower(*args).compile()
            else:
                with jax.default_matmul_precision(self.precision):
                    fn = jitted.lower(*args).compile()
            # one warm-up run: the first execution pays one-off allocation/thread start-up
            # costs that belong to "compile", not to the per-image timings
            jax.block_until_ready(fn(self.variables, np.zeros((b, h, w, 3), np.float32),
                                     np.tile(np.eye(3, dtype=np.float32), (b, 1, 1)),
                                     np.ones((b, 2), np.int32)))
            self._compiled[batch_shape] = fn
        return fn

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]
                 ) -> ImageDetections | list[ImageDetections]:
        """Detect on one uint8 BGR ``(H, W, 3)`` image or a list of them (sizes may differ).

        Returns :class:`ImageDetections` (or a list, one per image). Stage times of this
        call are in :attr:`last_timings` (ms): ``preprocess``, ``compile`` (compilation and a
        warm-up run for a new batch shape, 0 when cached),
        ``infer`` (transfer + forward + post-process + fetch of the padded results), ``total``
        (also unpacking the results).
        """
        single = isinstance(images, np.ndarray) and images.ndim == 3
        imgs = [images] if single else list(images)
        if not imgs:
            return []
        t0 = time.perf_counter()
        batch, inv_warp, img_hw = self.preprocess(imgs)
        t1 = time.perf_counter()
        fn = self.compiled(batch.shape[:3])
        t2 = time.perf_counter()
        det = jax.device_get(fn(self.variables, batch, inv_warp, img_hw))
        t3 = time.perf_counter()
        results = []
        for i in range(len(imgs)):
            v = np.asarray(det.valid[i])
            labels = np.asarray(det.labels[i][v], np.int64)
            results.append(ImageDetections(
                boxes=np.asarray(det.boxes[i][v], np.float32),
                scores=np.asarray(det.scores[i][v], np.float32), labels=labels,
                class_names=[self.class_names[j] for j in labels]))
        t4 = time.perf_counter()
        self.last_timings = {"preprocess": (t1 - t0) * 1e3, "compile": (t2 - t1) * 1e3,
                             "infer": (t3 - t2) * 1e3, "total": (t4 - t0) * 1e3,
                             "batch": float(len(imgs))}
        return results[0] if single else results
