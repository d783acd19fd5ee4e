"""``--reference PATH`` of the train benchmark: the checks that run before any timing, and the
conversion of our padded batch to the reference's ``gt_meta`` parts (no reference checkout
is needed: the timing itself is not exercised here)."""

import importlib.util
import re
from argparse import Namespace

import numpy as np
import pytest

from benchmarks import train as train_suite
from benchmarks.reference_train import (
    ReferenceStepper,
    ReferenceUnavailable,
    check_reference,
    to_reference_inputs,
)
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
    assert "--cases goes with --suite train or step_profile only" in capsys.readouterr().err


# A stand-in for a reference checkout: the package layout and the few calls the worker makes
# (config clone/load/freeze, build_model, forward_train, set_epoch), a one-conv torch model.
_FAKE_UTIL = '''
import copy, json


class Node(dict):
    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e

    def __setattr__(self, k, v):
        self[k] = v

    def clone(self):
        return copy.deepcopy(self)

    def defrost(self):
        pass

    def freeze(self):
        pass


def _nodes(x):
    return Node({k: _nodes(v) for k, v in x.items()}) if isinstance(x, dict) else x


cfg = Node()


def load_config(c, path):
    with open(path) as f:
        c.update(_nodes(json.load(f)))
'''
_FAKE_ARCH = '''
import os
import torch


class Fake(torch.nn.Module):
    detach_epoch = 10

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def forward_train(self, gt_meta):
        print("noise on stdout from the reference")  # must not break the protocol
        if os.environ.get("FAKE_REFERENCE_FAIL"):
            raise RuntimeError("the fake reference step failed on purpose")
        assert len(gt_meta["gt_bboxes_ignore"]) == len(gt_meta["gt_bboxes"])
        loss = self.conv(gt_meta["img"]).square().mean()
        return None, loss, {}


def build_model(model_cfg):
    print("the reference prints while it builds its model")  # as the real one does
    return Fake()
'''


@pytest.fixture
def fake_reference(tmp_path):
    import json

    root = tmp_path / "fake_nanodet"
    for d in ("nanodet/util", "nanodet/model/arch", "config"):
        (root / d).mkdir(parents=True)
    (root / "nanodet" / "__init__.py").write_text("")
    (root / "nanodet" / "model" / "__init__.py").write_text("")
    (root / "nanodet" / "util" / "__init__.py").write_text(_FAKE_UTIL)
    (root / "nanodet" / "model" / "arch" / "__init__.py").write_text(_FAKE_ARCH)
    (root / "config" / "nanodet-plus-tiny.yml").write_text(json.dumps({
        "model": {"arch": {"name": "NanoDetPlus", "backbone": {}, "head": {}, "aux_head": {}}},
        "data": {"train": {"input_size": [64, 64]}},
        "schedule": {"optimizer": {"name": "AdamW", "lr": 0.001}}, "grad_clip": 35}))
    return root


def test_reference_steps_take_turns_with_ours(fake_reference, monkeypatch):
    pytest.importorskip("torch")
    calls = []
    walls = iter([0.9, 0.5, 0.5] * 2)  # ours: each turn's first step slower

    def fake_ours(cfg, b, detach):
        def one_step():
            calls.append("ours")
            return next(walls)
        first = {"compile_s": 3.0, "first_step_s": 1.0}
        return one_step, first, {"metrics": {"loss": np.float32(1.0)}}

    monkeypatch.setattr(train_suite, "_compiled_step", fake_ours)
    real_stepper = train_suite.ReferenceStepper

    class Spy(real_stepper):
        def step(self):
            calls.append("ref")
            return super().step()

    monkeypatch.setattr(train_suite, "ReferenceStepper", Spy)
    out = train_suite.time_step_with_reference(train_suite.tiny_config(64), 2, False, 2,
                                               str(fake_reference), "tiny", block=3)
    assert calls == (["ours"] * 3 + ["ref"] * 3) * 2  # turns of three steps each
    ref = out["reference"]
    assert ref["steps"] == 6 and ref["loss_finite"] and ref["epoch"] == 0
    assert ref["optimizer"] == "torch.optim.AdamW" and ref["grad_clip"] == 35.0
    assert 0 < ref["step_s_min"] <= ref["step_s_median"]
    assert ref["peak_rss_mb"] > 0
    # ours over theirs, from the unrounded median: the reported one is rounded to 0.1 ms
    # (the fake step takes well under a millisecond), the ratio to 0.001
    med = ref["step_s_median"]
    assert 0.5 / (med + 5e-5) - 5e-4 <= out["ratio_ours_over_reference"]
    assert out["ratio_ours_over_reference"] <= 0.5 / max(med - 5e-5, 1e-6) + 5e-4
    assert out["compile_s"] == 3.0 and out["first_step_s"] == 1.0
    assert out["step_s_median"] == 0.5  # steady steps only
    assert out["after_switch"]["step_s_median"] == 0.9  # each turn's first step
    assert out["after_switch"]["reference_step_s_median"] > 0
    assert set(out["system_cpu_s_per_step"]) == {"steady", "after_switch"}
    with pytest.raises(ValueError, match="block=1"):
        train_suite.time_step_with_reference(train_suite.tiny_config(64), 2, False, 2,
                                             str(fake_reference), "tiny", block=1)


def test_failing_reference_step_is_a_clear_error(fake_reference, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("FAKE_REFERENCE_FAIL", "1")
    batch = train_suite.random_batch(2, (64, 64), 5)
    with pytest.raises(ReferenceUnavailable, match="failed on purpose") as e:
        ReferenceStepper(fake_reference, "tiny", 5, batch, False)
    assert "the reference step for tiny (batch 2) failed" in str(e.value)
    assert str(fake_reference) in str(e.value)
