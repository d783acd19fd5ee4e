"""Depthwise-conv benchmark: native grouped conv vs tap form on NanoDet-Plus-m-320 shapes.

For every case times (after compilation, median of ``--repeats``; fewer repeats for calls
slower than 50 ms) the jitted forward and the jitted ``value_and_grad`` w.r.t. ``(x, kernel)``
of ``sum(y * cotangent)`` for ``impl="native"`` and ``impl="taps"`` (custom VJP), plus the
gradient of the same tap forward differentiated by JAX itself (``taps_autodiff``), and reports
the speedups native/taps and the relative error of taps vs native.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_jitted
from nanodet_jax.models.depthwise import _taps_forward, depthwise_conv

# (name, (H, W, C), kernel, stride) for NanoDet-Plus m (ShuffleNetV2 1.0x, GhostPAN 96) at 320.
SHAPES = (
    ("backbone.stage2.0.branch1", (80, 80, 24), 3, 2),
    ("backbone.stage2.0.branch2", (80, 80, 58), 3, 2),
    ("backbone.stage2.x", (40, 40, 58), 3, 1),
    ("backbone.stage3.0", (40, 40, 116), 3, 2),
    ("backbone.stage3.x", (20, 20, 116), 3, 1),
    ("backbone.stage4.0", (20, 20, 232), 3, 2),
    ("backbone.stage4.x", (10, 10, 232), 3, 1),
    ("fpn.ghost.shortcut.p3", (40, 40, 192), 5, 1),
    ("fpn.ghost.cheap.p3", (40, 40, 48), 3, 1),
    ("fpn.downsamples.0", (40, 40, 96), 5, 2),
    ("head.cls_convs.p3", (40, 40, 96), 5, 1),
    ("head.cls_convs.p4", (20, 20, 96), 5, 1),
    ("head.cls_convs.p6", (5, 5, 96), 5, 1),
)
BATCH16 = ("backbone.stage2.0.branch2", "backbone.stage2.x", "backbone.stage3.0",
           "fpn.ghost.shortcut.p3", "fpn.downsamples.0", "head.cls_convs.p3",
           "head.cls_convs.p4")
QUICK = (("backbone.stage2.0.branch1", 1), ("backbone.stage2.x", 1), ("fpn.downsamples.0", 1),
         ("head.cls_convs.p3", 1), ("head.cls_convs.p3", 4))


def _time(fn, *args, repeats: int) -> dict:
    first = time_jitted(fn, *args, repeats=1)
    if first["median_ms"] > 50.0:
        repeats = min(repeats, 5)
    out = time_jitted(fn, *args, repeats=repeats)
    out["compile_s"] = first["compile_s"]
    out["repeats"] = repeats
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_case(name: str, hwc: tuple[int, int, int], k: int, stride: int, batch: int,
               repeats: int) -> dict:
    """Time forward and value_and_grad for one depthwise shape (timings in ms, speedups, errors)."""
    h, w, c = hwc
    pad = k // 2
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, c)) / k, jnp.float32)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cot = jnp.asarray(rng.standard_normal((batch, ho, wo, c)), jnp.float32)

    fwds = {impl: jax.jit(lambda a, b, impl=impl: depthwise_conv(a, b, stride, pad, impl))
            for impl in ("native", "taps")}
    # The cotangent is an argument (not a closure constant XLA could fold into the program).
    losses = {impl: (lambda a, b, t, i=impl: jnp.sum(depthwise_conv(a, b, stride, pad, i) * t))
              for impl in ("native", "taps")}
    losses["taps_autodiff"] = lambda a, b, t: jnp.sum(_taps_forward(a, b, stride, pad) * t)
    grads = {n: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for n, f in losses.items()}

    res = {"name": name, "shape": [batch, h, w, c], "kernel": k, "stride": stride}
    res["fwd_ms"] = {n: _time(f, x, kernel, repeats=repeats)["median_ms"] for n, f in fwds.items()}
    res["grad_ms"] = {n: _time(f, x, kernel, cot, repeats=repeats)["median_ms"]
                      for n, f in grads.items()}
    res["fwd_speedup"] = round(res["fwd_ms"]["native"] / res["fwd_ms"]["taps"], 2)
    res["grad_speedup"] = round(res["grad_ms"]["native"] / res["grad_ms"]["taps"], 2)
    _, (gx_n, gk_n) = grads["native"](x, kernel, cot)
    ref = {"y": fwds["native"](x, kernel), "dx": gx_n, "dk": gk_n}
    _, (gx_t, gk_t) = grads["taps"](x, kernel, cot)
    got = {"y": fwds["taps"](x, kernel), "dx": gx_t, "dk": gk_t}
    res["rel_err_taps_vs_native"] = {n: float(f"{_rel(got[n], ref[n]):.2e}") for n in ref}
    return res


def run(args) -> dict:
    """Benchmark suite entry point (``scripts/benchmark.py --suite depthwise``)."""
    repeats = int(getattr(args, "repeats", 20))
    by_name = {n: (hwc, k, s) for n, hwc, k, s in SHAPES}
    if getattr(args, "quick", False):
        cases = list(QUICK)
    else:
        cases = [(n, 1) for n, *_ in SHAPES] + [(n, 16) for n in BATCH16]
    results = []
    for name, batch in cases:
        hwc, k, s = by_name[name]
        r = bench_case(name, hwc, k, s, batch, repeats)
        results.append(r)
        print(f"[depthwise] B={batch:2d} {name:28s} k{k} s{s} "
              f"fwd native {r['fwd_ms']['native']:8.3f} taps {r['fwd_ms']['taps']:7.3f} ms "
              f"(x{r['fwd_speedup']:.1f}) | grad native {r['grad_ms']['native']:8.3f} "
              f"taps {r['grad_ms']['taps']:7.3f} autodiff {r['grad_ms']['taps_autodiff']:8.3f} ms "
              f"(x{r['grad_speedup']:.1f})", file=sys.stderr, flush=True)
    return {"backend": jax.default_backend(), "repeats": repeats, "timing": "median ms after jit",
            "cases": results}
