"""Transparent huge pages for the host allocator's large blocks (Linux, glibc >= 2.35).

XLA:CPU allocates each execution's temporary buffer (every activation the train step keeps
for its backward: ~0.2 GB for the synthetic config's step, ~2.2 GB for m_320 at batch 8) with
``posix_memalign`` on one of its worker threads. A block that size does not fit a thread's
malloc arena, so glibc ``mmap``s it fresh and ``munmap``s it when the step ends: every step
the kernel faults it in again 4 KiB at a time (m_320, batch 8, 2-core Xeon: ~542,000 minor
faults and ~1.1 s of system CPU per ~3.5 s step). glibc's tunable ``glibc.malloc.hugetlb=1``
makes malloc ask for transparent huge pages on its mappings (``madvise(MADV_HUGEPAGE)``):
the same step takes ~2,000 faults and ~0.4 s of system CPU, and runs ~10 % faster.

Tunables are read when a process starts, so :func:`reexec_with_hugepages` re-executes the
running command once (``execve``: same pid, same arguments, the environment plus the
tunable) when it would apply: Linux, glibc >= 2.35, transparent huge pages set to
``always`` or ``madvise`` in ``/sys/kernel/mm/transparent_hugepage/enabled``.
``scripts/train.py`` and ``scripts/benchmark.py`` call it first thing when run as commands.
``NANODET_HUGEPAGES=0`` turns it off, ``=1`` skips the checks (the tunable is ignored by a
glibc that does not know it). A ``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb``
is left as it is.

Because the block is unmapped after every step, its memory goes back to the kernel in
between. Steps that follow each other reuse it at once; after a pause of a few seconds (an
evaluation, or another process taking turns with ours, as the train benchmark's
``--reference`` does) a virtual machine may have handed it to its host. This project's
Firecracker VMs report free memory to the host (virtio-balloon free-page reporting, 2 MiB
blocks, ~2 s after they are freed), and the same number of faults then costs several times
the system CPU. m_416, batch 8, 2-core AMD EPYC VM, huge pages on, one process: 4 steps
back to back took ~2,070 faults and 0.26-0.51 s of system CPU each, 4 steps each after a
``time.sleep(4)`` the same faults and 1.97-3.08 s. The training loop runs its steps back to
back, so only the first step after an evaluation pays this.

Not done instead: keeping the block in the heap (``GLIBC_TUNABLES`` with
``glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<large>``)
removes the faults and the pause effect (m_416 above: 0-5 faults and 0.04-0.09 s of system
CPU per step, sleeps or not, same peak RSS), but serialises every thread's malloc on one
lock: the synthetic config's step (batch 16) took 0.168/0.179 s against 0.133/0.150 s with
huge pages (medians of 30 steps, processes alternating; earlier, on a Xeon: 242-269 ms ->
323-361 ms).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ENV_SWITCH = "NANODET_HUGEPAGES"  # "0": never re-execute; "1": re-execute without the checks
MARKER = "NANODET_HUGEPAGES_REEXEC"  # set in the re-executed process: never twice
TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (``always``/``madvise``/``never``), the
    bracketed word of ``path``; ``None`` when it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the running C library when it is glibc, else ``None``."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def hugepage_environ(environ: Mapping[str, str], thp: str | None,
                     glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """The environment to re-execute with (``environ`` plus ``glibc.malloc.hugetlb=1``), or
    ``None`` to run as is (switched off, already re-executed, the tunable already set, or
    huge pages unavailable: ``thp`` not ``always``/``madvise`` or ``glibc`` older than 2.35)."""
    switch = environ.get(ENV_SWITCH, "").strip()
    tunables = environ.get("GLIBC_TUNABLES", "")
    if switch == "0" or environ.get(MARKER) or f"{TUNABLE}=" in tunables:
        return None
    if switch != "1" and (thp not in ("always", "madvise") or glibc is None
                          or glibc < MIN_GLIBC):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    env[MARKER] = "1"
    return env


def reexec_with_hugepages() -> None:
    """Re-execute the running command with huge pages for malloc when that applies (see the
    module docstring); returns only when it does not. Call it before any work starts: the
    process image is replaced (unflushed output is flushed first)."""
    if sys.platform != "linux" or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    env = hugepage_environ(os.environ, thp_mode(), glibc_version())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
