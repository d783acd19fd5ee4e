"""``--reference PATH`` of the train benchmark: the checks that run before any timing, and the
conversion of our padded batch to the reference's ``gt_meta`` parts (no reference checkout
is needed: the timing itself is not exercised here)."""

import importlib.util
import re
from argparse import Namespace

import numpy as np
import pytest

from benchmarks import train as train_suite
from benchmarks.reference_train import ReferenceUnavailable, check_reference, to_reference_inputs
from tests.fixtures import REPO_ROOT


def _benchmark_main():
    spec = importlib.util.spec_from_file_location("benchmark_script",
                                                  REPO_ROOT / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_missing_reference_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_checkout"
    with pytest.raises(ReferenceUnavailable, match="no such directory") as e:
        check_reference(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(ReferenceUnavailable, match=r"no nanodet/__init__\.py") as e:
        check_reference(tmp_path)  # exists, but is not a checkout
    assert str(tmp_path) in str(e.value)


def test_train_suite_checks_reference_before_timing(tmp_path, monkeypatch):
    def no_timing(*a, **k):
        raise AssertionError("timing started before the reference was checked")

    monkeypatch.setattr(train_suite, "time_step", no_timing)
    missing = tmp_path / "nope"
    with pytest.raises(ReferenceUnavailable, match=re.escape(str(missing))):
        train_suite.run(Namespace(reference=str(missing), quick=False, repeats=2))
    with pytest.raises(ValueError, match="--quick"):
        train_suite.run(Namespace(reference=str(missing), quick=True, repeats=2))


def test_cli_reference_only_with_train(tmp_path, capsys):
    main = _benchmark_main()
    with pytest.raises(SystemExit) as e:
        main(["--suite", "loss", "--reference", str(tmp_path)])
    assert e.value.code == 2
    assert "--suite train only" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert main(["--suite", "train", "--reference", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--reference {missing}: no such directory" in err


def test_to_reference_inputs_is_nchw_and_drops_padding():
    batch = train_suite.random_batch(3, (64, 96), num_classes=7, boxes=5, pad=8)
    batch["gt_mask"][1, 2:] = False  # 2 boxes
    batch["gt_mask"][2] = False  # no boxes
    batch["gt_mask"][0, 3] = False  # a hole: kept boxes stay in order
    img, boxes, labels = to_reference_inputs(batch)

    assert img.shape == (3, 3, 64, 96) and img.dtype == np.float32
    assert img.flags.c_contiguous
    np.testing.assert_array_equal(img.transpose(0, 2, 3, 1), batch["image"])
    assert [len(b) for b in boxes] == [4, 2, 0] == [len(lab) for lab in labels]
    for i, m in enumerate(batch["gt_mask"]):
        assert boxes[i].shape == (m.sum(), 4) and boxes[i].dtype == np.float32
        assert labels[i].dtype == np.int64
        np.testing.assert_array_equal(boxes[i], batch["gt_boxes"][i][m])
        np.testing.assert_array_equal(labels[i], batch["gt_labels"][i][m])


def test_train_suite_runs_only_the_selected_cases(monkeypatch):
    timed = []
    monkeypatch.setattr(train_suite, "time_step",
                        lambda cfg, b, detach, repeats: timed.append((b, detach)) or {})
    monkeypatch.setattr(train_suite.data_bench, "run", lambda args: {})
    out = train_suite.run(Namespace(quick=False, repeats=2, reference=None,
                                    cases="m-1.5x_416_b8_*"))
    assert sorted(out["cases"]) == ["m-1.5x_416_b8_after_detach", "m-1.5x_416_b8_before_detach"]
    assert timed == [(8, False), (8, True)]


def test_cli_cases_only_with_train(capsys):
    with pytest.raises(SystemExit):
        _benchmark_main()(["--suite", "loss", "--cases", "m_320_*"])
    assert "--cases goes with --suite train only" in capsys.readouterr().err
