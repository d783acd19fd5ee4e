"""metrics.jsonl on resume: rows past the checkpoint move aside (nanodet_jax.train.metrics_log)."""

from __future__ import annotations

import json

from nanodet_jax.train.metrics_log import SUPERSEDED, MetricsLog, read_rows, supersede_rows


def _write(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


ROWS = [{"kind": "train", "step": 2, "loss": 3.0}, {"kind": "train", "step": 4, "loss": 2.0},
        {"kind": "val", "step": 4, "mAP": 0.1}, {"kind": "train", "step": 6, "loss": 1.5},
        {"kind": "train", "step": 8, "loss": 1.0}]


def test_rows_past_the_step_and_a_torn_line_move_to_the_superseded_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, ROWS, tail='{"kind": "train", "st')
    assert supersede_rows(path, 4) == 3
    assert read_rows(path) == ROWS[:3]
    moved = (tmp_path / SUPERSEDED).read_text().splitlines()
    assert [json.loads(x) for x in moved[:2]] == ROWS[3:] and moved[2] == '{"kind": "train", "st'


def test_superseded_rows_accumulate_over_resumes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, ROWS)
    supersede_rows(path, 6)
    _write(path, ROWS[:4] + [{"kind": "train", "step": 8, "loss": 0.9},
                             {"kind": "train", "step": 10, "loss": 0.8}])
    supersede_rows(path, 8)
    assert read_rows(tmp_path / SUPERSEDED) == [ROWS[4], {"kind": "train", "step": 10, "loss": 0.8}]
    assert [r["step"] for r in read_rows(path)] == [2, 4, 4, 6, 8]


def test_nothing_to_move_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, ROWS)
    before = path.stat().st_mtime_ns
    assert supersede_rows(path, 8) == 0 and supersede_rows(tmp_path / "missing.jsonl", 0) == 0
    assert path.stat().st_mtime_ns == before and not (tmp_path / SUPERSEDED).exists()


def test_resumed_log_appends_after_the_kept_rows(tmp_path):
    _write(tmp_path / "metrics.jsonl", ROWS)
    log = MetricsLog(tmp_path, resume_step=4)
    log.write({"step": 6, "loss": 1.4}, "train")
    log.close()
    assert [(r["kind"], r["step"]) for r in read_rows(tmp_path / "metrics.jsonl")] == [
        ("train", 2), ("train", 4), ("val", 4), ("train", 6)]
    assert read_rows(tmp_path / SUPERSEDED) == ROWS[3:]
