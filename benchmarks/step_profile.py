"""Benchmark: where the train step's time goes, from XLA:CPU's own per-kernel trace.

The step of :mod:`benchmarks.train` is compiled with ``xla_cpu_enable_xprof_traceme`` (each
kernel of the executable records a trace event), run once, then ``steps`` times under
``jax.profiler.trace``. Each event is matched to its HLO instruction in the compiled program
and filed by what the instruction's ``op_name`` says it comes from:

- ``part``: ``backbone``, ``fpn``, ``aux_fpn``, ``head``, ``aux_head`` (the modules' scopes),
  ``loss`` (assignment, both heads' losses: the rest of the forward and its transpose),
  ``update`` (clip, AdamW, EMA, the non-finite select: the step's ``update`` scope),
  ``other``, ``unattributed``
  (kernels XLA made without an ``op_name``: layout copies, reversed kernels);
- ``pass``: ``forward`` or ``backward`` (a ``transpose(...)`` of autodiff);
- ``kind``: ``convolution``, ``dot``, ``library`` (YNNPACK fusions: dots, reductions),
  ``fusion`` (XLA's own loop fusions), ``copy``, ``other``.

Times are wall time per step in ms, from each kernel's start to its end (asynchronous ones,
Eigen's convolutions and dots, end well after their launch), split equally among the kernels
running at each moment: the parts add up to ``kernel_ms``, the time when any kernel ran,
next to the step's wall time under the profiler (``step_ms``; the rest is the executor and
waiting). ``top`` lists the costliest instructions.
For m_320 and m_416 at batch 8 before detach (``--cases`` picks among ``m_320_b8``,
``m_416_b8``); ``--quick``: the tiny 128x128 config.
"""

from __future__ import annotations

import collections
import fnmatch
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.train import CONFIG_DIR, case_batch, tiny_config
from nanodet_jax.config import load_config
from nanodet_jax.train.step import fresh_train_step, step_compiler_options

TRACE_OPTION = {"xla_cpu_enable_xprof_traceme": True}
PARTS = ("aux_fpn", "aux_head", "backbone", "fpn", "head")  # module scopes in op_name
CASES = (("m_320_b8", "nanodet_plus_m_320.py", 8), ("m_416_b8", "nanodet_plus_m_416.py", 8))
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def classify(op_name: str, opcode: str, line: str) -> tuple[str, str, str]:
    """``(part, pass, kind)`` of an HLO instruction from its ``op_name`` metadata, opcode and
    text line (see the module docstring)."""
    scopes = op_name.split("/")
    part = next((p for p in scopes if p in PARTS), None)
    if part is None:
        part = ("update" if "update" in scopes else "loss" if "jvp(" in op_name
                else "other" if op_name else "unattributed")
    direction = "backward" if "transpose(" in op_name else "forward"
    kind = ("library" if opcode == "fusion" and "__ynn_fusion" in line
            else opcode if opcode in ("convolution", "dot", "fusion", "copy") else "other")
    return part, direction, kind


def instruction_table(hlo_text: str) -> dict[str, tuple[str, str, str, str]]:
    """Every instruction of a compiled program's text: name -> (part, pass, kind, op_name)."""
    table = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            op = _OP_NAME.search(line)
            op_name = op.group(1) if op else ""
            table[m.group(1)] = (*classify(op_name, m.group(2), line), op_name)
    return table


def kernel_times(trace_dir: str, table: dict) -> collections.Counter:
    """Wall time (ns) per instruction name found in ``table``, from the ``*.xplane.pb`` under
    ``trace_dir``: each kernel runs from its event's start to its ``end: <name>`` event
    (asynchronous kernels, such as Eigen's convolutions and dots, end long after their
    launch event) or its event's end, and every moment is split equally among the kernels
    running then (so the parts add up to the time when any kernel ran)."""
    from jax.profiler import ProfileData

    starts: dict = collections.defaultdict(list)
    stops: dict = collections.defaultdict(list)
    for f in Path(trace_dir).rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(f)).planes:
            for line in plane.lines:
                for ev in line.events:
                    name = ev.name
                    if name.startswith("end: ") and name[5:] in table:
                        stops[name[5:]].append(ev.start_ns)
                    elif name in table:
                        starts[name].append((ev.start_ns, ev.start_ns + ev.duration_ns))
    points = []  # (time, +1 start / -1 stop, name)
    for name, begun in starts.items():
        ends = sorted(stops.get(name, []))
        for i, (t0, t1) in enumerate(sorted(begun)):
            t_end = ends[i] if i < len(ends) and ends[i] >= t0 else t1
            points += [(t0, 1, name), (max(t_end, t1), -1, name)]
    points.sort(key=lambda p: (p[0], p[1]))
    total: collections.Counter = collections.Counter()
    active: collections.Counter = collections.Counter()
    last = None
    for t, sign, name in points:
        if active and last is not None and t > last:
            share = (t - last) / sum(active.values())
            for n, k in active.items():
                total[n] += share * k
        active[name] += sign
        if active[name] <= 0:
            del active[name]
        last = t
    return total


def profile_step(cfg, batch_size: int, detach: bool = False, steps: int = 2,
                 top: int = 15) -> dict:
    """The breakdown of one train step of ``cfg`` (see the module docstring)."""
    step, state = fresh_train_step(cfg, 100)
    batch = jax.device_put(case_batch(cfg, batch_size))
    compiled = step.lower(state, batch, detach).compile(
        compiler_options={**step_compiler_options(), **TRACE_OPTION})
    return profile_compiled(compiled, state, batch, steps, top)


def profile_compiled(compiled, state, batch: dict, steps: int = 2, top: int = 15) -> dict:
    """The breakdown of ``compiled(state, batch) -> (state, metrics)``, a train step compiled
    with :data:`TRACE_OPTION` (``state`` is donated: pass a fresh one), run once untimed and
    then ``steps`` times under the profiler."""
    table = instruction_table(compiled.as_text())
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    walls = []
    with tempfile.TemporaryDirectory(prefix="nanodet_profile_") as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics["loss"])
                walls.append(time.perf_counter() - t0)
        ns = kernel_times(d, table)
    if not ns:
        raise RuntimeError("the trace holds no kernel events: this jaxlib's XLA:CPU does not "
                           "record them with xla_cpu_enable_xprof_traceme")
    per_step = 1e-6 / steps  # ns summed over steps -> ms per step
    by = {k: collections.Counter() for k in ("part", "part_pass", "kind")}
    for name, t in ns.items():
        part, direction, kind, _ = table[name]
        by["part"][part] += t
        by["part_pass"][f"{part}/{direction}"] += t
        by["kind"][kind] += t

    def ms(c: collections.Counter) -> dict:
        return {k: round(v * per_step, 1) for k, v in c.most_common()}

    return {"step_ms": round(statistics.median(walls) * 1e3, 1),
            "kernel_ms": round(sum(ns.values()) * per_step, 1),
            "by_part": ms(by["part"]), "by_part_and_pass": ms(by["part_pass"]),
            "by_kind": ms(by["kind"]),
            "top": [{"instruction": n, "ms": round(t * per_step, 1),
                     "part": table[n][0], "pass": table[n][1], "kind": table[n][2],
                     "op_name": table[n][3][-120:]} for n, t in ns.most_common(top)]}


def run(args) -> dict:
    """The step_profile suite: ``args.quick`` (tiny config) or the m_320/m_416 batch-8 steps
    whose case name matches ``args.cases``."""
    if getattr(args, "quick", False):
        return {"tiny_128_b8": profile_step(tiny_config(), 8)}
    pattern = getattr(args, "cases", "*") or "*"
    out = {}
    for name, config_file, batch_size in CASES:
        if fnmatch.fnmatchcase(name, pattern):
            cfg = load_config(CONFIG_DIR / config_file)
            cfg.model.arch.backbone.pretrain = False
            out[name] = profile_step(cfg, batch_size)
    return out
