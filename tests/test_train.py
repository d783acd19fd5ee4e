"""The training system end to end on a tiny generated dataset and a narrow model.

One run of ``scripts/train.py`` (96 steps, crossing detach_epoch, 3 evaluations) is shared by
the tests that inspect a workdir; the SIGKILL/resume runs use the same config, so the
persistent compilation cache that run fills serves them (the compiled step is the slow part
on CPU). The tests share one xdist group (one worker). Step-level behaviour (non-finite
updates) is tested on a toy objective, which compiles in a second."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.config import ConfigError, nanodet_plus_tiny, validate
from nanodet_jax.convert import load_torch_checkpoint
from nanodet_jax.data.synthetic import (
    CLASS_NAMES,
    SyntheticSpec,
    split_paths,
    write_synthetic_dataset,
)
from nanodet_jax.models.dense_conv import dense_conv, eigen_conv_options
from nanodet_jax.train.checkpoints import (
    ResumeError,
    TrainCheckpoints,
    load_ema_variables,
    read_state,
)
from nanodet_jax.train.loop import (
    CHECKPOINT_WRITE_ERRORS,
    RunOptions,
    Trainer,
    TrainingStopped,
    guarded_write,
)
from nanodet_jax.train.metrics_log import SUPERSEDED, read_rows
from nanodet_jax.train.optim import make_optimizer
from nanodet_jax.train.packed import PackedTree
from nanodet_jax.train.schedule import make_lr_schedule
from nanodet_jax.train.state import create_train_state
from nanodet_jax.train.step import jit_train_step, make_train_step
from tests.fixtures import REPO_ROOT

SIZE = 128
COCO_KEYS = ("mAP", "AP50", "AP75", "AP_small", "AP_m", "AP_l")
LEARN_AP50_FLOOR = 0.02  # AP50 after 192 steps; observed: see test_run_learns
LOSS_KEYS = ("loss", "loss_qfl", "loss_bbox", "loss_dfl", "aux_loss_qfl", "aux_loss_bbox",
             "aux_loss_dfl", "lr", "images_per_s", "epoch", "step")


def tiny_run_config(root: Path, detach_epoch: int = 2, **schedule) -> dict:
    """The narrow model on the synthetic set in ``root``: batch 8, 24 epochs of 8 steps,
    detach from epoch ``detach_epoch`` on, evaluation every 8 epochs, every epoch's
    checkpoint kept."""
    raw = nanodet_plus_tiny(SIZE, CLASS_NAMES)
    raw["model"]["arch"]["detach_epoch"] = detach_epoch
    for split in ("train", "val"):
        img, ann = split_paths(root, split)
        raw["data"][split].update(img_path=str(img), ann_path=str(ann))
    raw["device"].update(batchsize_per_gpu=8, workers_per_gpu=0)
    raw["schedule"].update(total_epochs=24, val_intervals=8,
                           warmup={"name": "linear", "steps": 10, "ratio": 0.01},
                           lr_schedule={"name": "CosineAnnealingLR", "T_max": 24,
                                        "eta_min": 1e-4},
                           optimizer={"name": "AdamW", "lr": 0.004, "weight_decay": 0.05})
    raw["schedule"].update(schedule)
    raw["log"].update(interval=2, keep_checkpoints=24)  # all kept: resume compares step 72
    return raw


pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes",
                                   SyntheticSpec(seed=1, num_train=64, num_val=16, size=SIZE))


@pytest.fixture(scope="module")
def cli(data_root, tmp_path_factory):
    """``scripts/train.py`` on the tiny config with a shared persistent compilation cache."""
    tmp = tmp_path_factory.mktemp("cli")
    raw = tiny_run_config(data_root)
    cfg_file = tmp / "tiny_cfg.py"
    cfg_file.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                        f"    return ml_collections.ConfigDict(json.loads({json.dumps(raw)!r}))\n")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config", str(cfg_file),
           "--no-progress", "--workers", "0"]

    def run_to_end(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([*cmd, *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    return {"cfg": validate(raw), "cfg_file": cfg_file, "run_to_end": run_to_end,
            "start": start, "tmp": tmp}


@pytest.fixture(scope="module")
def run(cli):
    """The full run: 24 epochs x 8 steps, detach from epoch 2, evaluation every 8 epochs."""
    workdir = cli["tmp"] / "work"
    proc = cli["run_to_end"]("--workdir", str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {"cfg": cli["cfg"], "workdir": workdir, "rows": rows, "stdout": proc.stdout}


def _rows(run, kind: str) -> list[dict]:
    return [r for r in run["rows"] if r["kind"] == kind]


def test_run_compiles_the_step_exactly_twice(run):
    """Once per detach variant over a run that crosses detach_epoch: no recompilation."""
    [summary] = _rows(run, "summary")
    assert summary["compiled_step_variants"] == 2 and summary["step"] == 192
    assert summary["skipped"] == 0


def test_run_writes_its_workdir(run):
    w = run["workdir"]
    for name in ("config.json", "metrics.jsonl", "curves.png", "per_class_ap.txt",
                 "model_best.pth"):
        assert (w / name).is_file(), name
    assert any((w / "tb").iterdir())
    saved = json.loads((w / "config.json").read_text())
    assert saved["config"] == run["cfg"].to_dict()
    train, val = _rows(run, "train"), _rows(run, "val")
    assert len(train) == 192 // 2 and all(set(LOSS_KEYS) <= set(r) for r in train)
    assert [r["epoch"] for r in val] == [7, 15, 23] and all(set(COCO_KEYS) <= set(r) for r in val)
    assert [r["step"] for r in val] == [64, 128, 192]
    steps = sorted(int(d.name) for d in (w / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == list(range(8, 193, 8))
    assert cv2.imread(str(w / "curves.png")) is not None
    table = (w / "per_class_ap.txt").read_text()
    assert all(name in table for name in CLASS_NAMES)
    assert "final evaluation: mAP" in run["stdout"]
    sd = load_torch_checkpoint(w / "model_best.pth")
    assert "head.gfl_cls.0.weight" in sd and "aux_head.gfl_reg.bias" in sd


def test_run_learns(run):
    """The loss falls and the EMA model starts detecting the shapes within 192 steps. Seen on
    one CPU: loss 4.0 -> 3.2 (first/last 5 log rows), AP50 0.030 / 0.041 / 0.048 at the three
    evaluations (lr 0.01: 0.019 / 0.031 / 0.055); the floors leave room for another CPU's
    rounding."""
    train = _rows(run, "train")
    first = np.mean([r["loss"] for r in train[:5]])
    last = np.mean([r["loss"] for r in train[-5:]])
    assert last < 0.9 * first, (first, last)
    val = _rows(run, "val")
    assert val[-1]["AP50"] > LEARN_AP50_FLOOR, val


def test_workdir_loads_as_the_best_ema_weights(run):
    """``load_variables`` (eval.py, demo, export) takes a training workdir: the best EMA
    weights, the same tensors as ``model_best.pth``."""
    from nanodet_jax.checkpoint import load_variables
    from nanodet_jax.convert import flax_to_torch

    got = flax_to_torch(load_variables(run["workdir"], run["cfg"]),
                        reg_max=int(run["cfg"].model.arch.head.reg_max))
    ref = load_torch_checkpoint(run["workdir"] / "model_best.pth")
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)


def test_workdir_of_another_run_is_never_reused(run):
    with pytest.raises(ResumeError, match="already holds a training run"):
        Trainer(run["cfg"], run["workdir"], RunOptions(progress=False, num_workers=0))


def test_resume_with_changed_config_is_refused(run, data_root):
    cfg = validate(tiny_run_config(data_root, total_epochs=30))
    with pytest.raises(ResumeError, match=r"schedule.total_epochs: 24 -> 30"):
        Trainer(cfg, run["workdir"], RunOptions(resume=True, progress=False, num_workers=0))
    Trainer(cfg, run["workdir"], RunOptions(resume=True, force=True, progress=False,
                                            num_workers=0))


def test_resume_after_sigkill_is_bit_identical(cli, run):
    """The same run, SIGKILLed after a mid-epoch checkpoint (step 6) and resumed with
    --resume up to step 72, is bit-identical there to the uninterrupted run's checkpoint of
    step 72: params, BN statistics, optimizer state, EMA, counters; and every logged loss and
    the evaluation (step 64) after the resume are equal (the loader resumes mid-epoch;
    detach_epoch and the evaluation come after the resume)."""
    mid, k = 6, 72
    killed = cli["tmp"] / "killed"
    proc = cli["start"]("--workdir", str(killed), "--checkpoint-steps", str(mid))
    target = killed / "checkpoints" / str(mid)
    deadline = time.time() + 1200
    while not target.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.is_dir(), "the run never wrote its mid-epoch checkpoint"
    cli["run_to_end"]("--workdir", str(killed), "--resume", "--max-steps", str(k))
    a = read_state(run["workdir"] / "checkpoints" / str(k))
    b = read_state(killed / "checkpoints" / str(k))
    assert int(a["step"]) == int(b["step"]) == k and sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    resumed = read_rows(killed / "metrics.jsonl")
    # rows the killed run logged past its checkpoint were moved aside on resume: one row per
    # step and kind, equal to the uninterrupted run's
    superseded = read_rows(killed / SUPERSEDED)
    assert all(r["step"] > mid for r in superseded)

    def upto_k(rows):
        return [{key: v for key, v in r.items() if key not in ("wall_s", "images_per_s")}
                for r in rows if mid < r["step"] <= k]

    for kind in ("val", "train"):
        steps = [r["step"] for r in resumed if r["kind"] == kind]
        assert steps == sorted(set(steps)), f"{kind} rows repeat a step: {steps}"
        got = upto_k(r for r in resumed if r["kind"] == kind)
        assert got and got == upto_k(_rows(run, kind)), kind


def test_bad_config_fails_before_writing(data_root, tmp_path):
    raw = tiny_run_config(data_root)
    raw["data"]["val"]["input_size"] = [SIZE, 100]
    with pytest.raises(ConfigError, match=r"data.val.input_size = \[128, 100\]"):
        Trainer(validate(raw), tmp_path / "w", RunOptions(progress=False))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("key", ["AP_5", "loss"])
def test_unknown_save_key_fails_before_writing(data_root, tmp_path, key):
    raw = tiny_run_config(data_root)
    raw["evaluator"]["save_key"] = key
    with pytest.raises(ConfigError, match=f"evaluator.save_key = '{key}' is not a metric"):
        Trainer(validate(raw), tmp_path / "w", RunOptions(progress=False))
    assert not (tmp_path / "w").exists()


def test_reference_save_key_names_are_accepted(data_root):
    from nanodet_jax.train.loop import save_key

    raw = tiny_run_config(data_root)
    raw["evaluator"]["save_key"] = "AP_50"
    assert save_key(validate(raw)) == "AP50"


def test_cli_override_of_unknown_field_names_it(cli, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config",
                           str(cli["cfg_file"]), "--workdir", str(tmp_path / "w"),
                           "--config.schedule.optimzer.lr=0.1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "schedule.optimzer" in proc.stderr
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------- the step on a toy model


def _toy_step():
    """The real step machinery (optimizer, EMA, skip logic) around a 2-parameter objective."""
    cfg = validate(nanodet_plus_tiny(SIZE, CLASS_NAMES))
    optimizer = make_optimizer(cfg, 10)

    def objective(variables, batch, detach):
        w = variables["params"]["w"]
        loss = jnp.sum((w * batch["image"].mean() - 1.0) ** 2)
        bn = {"n": variables["batch_stats"]["n"] + 1}
        return loss, ({"loss_qfl": loss}, bn)

    step = jit_train_step(make_train_step(objective, optimizer,
                                          make_lr_schedule(cfg.schedule, 10)))
    variables = {"params": {"w": jnp.ones(3)}, "batch_stats": {"n": jnp.zeros((), jnp.int32)}}
    state = create_train_state(variables, optimizer, jax.random.PRNGKey(0))
    batch = {"image": jnp.full((1, 2, 2, 3), 2.0), "gt_boxes": jnp.zeros((1, 1, 4)),
             "gt_labels": jnp.zeros((1, 1), jnp.int32), "gt_mask": jnp.zeros((1, 1), bool)}
    return step, state, batch


def test_non_finite_step_is_skipped_inside_the_step():
    step, state, batch = _toy_step()
    state, m = step(state, batch, False)
    assert bool(m["finite"]) and int(state.step) == 1 and int(state.batch_stats["n"]) == 1
    before = jax.device_get(state)
    bad = {**batch, "image": batch["image"] * jnp.nan}
    state, m = step(state, bad, False)
    assert not bool(m["finite"]) and int(state.skipped) == 1 and int(state.bad_streak) == 1
    for field in ("step", "params", "batch_stats", "opt_state", "ema"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(state, field)),
                     getattr(before, field))
    state, m = step(state, batch, False)
    assert bool(m["finite"]) and int(state.step) == 2 and int(state.bad_streak) == 0
    assert int(state.skipped) == 1


def test_fresh_state_has_no_shared_buffers():
    """The state is donated leaf by leaf: no two leaves may share a buffer."""
    _, state, _ = _toy_step()
    ptrs = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
    assert len(ptrs) == len(set(ptrs))


def test_checkpoint_round_trip_is_exact_and_checks_the_structure(tmp_path):
    """A saved state (packed one array per dtype) restores bit for bit, every leaf in a
    buffer of its own; a state of another structure or shape is refused, naming the leaf."""
    step, state, batch = _toy_step()
    state, _ = step(state, batch, False)
    ckpts = TrainCheckpoints(tmp_path, keep=2)
    ckpts.save(state, {"epoch": 3}, best=True)
    fresh = _toy_step()[1]
    restored, meta = ckpts.restore(fresh)
    assert meta == {"epoch": 3}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(a, b)
    ptrs = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(restored)]
    assert len(ptrs) == len(set(ptrs))
    saved = read_state(tmp_path / "best" / "1")
    assert len(saved) == len(jax.tree.leaves(state))
    np.testing.assert_array_equal(saved["ema/params/w"], state.ema_variables["params"]["w"])
    assert int(saved["step"]) == 1
    for later in (2, 3):  # keep=2: the oldest is dropped, the best kept apart
        ckpts.save(state.replace(step=jnp.int32(later)), {"epoch": later})
    assert list(ckpts.latest.all_steps()) == [2, 3] and list(ckpts.best.all_steps()) == [1]
    other = fresh.replace(params={"w": jnp.ones(4), "b": jnp.ones(1)})
    with pytest.raises(ResumeError, match=r"(?s)missing in the checkpoint: params/b.*"
                       r"params/w: saved float32\[3\], this state has float32\[4\]"):
        ckpts.restore(other)
    ckpts.close()
    old = tmp_path / "old_run" / "checkpoints" / "8" / "state"  # one-array-per-leaf format
    old.mkdir(parents=True)
    with pytest.raises(ValueError, match="without 'layout', written by an older nanodet_jax"):
        load_ema_variables(tmp_path / "old_run")


def test_non_finite_steps_in_a_row_stop_the_run(cli, data_root, tmp_path):
    """Several skipped updates in a row stop the run with a message; the last good
    checkpoint (epoch 0 end, step 8) is kept."""
    trainer = Trainer(cli["cfg"], tmp_path / "nan", RunOptions(progress=False,
                                                               num_workers=0))

    def fake_step(state, batch, detach):  # good until step 9, then never finite
        good = int(state.step) < 9
        state = state.replace(step=state.step + int(good), skipped=state.skipped + int(not good),
                              bad_streak=(state.bad_streak + 1) * int(not good))
        return state, {"loss": jnp.float32(1.0 if good else jnp.nan), "lr": jnp.float32(0.1),
                       "finite": jnp.bool_(good)}

    trainer.step_fn = fake_step
    with pytest.raises(TrainingStopped, match="non-finite"):
        trainer.fit()
    kept = sorted(int(d.name) for d in (tmp_path / "nan" / "checkpoints").iterdir()
                  if d.name.isdigit())
    assert kept == [8], kept
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped"] >= 5


def test_unwritable_workdir_fails_before_anything_is_written(data_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"--workdir .*a_file/w is not writable"):
        Trainer(validate(tiny_run_config(data_root)), blocker / "w",
                RunOptions(progress=False))
    assert blocker.read_text() == "not a directory"


def test_failed_checkpoint_write_stops_and_keeps_the_last_good_one(tmp_path):
    """A real write failure (a file size limit, as a full disk would) while saving: the run
    stops with a message naming the last good checkpoint, which still restores."""
    _, state, _ = _toy_step()
    w = jax.random.normal(jax.random.PRNGKey(1), (100_000,))  # ~400 KB, incompressible
    state = state.replace(params={"w": w}, ema=PackedTree.pack({"params": {"w": w}}))
    meta = {"epoch": 1, "loader": {"epoch": 1, "batch": 0}, "best": None, "best_epoch": None}
    ckpts = TrainCheckpoints(tmp_path, keep=3)
    ckpts.save(state, meta)
    later = state.replace(step=state.step + 5, params={"w": w * 2})
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
        with pytest.raises(TrainingStopped, match=r"(?s)writing a checkpoint in .* failed "
                           r"\(a file size limit was hit\).*last good checkpoint is "
                           r".*checkpoints/0; free space and continue with --resume"):
            with guarded_write("a checkpoint", tmp_path, ckpts, CHECKPOINT_WRITE_ERRORS):
                ckpts.save(later, {**meta, "epoch": 2})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    ckpts.close()
    again = TrainCheckpoints(tmp_path, keep=3)
    assert again.latest_step() == 0
    restored, restored_meta = again.restore(state)
    np.testing.assert_array_equal(restored.params["w"], w)
    assert restored_meta["epoch"] == 1
    again.close()


def test_disk_full_is_named():
    import errno

    with pytest.raises(TrainingStopped, match=r"(?s)writing metrics.jsonl in /w failed \(the disk "
                       r"is full\).*No checkpoint was written yet"):
        with guarded_write("metrics.jsonl", Path("/w"), None):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_train_script_help_lists_the_main_options():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--config", "--workdir", "--resume", "--force"):
        assert flag in proc.stdout


def _conv_computations_on_ynnpack(hlo: str) -> tuple[int, int]:
    """(convolutions in the compiled module, those inside a YNNPACK fusion)."""
    ynn = {name.lstrip("%") for name in
           re.findall(r'calls=(%?[\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo)}
    comps = {c.strip().split(" ", 1)[0]: c for c in hlo.split("\n\n") if c.strip()}
    convs = [name for name, body in comps.items() for _ in re.findall(r" convolution\(", body)]
    return len(convs), sum(name.lstrip("%") in ynn for name in convs)


def test_jit_train_step_compiles_eigen_convolutions_with_native_gradients():
    """On CPU the step's dense 3x3 convs, their input and weight gradients are plain
    convolutions compiled off YNNPACK (``dense_conv.eigen_conv_options``), not the tap form."""
    def step(kernel, x, detach):
        grad = jax.grad(lambda k: jnp.sum(jnp.square(dense_conv(x, k, 1, 1))))(kernel)
        return kernel - grad, {"loss": jnp.sum(grad)}

    kernel, x = jnp.ones((3, 3, 8, 8)) * 0.1, jnp.ones((2, 32, 32, 8))
    hlo = jit_train_step(step).lower(kernel, x, False).compile().as_text()
    convs, on_ynn = _conv_computations_on_ynnpack(hlo)
    if jax.default_backend() == "cpu" and eigen_conv_options():
        assert convs >= 2 and on_ynn == 0, (convs, on_ynn)  # forward, dx, dk (dx may fuse)
        assert " dot(" not in hlo  # no tap-wise weight-gradient matmuls
