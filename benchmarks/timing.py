"""Small timing helpers shared by the benchmark suites."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def time_jitted(fn: Callable, *args, repeats: int = 20) -> dict:
    """Compile ``fn`` (already jitted) on ``args``, then time ``repeats`` calls.

    Returns ``{"compile_s", "median_ms", "min_ms", "mean_ms"}``.
    """
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return {"compile_s": round(compile_s, 3), "median_ms": round(statistics.median(times), 3),
            "min_ms": round(min(times), 3), "mean_ms": round(statistics.fmean(times), 3)}
