"""Max-pool benchmark: the backbone's 3x3/s2 pool with its elementwise backward
(``nanodet_jax.models.max_pool``) against autodiff of ``lax.reduce_window`` (XLA
``select-and-scatter``), forward + backward (``jax.vjp``), on the stem outputs of the
synthetic config (batch 16, 128x128 input) and of NanoDet-Plus-m at 320 and 416 (batch 8).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_jitted
from nanodet_jax.models.max_pool import _reduce_window_pool, max_pool_3x3_s2

# (name, (B, H, W, C)) of the pool's input (the stem's output)
SHAPES = (("synthetic_b16", (16, 64, 64, 24)), ("m_320_b8", (8, 160, 160, 24)),
          ("m_416_b8", (8, 208, 208, 24)))


def value_and_vjp(fn):
    """``jit(run)(x, g) -> (fn(x), vjp(g))`` for a one-argument ``fn``."""

    @jax.jit
    def run(x, g):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(g)[0]
    return run


def bench_case(shape: tuple[int, int, int, int], repeats: int) -> dict:
    """Median ms of forward + backward for both forms, the speedup and their max |dx - dx'|."""
    rng = np.random.default_rng(0)
    b, h, w, c = shape
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, (h + 1) // 2, (w + 1) // 2, c)), jnp.float32)
    fns = {"elementwise_vjp": value_and_vjp(max_pool_3x3_s2),
           "select_and_scatter": value_and_vjp(_reduce_window_pool)}
    ms = {n: time_jitted(f, x, g, repeats=repeats)["median_ms"] for n, f in fns.items()}
    (y0, d0), (y1, d1) = (fns[n](x, g) for n in fns)
    return {"shape": list(shape), "fwd_bwd_ms": ms,
            "speedup": round(ms["select_and_scatter"] / ms["elementwise_vjp"], 2),
            "max_abs_diff_y": float(jnp.max(jnp.abs(y0 - y1))),
            "max_abs_diff_dx": float(jnp.max(jnp.abs(d0 - d1)))}


def run(args) -> dict:
    """Benchmark suite entry point (``scripts/benchmark.py --suite max_pool``)."""
    repeats = int(getattr(args, "repeats", 20))
    shapes = SHAPES[:1] if getattr(args, "quick", False) else SHAPES
    cases = {}
    for name, shape in shapes:
        r = cases[name] = bench_case(shape, repeats)
        print(f"[max_pool] {name:14s} elementwise vjp {r['fwd_bwd_ms']['elementwise_vjp']:7.2f} ms "
              f"select-and-scatter {r['fwd_bwd_ms']['select_and_scatter']:7.2f} ms "
              f"(x{r['speedup']:.1f})", file=sys.stderr, flush=True)
    return {"backend": jax.default_backend(), "repeats": repeats,
            "timing": "median ms of jitted forward + vjp", "cases": cases}
