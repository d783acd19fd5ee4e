"""Benchmark: the jitted training step (forward with the AGM, assignment, both losses,
gradients, clip, AdamW, EMA) on random data.

For m_320, m_416 and m-1.5x_416 (``configs/``) at batch 8 and 16, before and after detach:
compile time (``compile_s``: lowering + XLA compilation of the step, ahead of time), the
first step's time (``first_step_s``), median step time, images/s, the process's peak resident
memory, and its system CPU time and minor page faults per step (``glibc_tunables`` says
whether malloc used huge pages: :mod:`nanodet_jax.hugepages`). Batches are random
images with 20 random GT boxes each (padded to 32). ``--quick``: ShuffleNetV2 0.5x with a
narrow neck/heads at 128x128, batch 8, before detach only. Next to the step, ``data_loader``
holds the loader's images/s for the same input sizes (:mod:`benchmarks.data`: 0, 1 and 2
worker processes), so the two rates can be compared in one JSON.

``--reference PATH`` (a RangiLyu/nanodet checkout, with torch installed; not with
``--quick``): each case also times the reference's own training step on the same images and
GT boxes (:mod:`benchmarks.reference_train`, one subprocess per case), the two taking
turns of three steps (:func:`time_step_with_reference`), and adds ``reference`` (first-step
time, median step time, images/s, peak RSS of that subprocess), ``ratio_ours_over_reference``
(our median steady step time over the reference's), ``ratio_per_round`` and ``after_switch``
(the same for each turn's first step). PATH and torch are checked before any timing starts.
"""

from __future__ import annotations

import fnmatch
import os
import resource
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import data as data_bench
from benchmarks.reference_train import ReferenceStepper, check_reference
from nanodet_jax.config import load_config, nanodet_plus_tiny, validate
from nanodet_jax.train.step import fresh_train_step

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# (reference config name, our config file): config/nanodet-plus-<name>.yml there
CASES = (("m_320", "nanodet_plus_m_320.py"), ("m_416", "nanodet_plus_m_416.py"),
         ("m-1.5x_416", "nanodet_plus_m_1.5x_416.py"))


def tiny_config(size: int = 128, num_classes: int = 5):
    """:func:`~nanodet_jax.config.nanodet_plus_tiny` at ``size`` with ``num_classes``."""
    return validate(nanodet_plus_tiny(size, [f"c{i}" for i in range(num_classes)]),
                    "<tiny benchmark config>")


def random_batch(batch: int, hw: tuple[int, int], num_classes: int, seed: int = 0,
                 boxes: int = 20, pad: int = 32) -> dict:
    """Random numpy batch: ``image`` (B, H, W, 3) float32 N(0, 1), ``gt_boxes`` (B, pad, 4)
    xyxy float32, ``gt_labels`` (B, pad) int32, ``gt_mask`` (B, pad) bool (first ``boxes``)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    xy = rng.uniform(0, [w - 40, h - 40], (batch, pad, 2))
    wh = rng.uniform(8, 120, (batch, pad, 2))
    gt = np.concatenate([xy, np.minimum(xy + wh, [w, h])], -1).astype(np.float32)
    return {"image": rng.normal(size=(batch, h, w, 3)).astype(np.float32), "gt_boxes": gt,
            "gt_labels": rng.integers(0, num_classes, (batch, pad)).astype(np.int32),
            "gt_mask": np.arange(pad)[None].repeat(batch, 0) < boxes}


def case_batch(cfg, batch_size: int) -> dict:
    """The numpy batch a case of ``cfg`` is timed on (the same for ours and the reference)."""
    w, h = cfg.data.train.input_size
    return random_batch(batch_size, (h, w), int(cfg.model.arch.head.num_classes))


def _compiled_step(cfg, batch_size: int, detach: bool):
    """Our jitted step of ``cfg`` on :func:`case_batch`: lowered and compiled ahead of time,
    then run once.

    Returns ``(one_step, first, box)``: ``one_step()`` runs a step (state donated) and
    returns its wall time in seconds, waiting for the result; ``first`` is ``{'compile_s':
    lowering + XLA compilation, 'first_step_s': the first step's wall time}``; ``box`` holds
    the latest ``state`` and ``metrics``."""
    step, state = fresh_train_step(cfg, 100)
    batch = jax.device_put(case_batch(cfg, batch_size))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, detach).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state, "metrics": None}

    def one_step() -> float:
        t0 = time.perf_counter()
        box["state"], box["metrics"] = compiled(box["state"], batch)
        jax.block_until_ready(box["metrics"]["loss"])
        return time.perf_counter() - t0

    return one_step, {"compile_s": compile_s, "first_step_s": one_step()}, box


def _summary(times: list[float], batch_size: int, first: dict, box: dict,
             before, after, steps: int | None = None) -> dict:
    """Medians of ``times``; system CPU and faults between the rusages ``before`` and
    ``after``, per step of the ``steps`` (default ``len(times)``) run between them."""
    med = statistics.median(times)
    steps = steps or len(times)
    return {**{k: round(v, 2) for k, v in first.items()}, "step_s_median": round(med, 4),
            "step_s_min": round(min(times), 4), "images_per_s": round(batch_size / med, 2),
            # host allocator cost (see nanodet_jax.hugepages): per timed step, whole process
            "system_cpu_s_per_step": round((after.ru_stime - before.ru_stime) / steps, 3),
            "minor_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "loss_finite": bool(np.isfinite(float(box["metrics"]["loss"])))}


def time_step(cfg, batch_size: int, detach: bool, repeats: int) -> dict:
    """Compile + time the train step of ``cfg`` at ``batch_size`` (state donated)."""
    one_step, first, box = _compiled_step(cfg, batch_size, detach)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = [one_step() for _ in range(repeats)]
    after = resource.getrusage(resource.RUSAGE_SELF)
    return _summary(times, batch_size, first, box, before, after)


BLOCK = 3  # steps per side and round with --reference: one just after the switch, 2 steady


def _timed(one_step) -> tuple[float, float]:
    """``one_step()``'s wall seconds and the system CPU seconds this process spent in it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    wall = one_step()
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before


def time_step_with_reference(cfg, batch_size: int, detach: bool, rounds: int,
                             reference: str, case: str, block: int = BLOCK) -> dict:
    """:func:`time_step` with the reference's step of ``case`` on the same batch, the two
    taking turns: ``rounds`` rounds of ``block`` steps of ours then ``block`` of the
    reference's (after each side's untimed first step).

    The first step of each side's turn comes just after the other process ran for seconds;
    the other ``block - 1`` follow their own side's step, as every step of a training run
    does. Both are reported, for both sides: ``step_s_median`` and ``reference.step_s_median``
    over the steady steps, and ``after_switch`` with the medians of the turns' first steps.
    They differ where the machine takes back memory a process freed while the other ran
    (a VM's free-page reporting hands it to the host after ~2 s idle, and the next step
    faults it in from the host: see :mod:`nanodet_jax.hugepages`); our system CPU seconds
    per step are reported apart for the two kinds of step. Adds ``reference`` (its times and
    :meth:`~benchmarks.reference_train.ReferenceStepper.close` summary),
    ``ratio_ours_over_reference`` (steady median over steady median) and ``ratio_per_round``
    (the median over rounds of each round's ratio of steady medians: two turns seconds
    apart), and every step's wall time per turn (``rounds_s``)."""
    if block < 2:
        raise ValueError(f"block={block}: a turn needs a steady step after its first")
    one_step, first, box = _compiled_step(cfg, batch_size, detach)
    ours, theirs = [], []  # per round: [(wall, sys), ...] and [wall, ...], ``block`` each
    with ReferenceStepper(reference, case, int(cfg.model.arch.head.num_classes),
                          case_batch(cfg, batch_size), detach) as ref:
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(rounds):
            ours.append([_timed(one_step) for _ in range(block)])
            theirs.append([ref.step() for _ in range(block)])
        after = resource.getrusage(resource.RUSAGE_SELF)
        info = ref.close()
    steady = [w for turn in ours for w, _ in turn[1:]]
    out = _summary(steady, batch_size, first, box, before, after, rounds * block)
    med = statistics.median(t for turn in theirs for t in turn[1:])
    first_ours = statistics.median(turn[0][0] for turn in ours)
    first_theirs = statistics.median(turn[0] for turn in theirs)
    out["system_cpu_s_per_step"] = {
        "steady": round(statistics.mean(s for turn in ours for _, s in turn[1:]), 3),
        "after_switch": round(statistics.mean(turn[0][1] for turn in ours), 3)}
    out["reference"] = {"step_s_median": round(med, 4),
                        "step_s_min": round(min(t for turn in theirs for t in turn[1:]), 4),
                        "images_per_s": round(batch_size / med, 2), **info}
    out["ratio_ours_over_reference"] = round(out["step_s_median"] / med, 3)
    out["ratio_per_round"] = round(statistics.median(
        statistics.median(w for w, _ in a[1:]) / statistics.median(b[1:])
        for a, b in zip(ours, theirs)), 3)
    out["after_switch"] = {"step_s_median": round(first_ours, 4),
                           "reference_step_s_median": round(first_theirs, 4),
                           "ratio_ours_over_reference": round(first_ours / first_theirs, 3)}
    out["rounds_s"] = {"ours": [[round(w, 3) for w, _ in turn] for turn in ours],
                       "reference": [[round(t, 3) for t in turn] for turn in theirs]}
    out["protocol"] = (f"{rounds} rounds of {block} steps of ours then {block} of the "
                       f"reference's; steady = all but each turn's first step")
    return out


def run(args) -> dict:
    """The train suite: ``args.quick``, ``args.repeats``, ``args.reference`` (PATH or None),
    ``args.cases`` (shell pattern of case names to run, default all)."""
    quick = getattr(args, "quick", False)
    reference = getattr(args, "reference", None)
    pattern = getattr(args, "cases", "*") or "*"
    if reference and quick:
        raise ValueError("--reference times the m_320/m_416 cases: it does not go with --quick")
    ref_info = check_reference(reference) if reference else None  # fail before any timing
    # with the reference: rounds of BLOCK steps per side (each compares two turns seconds apart)
    repeats = max(2, min(getattr(args, "repeats", 20), 3 if quick else 6 if reference else 5))
    out: dict = {"cpu_count": os.cpu_count(), "backend": jax.default_backend(),
                 "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
                 "repeats": repeats, "optimizer": "AdamW + clip 35 + EMA",
                 "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "cases": {}}
    if quick:
        out["cases"]["tiny_128_b8_before_detach"] = time_step(tiny_config(), 8, False, repeats)
        return out
    if ref_info:
        out["reference"] = {**ref_info, "step": "forward_train (head + AGM aux head, assigner, "
                            "losses) + backward + clip_grad_norm_ + optimizer step + EMA"}
    for case_name, config_file in CASES:
        cfg = load_config(CONFIG_DIR / config_file)
        cfg.model.arch.backbone.pretrain = False
        for b in (8, 16):
            for detach in (False, True):
                name = f"{case_name}_b{b}_{'after' if detach else 'before'}_detach"
                if not fnmatch.fnmatchcase(name, pattern):
                    continue
                out["cases"][name] = (
                    time_step_with_reference(cfg, b, detach, repeats, reference, case_name)
                    if reference else time_step(cfg, b, detach, repeats))
    out["data_loader"] = data_bench.run(args)
    return out
