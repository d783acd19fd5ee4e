"""Shared checks of a convolution op against ``lax.conv_general_dilated`` (value and VJP)."""

from __future__ import annotations

import jax
import numpy as np

TOL = 1e-5


def value_and_vjp(fn):
    """``jit(run)(x, kernel, cot) -> (y, dx, dkernel)`` for ``fn(x, kernel)``."""

    @jax.jit
    def run(x, kernel, cot):
        y, vjp = jax.vjp(fn, x, kernel)
        return (y, *vjp(cot))
    return run


def check(got, ref, name: str, elementwise_scale: str) -> tuple[float, float]:
    """``||got - ref|| / ||ref|| <= TOL`` and elementwise ``|d| <= TOL * (1 + s)`` with
    ``s = |ref|`` (``"elem"``: outputs that are short sums) or ``max|ref|`` (``"max"``:
    long reductions such as kernel gradients). Returns (relative norm, max |d|)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    d = np.abs(got - ref)
    rel = np.linalg.norm(d) / np.linalg.norm(ref)
    assert rel <= TOL, f"{name}: relative norm error {rel:.2e}"
    bound = TOL * (1.0 + (np.abs(ref) if elementwise_scale == "elem" else np.abs(ref).max()))
    assert np.all(d <= bound), f"{name}: max elementwise error {d.max():.2e}"
    return rel, float(d.max())


def compare(fn, reference, x, kernel, cot, scales: tuple[str, str, str]) -> None:
    """``fn(x, kernel)`` against ``reference(x, kernel)``: output, ``dx`` and ``dkernel`` for
    the cotangent ``cot``, each with :func:`check` and its ``scales`` entry."""
    got = value_and_vjp(fn)(x, kernel, cot)
    ref = value_and_vjp(reference)(x, kernel, cot)
    for name, g, r, scale in zip(("y", "dx", "dkernel"), got, ref, scales):
        check(g, r, name, scale)
