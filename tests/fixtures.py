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
