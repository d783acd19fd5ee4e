"""ONNX and jax.export artifacts, data-driven over model_*.npz.

Each fixture's model (``config_yaml`` + converted ``state_dict/*``) is exported to ONNX at the
fixture's input size and at a non-square size (H, H + 64), raw and simplified, and run with
onnxruntime: the output must equal the Flax model with sigmoid on the class channels
(<= 1e-4 * (1 + |ref|) elementwise) and, on the fixture images, the reference
``eval/head_out`` (same bound). jax.export must round-trip exactly (<= 1e-6), and the CLI is
run end to end on a reference-style ``.pth`` + ``.yml``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from nanodet_jax import export as E
from nanodet_jax import postprocess as pp
from nanodet_jax.box_ops import center_priors
from nanodet_jax.config import load_config_text
from nanodet_jax.convert import torch_to_flax
from nanodet_jax.models import build_model
from tests.fixtures import REPO_ROOT, assert_close, fixture_params, group, load_npz

MODEL_FIXTURES = fixture_params("model_*.npz")
TOL = 1e-4  # max |onnx - ref| <= TOL * (1 + |ref|), elementwise
SCRIPT = REPO_ROOT / "scripts" / "export_onnx.py"
SMALL_HW = (64, 96)  # jax.export and CLI runs: small and non-square


@functools.lru_cache(maxsize=2)
def _load(path):
    data = load_npz(path)
    cfg = load_config_text(str(data["config_yaml"]), source=f"{path.name}:config_yaml")
    variables = torch_to_flax(group(data, "state_dict"), cfg)
    return data, cfg, variables


def _shapes(data) -> list[tuple[int, int]]:
    h, w = (int(v) for v in data["input_hw"])
    return [(h, w), (h, w + 64)]  # the second is non-square: catches an H/W swap


@functools.lru_cache(maxsize=8)
def _onnx(path, hw: tuple[int, int], simplify: bool):
    """``export_onnx_model(simplify=True)`` is ``simplify_onnx`` of the raw export."""
    if simplify:
        return E.simplify_onnx(_onnx(path, hw, False))
    _, cfg, variables = _load(path)
    return E.export_onnx_model(cfg, variables, hw, simplify=False)


def _run_onnx(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"data": x})[0]


def _with_sigmoid(y, num_classes: int) -> np.ndarray:
    y = np.asarray(y, np.float64)
    return np.concatenate([1 / (1 + np.exp(-y[..., :num_classes])), y[..., num_classes:]], -1)


@functools.lru_cache(maxsize=4)
def _jax_case(path, hw: tuple[int, int]):
    """Seeded NCHW input and the Flax model's output with sigmoid on the class channels."""
    _, cfg, variables = _load(path)
    x = np.random.default_rng(hw[0] * 1000 + hw[1]).normal(size=(1, 3, *hw)).astype(np.float32)
    model = build_model(cfg, with_aux=False)
    y = jax.jit(lambda v, im: model.apply(v, im, train=False))(
        variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    return x, _with_sigmoid(y, int(cfg.model.arch.head.num_classes))


def _signature(model) -> list:
    def sig(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_value for d in t.shape.dim]
    return [sig(v) for v in model.graph.input] + [sig(v) for v in model.graph.output]


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_onnx_graph_contract(path):
    data, cfg, variables = _load(path)
    head = cfg.model.arch.head
    depthwise = [k for k in jax.tree_util.tree_leaves(variables["params"]["backbone"])
                 + jax.tree_util.tree_leaves(variables["params"]["fpn"])
                 + jax.tree_util.tree_leaves(variables["params"]["head"])
                 if k.ndim == 4 and k.shape[2] == 1 and k.shape[3] > 1]
    for hw in _shapes(data):
        n_priors = center_priors(*hw, head.strides).shape[0]
        for simplify in (False, True):
            m = _onnx(path, hw, simplify)
            f32 = onnx.TensorProto.FLOAT
            assert _signature(m) == [
                ("data", f32, [1, 3, *hw]),
                ("output", f32, [1, n_priors, head.num_classes + 4 * (head.reg_max + 1)])]
            assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [
                E.DEFAULT_OPSET]
            assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
            hist = E.onnx_op_histogram(m)
            # depthwise convs exported natively (Conv group = C), never as shifted taps
            groups = [a.i for n in m.graph.node if n.op_type == "Conv" for a in n.attribute
                      if a.name == "group" and a.i > 1]
            assert len(groups) == len(depthwise), (len(groups), len(depthwise))
            assert sorted(groups) == sorted(k.shape[3] for k in depthwise)
            pools = [n for n in m.graph.node if n.op_type == "MaxPool"]
            assert pools and all(len(E._ints_attr(n, "kernel_shape", [])) == 2 for n in pools)
            # inference weights only: initializer count bounded by the inference params
            n_init = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
            n_params = sum(x.size for k in ("backbone", "fpn", "head")
                           for x in jax.tree_util.tree_leaves(variables["params"][k]))
            assert n_init < 1.05 * n_params, (n_init, n_params)
            meta = {p.key: p.value for p in m.metadata_props}
            assert meta["input_hw"] == f"[{hw[0]}, {hw[1]}]"
            print(f"\n{path.name} {hw} simplify={simplify}: {sum(hist.values())} nodes {hist}")


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_onnx_matches_jax_model(path):
    data, _, _ = _load(path)
    for hw in _shapes(data):
        x, ref = _jax_case(path, hw)
        for simplify in (False, True):
            err = assert_close(f"onnx {hw} simplify={simplify}", _run_onnx(_onnx(path, hw,
                                                                               simplify), x),
                               ref)
            print(f"\n{path.name} {hw} simplify={simplify}: max |onnx - jax| {err:.2e}")


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_onnx_matches_reference_head_out(path):
    data, cfg, _ = _load(path)
    hw = _shapes(data)[0]
    ref = _with_sigmoid(data["eval/head_out"], int(cfg.model.arch.head.num_classes))
    images = data["input_images"]
    assert images.shape[2:] == hw
    for simplify in (False, True):
        got = np.concatenate([_run_onnx(_onnx(path, hw, simplify), images[i:i + 1])
                              for i in range(images.shape[0])])
        err = assert_close(f"onnx simplify={simplify} vs eval/head_out", got, ref)
        print(f"\n{path.name} simplify={simplify}: max |onnx - reference| {err:.2e}")


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_jax_export_round_trip(path, tmp_path):
    _, cfg, variables = _load(path)
    hw, batch = SMALL_HW, 2
    images = jnp.asarray(np.random.default_rng(7).normal(size=(batch, *hw, 3)), jnp.float32)
    out = tmp_path / "model.jaxexp"
    blob = E.to_jax_export(cfg, variables, hw, batch=batch, out_path=out)
    assert out.read_bytes() == blob
    with pytest.raises(FileExistsError):
        E.to_jax_export(cfg, variables, hw, batch=batch, out_path=out)
    fn = E.load_jax_export(out)
    assert fn.exported.in_avals[0].shape == (batch, *hw, 3)
    got = fn(images)
    ref = jax.jit(E.jax_inference_fn(cfg, variables))(images)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-6)
    # weights passed as arguments instead of closed over: XLA may round differently
    plain = jax.jit(build_model(cfg, with_aux=False).apply)(variables, images)
    assert_close("jax.export vs model.apply", got, plain, tol=1e-6)

    # several target platforms: lowered with the native (portable) depthwise convolution
    multi = jax.export.deserialize(bytearray(E.to_jax_export(cfg, variables, hw,
                                                             platforms=("cpu", "cuda"))))
    assert multi.platforms == ("cpu", "cuda")
    groups = re.findall(r"feature_group_count = (\d+)", multi.mlir_module())
    assert any(int(g) > 1 for g in groups)

    # with_postprocess: the reference detections of the same head output
    E.to_jax_export(cfg, variables, hw, batch=batch, with_postprocess=True,
                    out_path=tmp_path / "pp.jaxexp")
    det = E.load_jax_export(tmp_path / "pp.jaxexp")(images)
    head = cfg.model.arch.head
    want = jax.jit(lambda p: pp.get_bboxes(p, hw, head.strides, head.reg_max))(got)
    assert sorted(det) == ["boxes", "labels", "scores", "valid"]
    assert det["boxes"].shape == (batch, 100, 4) and bool(np.any(det["valid"]))
    for k in ("labels", "valid"):
        np.testing.assert_array_equal(np.asarray(det[k]), np.asarray(getattr(want, k)), k)
    for k in ("boxes", "scores"):
        np.testing.assert_allclose(np.asarray(det[k]), np.asarray(getattr(want, k)), rtol=1e-6,
                                   atol=1e-5, err_msg=k)


def test_input_hw_resolution_and_validation(tmp_path):
    cfg = _load(MODEL_FIXTURES[0].values[0])[1]
    w, h = cfg.data.val.input_size
    assert E.resolve_input_hw(cfg) == (h, w)
    wide = cfg.copy_and_resolve_references()
    wide.data.val.input_size = [416, 320]  # configs store [w, h]
    assert E.resolve_input_hw(wide) == (320, 416)
    assert E.resolve_input_hw(cfg, (64, 96)) == (64, 96)
    for bad in [(320, 330), (100, 320), (0, 32)]:
        with pytest.raises(ValueError, match="multiples of 32"):
            E.resolve_input_hw(cfg, bad)
    with pytest.raises(ValueError, match="opset"):
        E.export_onnx_model(cfg, {}, (64, 64), opset=11)
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(FileExistsError):
        E.to_onnx(cfg, {}, tmp_path / "x.onnx", (64, 64))


def _script_main():
    spec = importlib.util.spec_from_file_location("export_onnx_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _write_reference_files(path, tmp_path):
    data, _, _ = _load(path)
    ckpt, cfg_file = tmp_path / "model.pth", tmp_path / "config.yml"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v))
                               for k, v in group(data, "state_dict").items()}}, ckpt)
    cfg_file.write_text(yaml.safe_dump(yaml.safe_load(str(data["config_yaml"]))))
    return cfg_file, ckpt


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_export_script_errors(path, tmp_path, capsys):
    cfg_file, ckpt = _write_reference_files(path, tmp_path)
    main, out = _script_main(), tmp_path / "m.onnx"
    base = ["--config", str(cfg_file), "--checkpoint", str(ckpt), "--out", str(out)]
    cases = [(base + ["--input-shape", "320,330"], "multiples of 32"),
             (base + ["--input-shape", "320"], "H,W"),
             (["--config", str(cfg_file), "--checkpoint", str(tmp_path / "none.pth"),
               "--out", str(out)], "does not exist"),
             (base + ["--opset", "11"], "opset")]
    out_exists = tmp_path / "exists.onnx"
    out_exists.write_bytes(b"keep")
    cases.append((base[:-1] + [str(out_exists)], "--overwrite"))
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
        assert msg in capsys.readouterr().err, (argv, msg)
    assert out_exists.read_bytes() == b"keep" and not out.exists()


@pytest.mark.parametrize("path", MODEL_FIXTURES)
def test_export_script_end_to_end(path, tmp_path):
    data, _, _ = _load(path)
    cfg_file, ckpt = _write_reference_files(path, tmp_path)
    hw = SMALL_HW
    out, jexp = tmp_path / "model.onnx", tmp_path / "model.jaxexp"
    cmd = [sys.executable, str(SCRIPT), "--config", str(cfg_file), "--checkpoint", str(ckpt),
           "--out", str(out), "--input-shape", f"{hw[0]},{hw[1]}", "--jax-export", str(jexp)]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote" in r.stdout
    x, ref = _jax_case(path, hw)
    m = onnx.load(out)
    assert _signature(m)[0] == ("data", onnx.TensorProto.FLOAT, [1, 3, *hw])
    assert_close("script onnx", _run_onnx(m, x), ref)
    got = E.load_jax_export(jexp)(jnp.asarray(x.transpose(0, 2, 3, 1)))
    num_classes = int(yaml.safe_load(str(data["config_yaml"]))["model"]["arch"]["head"][
        "num_classes"])
    assert_close("script jax.export", _with_sigmoid(got, num_classes), ref, tol=1e-6)
