"""Deployment exports: ONNX in the reference layout (spec §16) and ``jax.export`` artifacts.

ONNX (``to_onnx``, needs ``pip install 'nanodet_jax[export]'``: jax2onnx, onnx, onnxruntime):

* input ``data`` float32 ``(1, 3, H, W)`` NCHW, normalised BGR (mean/std are *not* in the
  graph); output ``output`` float32 ``(1, P, C + 4K)``: sigmoid class probabilities, then the
  raw distribution logits (l, t, r, b); rows stride 8 -> 64, row-major within a level.
  ``(H, W)`` is honoured for non-square inputs (the reference swaps them, quirk #12).
* Only the inference weights are exported (no AGM). The graph is traced with jax2onnx from the
  Flax model under a Flax method interceptor that (a) runs every depthwise conv in its native
  grouped form (ONNX ``Conv`` with ``group = C``, never the CPU "taps" form) and (b) evaluates
  each inference BatchNorm as ``x * a + b`` with host constants
  ``a = scale / sqrt(var + eps)``, ``b = bias - mean * a``.
* Two graph passes follow: jax2onnx lowers the NHWC max pool to a 4-D ``MaxPool`` that ONNX
  runtimes reject, so it is rewritten to ``Transpose -> MaxPool(3x3) -> Transpose``; then
  (``simplify=True``) onnxruntime's basic, hardware-independent graph optimisations fold the
  constants, cancel layout transposes and fuse the BatchNorm affine into the convolutions.
  The result uses standard ONNX operators only (default domain), opset >= 13 (jax2onnx emits
  opset-13 ``Squeeze``/``Unsqueeze`` forms, so the reference's opset 11 is not reachable).

``jax.export`` (``to_jax_export`` / ``load_jax_export``): the jitted inference function with
the weights **closed over** (baked into the serialized StableHLO as constants), so the file is
self-contained like the ONNX model: ``fn(images (B, H, W, 3) NHWC float32) -> (B, P, C + 4K)``
raw logits, exactly ``model.apply(variables, images, train=False)``; with
``with_postprocess=True`` it returns the reference detections instead (see
:func:`jax_inference_fn`). Re-export to change the weights, batch or input size.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax import postprocess as pp
from nanodet_jax.box_ops import center_priors
from nanodet_jax.models import build_model
from nanodet_jax.models.depthwise import depthwise_conv
from nanodet_jax.models.layers import BatchNorm, Conv2d

Array = jax.Array
MIN_OPSET = 13
DEFAULT_OPSET = 13
INPUT_NAME, OUTPUT_NAME = "data", "output"


def _import_onnx() -> tuple[Any, Any, Any]:
    try:
        import jax2onnx
        import onnx
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ONNX export needs jax2onnx, onnx and onnxruntime: "
                          "pip install 'nanodet_jax[export]'") from e
    return jax2onnx, onnx, onnxruntime


def resolve_input_hw(cfg: Any, input_hw: Sequence[int] | None = None) -> tuple[int, int]:
    """``(H, W)``: ``input_hw`` or the config's ``data.val.input_size`` (stored ``[w, h]``).

    Raises ``ValueError`` unless both are positive multiples of 32.
    """
    if input_hw is None:
        w, h = (int(v) for v in cfg.data.val.input_size)
    else:
        h, w = (int(v) for v in input_hw)
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ValueError(f"input (H, W) = ({h}, {w}): both must be positive multiples of 32")
    return h, w


def _model_variables(model: nn.Module, variables: dict) -> dict:
    """``{'params', 'batch_stats'}`` restricted to the modules of ``model`` (drops the AGM)."""
    names = {"backbone", "fpn", "head"} | ({"aux_fpn", "aux_head"} if model.has_aux else set())
    return {col: {k: v for k, v in variables.get(col, {}).items() if k in names}
            for col in ("params", "batch_stats")}


def _bn_use_running_average(module: BatchNorm, args: tuple, kwargs: dict) -> bool:
    flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    return bool(module.use_running_average if flag is None else flag)


def _export_interceptor(fold_bn: bool) -> Callable[..., Any]:
    """Flax method interceptor: native depthwise convs; with ``fold_bn`` inference
    BatchNorms become ``x * a + b`` with host (numpy) constants (weights must be concrete)."""

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(m, Conv2d) and m.depthwise:
            x = args[0]
            params = m.variables["params"]
            pad = m.kernel_size // 2 if m.padding is None else m.padding
            y = depthwise_conv(x, params["kernel"].astype(x.dtype), stride=m.stride,
                               padding=pad, impl="native")
            return y + params["bias"].astype(y.dtype) if m.use_bias else y
        if fold_bn and isinstance(m, BatchNorm) and _bn_use_running_average(m, args, kwargs):
            x = args[0]
            p, s = m.variables["params"], m.variables["batch_stats"]
            var = np.asarray(s["var"], np.float32)
            a = np.asarray(p["scale"], np.float32) / np.sqrt(var + np.float32(m.epsilon))
            b = np.asarray(p["bias"], np.float32) - np.asarray(s["mean"], np.float32) * a
            return x * a.astype(x.dtype) + b.astype(x.dtype)
        return next_fun(*args, **kwargs)

    return interceptor


def onnx_forward(cfg: Any, variables: dict) -> Callable[[Array], Array]:
    """The function exported to ONNX (weights closed over).

    ``x (B, 3, H, W)`` NCHW normalised BGR -> ``(B, P, C + 4K)`` with ``sigmoid`` applied to
    the ``C`` class channels (spec §5.4); regression channels stay raw logits.
    """
    model = build_model(cfg, with_aux=False)
    v = jax.tree_util.tree_map(np.asarray, _model_variables(model, variables))
    num_classes = int(cfg.model.arch.head.num_classes)

    def forward(x: Array) -> Array:
        with nn.intercept_methods(_export_interceptor(fold_bn=True)):
            y = model.apply(v, jnp.transpose(x, (0, 2, 3, 1)), train=False)
        return jnp.concatenate([jax.nn.sigmoid(y[..., :num_classes]), y[..., num_classes:]],
                               axis=-1)

    return forward


def _ints_attr(node: Any, name: str, default: list[int]) -> list[int]:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return default


def rewrite_nhwc_max_pools(model: Any) -> Any:
    """Replace jax2onnx's 4-D ``Unsqueeze -> Unsqueeze -> MaxPool -> Squeeze`` lowering of an
    NHWC ``reduce_window_max`` (window 1 on N and C) by ``Transpose -> 2-D MaxPool ->
    Transpose`` (in place; returns ``model``). Raises on a 4-D pool it cannot express."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    remove, replace = set(), {}
    for n in g.node:
        k = _ints_attr(n, "kernel_shape", [])
        if n.op_type != "MaxPool" or len(k) != 4:
            continue
        s = _ints_attr(n, "strides", [1] * 4)
        pads = _ints_attr(n, "pads", [0] * 8)
        dil = _ints_attr(n, "dilations", [1] * 4)
        u1 = producer.get(n.input[0])
        u0 = producer.get(u1.input[0]) if u1 is not None else None
        outs = consumers.get(n.output[0], [])
        ok = (u0 is not None and u0.op_type == u1.op_type == "Unsqueeze" and len(outs) == 1
              and outs[0].op_type == "Squeeze" and len(consumers[u1.output[0]]) == 1
              and len(consumers[u0.output[0]]) == 1 and k[0] == k[3] == s[0] == s[3] == 1
              and dil[0] == dil[3] == 1 and not any(pads[i] for i in (0, 3, 4, 7))
              and _ints_attr(n, "ceil_mode", [0]) == [0])
        if not ok:
            raise NotImplementedError(f"ONNX export: cannot rewrite 4-D MaxPool {n.name!r} "
                                      f"(kernel {k}, strides {s}, pads {pads})")
        sq, x, y = outs[0], u0.input[0], outs[0].output[0]
        replace[id(u0)] = [
            helper.make_node("Transpose", [x], [y + "_nchw_in"], perm=[0, 3, 1, 2],
                             name=n.name + "_to_nchw"),
            helper.make_node("MaxPool", [y + "_nchw_in"], [y + "_nchw_out"], name=n.name,
                             kernel_shape=k[1:3], strides=s[1:3], dilations=dil[1:3],
                             pads=[pads[1], pads[2], pads[5], pads[6]]),
            helper.make_node("Transpose", [y + "_nchw_out"], [y], perm=[0, 2, 3, 1],
                             name=n.name + "_to_nhwc")]
        remove |= {id(u1), id(n), id(sq)}
    if replace:
        nodes = []
        for n in g.node:
            if id(n) in replace:
                nodes += replace[id(n)]
            elif id(n) not in remove:
                nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        inits = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(inits)
    return model


def _signature(model: Any) -> list[tuple[str, list[int]]]:
    return [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*model.graph.input, *model.graph.output)]


def simplify_onnx(model: Any) -> Any:
    """onnxruntime basic-level (hardware-independent) graph optimisation: constant folding,
    redundant-node removal, transpose cancellation, Conv+Mul/Add fusion.

    Returns a new checked ``ModelProto`` with the same inputs, outputs, opset and metadata,
    using default-domain ONNX operators only (raises otherwise).
    """
    _, onnx, ort = _import_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "simplified.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = onnx.load(so.optimized_model_filepath)
    used = {n.domain for n in out.graph.node}
    if used - {"", "ai.onnx"}:
        raise RuntimeError(f"onnxruntime simplification produced non-standard domains {used}; "
                           "export with simplify=False")
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    onnx.checker.check_model(out, full_check=True)
    if _signature(out) != _signature(model):
        raise RuntimeError(f"simplification changed the graph signature {_signature(model)} "
                           f"-> {_signature(out)}")
    return out


def onnx_op_histogram(model: Any) -> dict[str, int]:
    """``{op_type: count}`` of the top-level graph, most frequent first."""
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def _metadata(cfg: Any, hw: tuple[int, int]) -> dict[str, str]:
    head = cfg.model.arch.head
    mean, std = cfg.data.val.pipeline.get("normalize", [None, None])
    return {"model": "nanodet-plus", "input_hw": json.dumps(list(hw)),
            "input": "NCHW float32 BGR, (pixel - mean) / std (not in the graph)",
            "mean": json.dumps(mean and list(mean)), "std": json.dumps(std and list(std)),
            "num_classes": str(int(head.num_classes)), "reg_max": str(int(head.reg_max)),
            "strides": json.dumps([int(s) for s in head.strides]),
            "output": "(B, P, C + 4*(reg_max+1)): sigmoid class scores, then raw l,t,r,b "
                      "distribution logits; rows stride-major, row-major per level",
            "class_names": json.dumps(list(cfg.get("class_names", [])))}


def export_onnx_model(cfg: Any, variables: dict, input_hw: Sequence[int] | None = None, *,
                      batch: int = 1, opset: int = DEFAULT_OPSET, simplify: bool = True) -> Any:
    """Trace, fix up and (optionally) simplify the ONNX model; returns an ``onnx.ModelProto``.

    ``data (batch, 3, H, W)`` -> ``output (batch, P, C + 4K)`` (see the module docstring).
    """
    jax2onnx, onnx, _ = _import_onnx()
    h, w = resolve_input_hw(cfg, input_hw)
    if int(opset) < MIN_OPSET:
        raise ValueError(f"opset {opset} < {MIN_OPSET}: jax2onnx emits opset-13 operator forms")
    spec = jax.ShapeDtypeStruct((int(batch), 3, h, w), jnp.float32)
    model = jax2onnx.to_onnx(onnx_forward(cfg, variables), [spec], model_name="nanodet_plus",
                             opset=int(opset), input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME])
    model = rewrite_nhwc_max_pools(model)
    onnx.helper.set_model_props(model, _metadata(cfg, (h, w)))
    onnx.checker.check_model(model, full_check=True)
    head = cfg.model.arch.head
    want = [(INPUT_NAME, [int(batch), 3, h, w]),
            (OUTPUT_NAME, [int(batch), center_priors(h, w, head.strides).shape[0],
                           int(head.num_classes) + 4 * (int(head.reg_max) + 1)])]
    if _signature(model) != want:
        raise RuntimeError(f"ONNX export: graph signature {_signature(model)} != {want}")
    return simplify_onnx(model) if simplify else model


def to_onnx(cfg: Any, variables: dict, out_path: str | Path,
            input_hw: Sequence[int] | None = None, opset: int = DEFAULT_OPSET, *,
            batch: int = 1, simplify: bool = True, overwrite: bool = False) -> Path:
    """Write the reference-layout ONNX model (spec §16) to ``out_path``; returns the path.

    ``input_hw = (H, W)`` (default: the config's ``data.val.input_size``, stored ``[w, h]``),
    multiples of 32. Refuses to replace an existing file unless ``overwrite``.
    """
    _, onnx, _ = _import_onnx()
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (or --overwrite)")
    model = export_onnx_model(cfg, variables, input_hw, batch=batch, opset=opset,
                              simplify=simplify)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


# ----------------------------------------------------------------------------------------
# jax.export


def jax_inference_fn(cfg: Any, variables: dict, *, with_postprocess: bool = False,
                     native_depthwise: bool = False, score_thr: float = 0.05,
                     iou_thr: float = 0.6, max_num: int = 100) -> Callable[[Array], Any]:
    """The (un-jitted) inference function with the weights closed over.

    ``images (B, H, W, 3)`` NHWC normalised BGR -> raw head output ``(B, P, C + 4K)``, or with
    ``with_postprocess`` the reference detections in input-pixel coordinates
    (:func:`nanodet_jax.postprocess.get_bboxes`): ``{"boxes" (B, M, 4), "scores" (B, M),
    "labels" (B, M) int32 (-1 = empty), "valid" (B, M) bool}``, ``M = max_num``.
    ``native_depthwise`` forces the native grouped depthwise conv (portable across backends).
    """
    model = build_model(cfg, with_aux=False)
    v = _model_variables(model, variables)
    head = cfg.model.arch.head
    strides, reg_max = tuple(int(s) for s in head.strides), int(head.reg_max)

    def fn(images: Array) -> Any:
        if native_depthwise:
            with nn.intercept_methods(_export_interceptor(fold_bn=False)):
                preds = model.apply(v, images, train=False)
        else:
            preds = model.apply(v, images, train=False)
        if not with_postprocess:
            return preds
        det = pp.get_bboxes(preds, images.shape[1:3], strides, reg_max, score_thr, iou_thr,
                            max_num)
        return {"boxes": det.boxes, "scores": det.scores, "labels": det.labels,
                "valid": det.valid}

    return fn


def to_jax_export(cfg: Any, variables: dict, input_hw: Sequence[int] | None = None,
                  batch: int = 1, with_postprocess: bool = False,
                  out_path: str | Path | None = None, *,
                  platforms: Sequence[str] | None = None, overwrite: bool = False) -> bytes:
    """Serialize ``jax.jit(jax_inference_fn(...))`` for ``(batch, H, W, 3)`` float32 inputs.

    The weights are closed over (constants inside the artifact). ``platforms`` (e.g.
    ``("cpu", "cuda")``) defaults to the current backend; when it names any other platform
    the depthwise convs are traced in their native form, valid everywhere. Returns the bytes
    and writes them to ``out_path`` if given (refusing to overwrite unless ``overwrite``).
    """
    h, w = resolve_input_hw(cfg, input_hw)
    out = Path(out_path) if out_path is not None else None
    if out is not None and out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (or --overwrite)")
    current = jax.export.default_export_platform()
    native = platforms is not None and set(platforms) != {current}
    fn = jax.jit(jax_inference_fn(cfg, variables, with_postprocess=with_postprocess,
                                  native_depthwise=native))
    spec = jax.ShapeDtypeStruct((int(batch), h, w, 3), jnp.float32)
    exported = jax.export.export(fn, platforms=platforms)(spec)
    blob = bytes(exported.serialize())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob)
    return blob


def load_jax_export(path: str | Path) -> Callable[..., Any]:
    """Deserialize a :func:`to_jax_export` file; returns ``fn(images)`` (``Exported.call``).

    The ``jax.export.Exported`` object is available as ``fn.exported`` (input avals,
    platforms, ...).
    """
    exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))

    def fn(*args: Any) -> Any:
        return exported.call(*args)

    fn.exported = exported  # type: ignore[attr-defined]
    return fn
