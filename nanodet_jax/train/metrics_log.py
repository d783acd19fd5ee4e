"""Where training metrics go: ``metrics.jsonl`` (one JSON row per log step or evaluation),
TensorBoard scalars, and ``curves.png`` (loss terms and lr per step, mAP/AP50 per evaluation).
Only the first JAX process writes.

A resumed run continues from its last checkpoint, so the rows an interrupted run logged after
that checkpoint describe steps that are done again: on resume they move from
``metrics.jsonl`` to ``metrics.superseded.jsonl`` (appended there, never deleted), and
TensorBoard is told to drop its events past the checkpoint (``purge_step``). Each step then
has one row in ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_TERMS = ("loss", "loss_qfl", "loss_bbox", "loss_dfl", "aux_loss_qfl", "aux_loss_bbox",
              "aux_loss_dfl")


SUPERSEDED = "metrics.superseded.jsonl"


class MetricsLog:
    """Appends rows to ``<workdir>/metrics.jsonl`` and TensorBoard (``<workdir>/tb``).

    ``resume_step``: the step a resumed run restarts from (its checkpoint's); rows logged
    past it are superseded (module docstring). ``None`` for a fresh run.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True,
                 resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            if resume_step is not None:
                supersede_rows(self.path, resume_step)
            self._tb = SummaryWriter(str(self.workdir / "tb"), purge_step=(
                None if resume_step is None else resume_step + 1))

    def write(self, row: dict[str, Any], kind: str) -> None:
        """``kind`` is ``train`` (a log step) or ``val`` (an evaluation); ``row`` must hold
        ``step``."""
        if not self.enabled:
            return
        row = {"kind": kind, **{k: _plain(v) for k, v in row.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)):
                self._tb.add_scalar(f"{kind}/{k}", v, row["step"])
        self._tb.flush()

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def supersede_rows(path: str | Path, step: int) -> int:
    """Move the rows of ``path`` (a ``metrics.jsonl``) whose ``step`` is past ``step``, and a
    torn last line, to :data:`SUPERSEDED` next to it (appended, as written); returns how many
    lines moved. The moved lines are on disk before ``path`` is rewritten (atomically), so
    an interruption can leave a line in both files but never in neither."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            stale = isinstance(row.get("step"), int) and row["step"] > step
        except (json.JSONDecodeError, AttributeError):
            stale = bool(line.strip())
        (moved if stale else keep).append(line)
    if not moved:
        return 0
    with open(path.with_name(SUPERSEDED), "a") as f:
        f.write("".join(line + "\n" for line in moved))
        f.flush()
        os.fsync(f.fileno())
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    return len(moved)


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a ``metrics.jsonl`` (a torn last line of a killed run is skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_curves(rows: list[dict], path: str | Path) -> Path:
    """``curves.png``: loss terms (log scale) and lr against the step; mAP and AP50 against
    the step of each evaluation."""
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for term in LOSS_TERMS:
        pts = [(r["step"], r[term]) for r in train if isinstance(r.get(term), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=term, lw=1.6 if term == "loss" else 1.0)
    ax.set(title="loss terms", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    pts = [(r["step"], r["lr"]) for r in train if isinstance(r.get("lr"), (int, float))]
    if pts:
        axes[1].plot(*zip(*pts))
    axes[1].set(title="learning rate", xlabel="step")
    for key in ("mAP", "AP50"):
        pts = [(r["step"], r[key]) for r in val if isinstance(r.get(key), (int, float))]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=key)
    axes[2].set(title="validation (EMA weights)", xlabel="step", ylim=(0, 1))
    axes[2].legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
