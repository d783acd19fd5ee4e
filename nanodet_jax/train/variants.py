"""The train step's ``detach`` variants, compiled ahead of time and side by side.

A run that crosses ``detach_epoch`` needs two executables of the same jitted step (``detach``
is static). Compiled on first use, the second one stops the run for a full compile (~80 s
for m_320 on a 2-core CPU) in the middle of training. :class:`StepVariants` lowers every
variant the run will need at its first batch (tracing holds the Python lock, so it is done
in turn) and compiles them in background threads (XLA releases the lock): the variant
needed first is ready after one compile, the other compiles while the first trains. Each
variant is compiled exactly once; a call whose inputs do not match what a variant was
compiled for is an error rather than a silent recompilation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class StepVariants:
    """``variants(state, batch, detach)`` runs the AOT-compiled ``jitted(state, batch,
    detach)`` (a ``jax.jit`` with ``detach`` static, e.g. from ``jit_train_step``)."""

    def __init__(self, jitted: Callable, needed: Iterable[bool] = ()):
        self._jitted = jitted
        self._needed = list(dict.fromkeys(bool(d) for d in needed))  # in order of need
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._needed)),
                                        thread_name_prefix="compile-step")
        self._compiled: dict[bool, Future] = {}

    def prepare(self, state: Any, batch: Any, detach: bool) -> None:
        """Lower ``detach`` and then every other needed variant for the shapes of ``state``
        and ``batch``, and start compiling each in the background."""
        for d in dict.fromkeys([bool(detach), *self._needed]):
            if d in self._compiled:
                continue
            if hasattr(self._jitted, "lower"):
                lowered = self._jitted.lower(state, batch, d)
                self._compiled[d] = self._pool.submit(lowered.compile)
            else:  # a plain Python step (tests): nothing to compile
                self._compiled[d] = self._pool.submit(
                    lambda d=d: lambda state, batch: self._jitted(state, batch, d))

    def __call__(self, state: Any, batch: Any, detach: bool) -> Any:
        detach = bool(detach)
        if detach not in self._compiled:
            self.prepare(state, batch, detach)
        return self._compiled[detach].result()(state, batch)

    @property
    def compiled(self) -> int:
        """How many variants were compiled (or are compiling)."""
        return len(self._compiled)

    def close(self) -> None:
        """Wait for compiles still running (a short run may end before the second variant
        is needed) and free the threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)
