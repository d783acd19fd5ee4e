"""Locating the reference fixtures and parametrising tests over them.

Fixtures are read in place from ``$NANODET_FIXTURES_DIR`` (default
``../shared/fixtures/reference`` relative to the repository root). A missing directory or
a family with no file is a test *failure*, never a skip: a parity suite that silently tests
nothing is a defect.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    env = os.environ.get("NANODET_FIXTURES_DIR")
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "fixtures" / "reference").resolve()


def fixture_params(pattern: str) -> list:
    """One pytest param per file matching ``pattern`` (id = file stem).

    When the directory or the files are missing, a single param that fails with the reason.
    """
    d = fixtures_dir()
    files = sorted(d.glob(pattern)) if d.is_dir() else []
    if files:
        return [pytest.param(f, id=f.stem) for f in files]
    why = (f"fixture directory {d} does not exist" if not d.is_dir()
           else f"no fixture file matches {pattern!r} in {d}")
    return [pytest.param(why, id=f"MISSING-{pattern}")]


def load_npz(path_or_reason) -> dict[str, np.ndarray]:
    """Load a fixture file fully into a dict; fail the test if it is missing."""
    if isinstance(path_or_reason, str):
        pytest.fail(path_or_reason + " (set NANODET_FIXTURES_DIR to the reference fixtures)")
    with np.load(path_or_reason, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def fixture_file(name: str) -> dict[str, np.ndarray]:
    """Load one named fixture file (e.g. ``losses.npz``); fail if it is missing."""
    p = fixtures_dir() / name
    if not p.is_file():
        pytest.fail(f"fixture file {p} does not exist (set NANODET_FIXTURES_DIR)")
    return load_npz(p)


def group(data: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Sub-dict of keys under ``prefix/`` with the prefix removed."""
    p = prefix.rstrip("/") + "/"
    return {k[len(p):]: v for k, v in data.items() if k.startswith(p)}


def keyed_params(pattern: str, suffix: str) -> list:
    """One param per (file, prefix) for every key ``<prefix>/<suffix>`` of each matching file
    (id ``<stem>-<prefix>``). A missing file, or a file without such keys, is a failing param.
    """
    out = []
    for p in fixture_params(pattern):
        path = p.values[0]
        if isinstance(path, str):  # missing fixture: keep the failing param
            out.append(pytest.param(path, None, id=p.id))
            continue
        with np.load(path) as z:
            found = sorted(k[: -len(suffix) - 1] for k in z.files if k.endswith("/" + suffix))
        if not found:
            out.append(pytest.param(f"no '<prefix>/{suffix}' key in {path}", None, id=p.id))
        out += [pytest.param(path, c, id=f"{p.id}-{c}") for c in found]
    return out


def assert_close(name: str, got, ref, tol: float = 1e-4) -> float:
    """Elementwise ``|got - ref| <= tol * (1 + |ref|)``; returns the max abs error."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    err = np.abs(got - ref)
    bound = tol * (1 + np.abs(ref))
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert np.all(err <= bound), (f"{name}: max |err| {err.max():.3e} exceeds {tol}*(1+|ref|) "
                                  f"at {worst} (got {got[worst]}, ref {ref[worst]})")
    return float(err.max()) if err.size else 0.0


def fixture_files(pattern: str) -> list[Path]:
    """Every file matching ``pattern`` (sorted); fail the test when there is none."""
    p = fixture_params(pattern)
    if isinstance(p[0].values[0], str):
        pytest.fail(p[0].values[0] + " (set NANODET_FIXTURES_DIR to the reference fixtures)")
    return [q.values[0] for q in p]


def head_layout(config_yaml) -> tuple[int, int, tuple[int, ...]]:
    """``(num_classes, reg_max, strides)`` of the head in a fixture's ``config_yaml``."""
    import yaml

    head = yaml.safe_load(str(config_yaml))["model"]["arch"]["head"]
    return int(head["num_classes"]), int(head["reg_max"]), tuple(int(s) for s in head["strides"])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def paired_model_fixture(post: dict[str, np.ndarray]) -> Path:
    """The ``model_*.npz`` whose ``eval/head_out`` is the input of a ``postprocess*.npz``.

    The pairing is read from the data, not from file names: same batch size, image 0's warp
    matrix equal to the model's ``input_img0_warp_matrix`` and, per image, the best score of
    the reference ``get_bboxes`` rows equal to the largest class sigmoid of ``eval/head_out``
    (the best candidate always survives NMS). Fails when no model fixture fits.
    """
    rows = post["get_bboxes_rows_img_cls_x1y1x2y2_score"]
    n_img = post["warp_matrices"].shape[0]
    best = [rows[rows[:, 0] == i, 6].max(initial=-np.inf) for i in range(n_img)]
    tried = []
    for p in fixture_files("model_*.npz"):
        with np.load(p, allow_pickle=False) as z:
            head_out = z["eval/head_out"]
            num_classes = head_layout(z["config_yaml"])[0]
            m0 = z["input_img0_warp_matrix"]
        why = None
        if head_out.shape[0] != n_img:
            why = f"batch {head_out.shape[0]} != {n_img}"
        elif not np.allclose(m0, post["warp_matrices"][0], rtol=1e-9, atol=1e-12):
            why = "input_img0_warp_matrix differs from warp_matrices[0]"
        else:
            top = _sigmoid(head_out[..., :num_classes]).max(axis=(1, 2))
            for i, b in enumerate(best):
                ok = abs(top[i] - b) <= 1e-6 if np.isfinite(b) else top[i] <= 0.05 + 1e-6
                if not ok:
                    why = f"image {i}: best score {top[i]:.7f} != reference rows' {b:.7f}"
                    break
        if why is None:
            return p
        tried.append(f"{p.name}: {why}")
    pytest.fail("no model_*.npz fits the post-processing fixture: " + "; ".join(tried))


def raw_image(height: int, width: int) -> np.ndarray:
    """``raw_image_bgr_uint8`` of the ``val_pipeline*.npz`` with this original size."""
    for p in fixture_files("val_pipeline*.npz"):
        with np.load(p, allow_pickle=False) as z:
            if z["raw_image_bgr_uint8"].shape[:2] == (height, width):
                return z["raw_image_bgr_uint8"]
    pytest.fail(f"no val_pipeline*.npz with a {height}x{width} raw image")


def nms_cases(path) -> list[tuple[str, dict, float, float, int, np.ndarray]]:
    """``(case, group, score_thr, iou_thr, max_num, scores)`` for every case of an
    ``nms*.npz`` file (``scores`` ``(n, C)`` without the dummy background column)."""
    d = load_npz(path)
    cases = sorted({k[: -len("/multi_bboxes")] for k in d if k.endswith("/multi_bboxes")})
    assert cases, f"no <case>/multi_bboxes keys in {path}"
    out = []
    for case in cases:
        g = group(d, case)
        score_thr, iou_thr, max_num = (float(v) for v in g["params_scorethr_iouthr_maxnum"])
        out.append((case, g, score_thr, iou_thr, int(max_num),
                    g["multi_scores_with_bg_column"][:, :-1]))
    return out


def assert_nms_equal(det, g: dict, case: str) -> None:
    """Padded NMS output ``det`` (``boxes``, ``scores``, ``labels``, ``valid``) equals the
    reference rows of case ``g`` exactly, with inert padding after them."""
    ref_dets, ref_labels = g["out_dets_x1y1x2y2_score"], g["out_labels"]
    k = len(ref_labels)
    np.testing.assert_array_equal(det.valid, np.arange(len(det.valid)) < k, err_msg=case)
    np.testing.assert_array_equal(det.labels[:k], ref_labels, err_msg=case)
    np.testing.assert_array_equal(det.boxes[:k], ref_dets[:, :4], err_msg=case)
    np.testing.assert_array_equal(det.scores[:k], ref_dets[:, 4], err_msg=case)
    assert np.all(det.labels[k:] == -1) and not np.any(det.boxes[k:]), case
