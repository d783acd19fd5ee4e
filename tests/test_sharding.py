"""Data parallelism over a device mesh (``nanodet_jax.train.sharding``): 4 devices = 1 device.

The device count is fixed when JAX starts, so the comparison runs this file as a worker in two
subprocesses on forced CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``):
one device, then four, the same narrow model at 64x64, the same initial variables and the same
three global batches of 8. Each worker trains three steps through ``jit_train_step(step,
mesh)``, runs the evaluation forward + post-processing (``evaluate.predict``) on a few images,
compiles the train step and lists the collectives of its HLO, and checks that a global batch
of 6 is refused on its devices; the parent tests compare what they wrote. Both workers use
``--xla_backend_optimization_level=0`` (LLVM codegen only; the HLO, its partitioning and the
arithmetic are unchanged) to halve the compile time, which is most of this file's time.

The multi-host start (``maybe_initialize_distributed``) is tested with a mocked
``jax.distributed.initialize``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE, BATCH, GTS, STEPS = 64, 8, 3, 3
EVAL_ROWS = 6  # per eval batch: 4 devices pad it to 8 (rows of valid=False)
# per leaf, 4 devices vs 1: max|a - b| <= REL_TOL * max|b| + NOISE. NOISE: float32 rounding of
# O(1) activations summed over the batch, which is all that a quantity that is mathematically
# zero holds (the gradient of a BN bias followed by conv + BN; the running mean of such a
# conv's output): on both device counts those leaves are rounding noise, ~1e-9 in the
# gradient and ~1e-7 in a running mean, in a different order of summation.
REL_TOL, NOISE = 1e-5, 1e-6

def tiny_config(batch: int = BATCH) -> dict:
    """The compile-light tiny model (``tests.configs.light_tiny``) at 64x64 (P = 64 + 16 + 4
    = 84 priors), global batch ``batch``, SGD."""
    from tests.configs import light_tiny

    raw = light_tiny(SIZE)
    raw["device"].update(batchsize_per_gpu=batch, gpu_ids=[0], workers_per_gpu=0)
    # SGD: the update is linear in the gradient, so the comparison sees the step's arithmetic.
    # (Adam divides every gradient element by its own magnitude: the rounding noise of the
    # mathematically-zero gradients above becomes an O(lr) update that differs between any
    # two orders of summation, one device or four.)
    raw["schedule"].update(warmup={"name": "linear", "steps": 2, "ratio": 0.1},
                           optimizer={"name": "SGD", "lr": 0.01, "momentum": 0.9,
                                      "weight_decay": 1e-4})
    return raw


def make_batches(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    """``n`` global training batches: normalised-looking images, 1-3 boxes per image."""
    out = []
    for _ in range(n):
        xy = rng.uniform(0, SIZE - 24, (BATCH, GTS, 2))
        wh = rng.uniform(8, 24, (BATCH, GTS, 2))
        out.append({"image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
                    "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
                    "gt_labels": rng.integers(0, 5, (BATCH, GTS)).astype(np.int32),
                    "gt_mask": np.arange(GTS)[None] < rng.integers(1, GTS + 1, (BATCH, 1))})
    return out


def eval_batches(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Two evaluation batches of 6 rows (the loader's keys), the last row of the second a
    ``valid = False`` pad."""
    out = []
    for k in range(2):
        warp = np.tile(np.eye(3), (EVAL_ROWS, 1, 1))
        warp[:, 0, 0] = warp[:, 1, 1] = 0.5  # 128x128 originals
        out.append({"image": rng.normal(size=(EVAL_ROWS, SIZE, SIZE, 3)).astype(np.float32),
                    "warp_matrix": warp, "orig_hw": np.full((EVAL_ROWS, 2), 128, np.int32),
                    "image_id": np.arange(EVAL_ROWS, dtype=np.int64) + 100 * k + 1,
                    "valid": np.arange(EVAL_ROWS) < EVAL_ROWS - k})
    return out


COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%?\S+ = (.+?) (all-gather|all-reduce|reduce-scatter|"
                        r"all-to-all|collective-permute)(?:-start)?\(")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def collectives(hlo: str) -> list[tuple[str, str, str]]:
    """``(op, result shape, op_name)`` of every collective in an HLO module's text."""
    out = []
    for line in hlo.splitlines():
        m = COLLECTIVE.match(line)
        if m:
            name = OP_NAME.search(line)
            out.append((m.group(2), m.group(1), name.group(1) if name else ""))
    return out


def _dims(shape: str) -> list[list[int]]:
    return [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"\w+\[([\d,]*)\]",
                                                                            shape)]


def worker(out: Path, init: Path) -> None:
    """One device count (set by the parent's XLA_FLAGS): train, evaluate, compile, refuse."""
    import flax.serialization
    import jax

    from nanodet_jax.config import ConfigError, validate
    from nanodet_jax.models import build_model, init_train_variables
    from nanodet_jax.objective import make_objective
    from nanodet_jax.train.evaluate import predict
    from nanodet_jax.train.loop import RunOptions, Trainer
    from nanodet_jax.train.optim import make_optimizer
    from nanodet_jax.train.schedule import make_lr_schedule
    from nanodet_jax.train.sharding import global_batch, make_mesh, replicate
    from nanodet_jax.train.state import create_train_state
    from nanodet_jax.train.step import jit_train_step, make_train_step

    cfg = validate(tiny_config())
    mesh = make_mesh()
    n = jax.device_count()
    res: dict = {"devices": n}
    if init.exists():
        variables = flax.serialization.msgpack_restore(init.read_bytes())
    else:
        variables = init_train_variables(cfg, jax.random.PRNGKey(0), (SIZE, SIZE))
        init.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(variables)))
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, 10)
    step = jit_train_step(make_train_step(make_objective(model, cfg), optimizer,
                                          make_lr_schedule(cfg.schedule, 10)), mesh)
    state = replicate(create_train_state(variables, optimizer, jax.random.PRNGKey(1)), mesh)
    rng = np.random.default_rng(0)
    batches = [global_batch(b, mesh) for b in make_batches(rng, STEPS)]
    compiled = step.lower(state, batches[0], False).compile()  # what step(...) runs
    res["collectives"] = collectives(compiled.as_text())
    img = batches[0]["image"]
    res["batch_sharded"] = (img.sharding.spec == jax.sharding.PartitionSpec("data")
                            and len(img.sharding.device_set) == n
                            and {s.data.shape[0] for s in img.addressable_shards} == {BATCH // n})
    losses = []
    start = jax.device_get(variables["params"])
    for b in batches:
        state, metrics = compiled(state, b)
        losses.append(float(metrics["loss"]))
    res["state_replicated"] = all(leaf.sharding.is_fully_replicated
                                  and len(leaf.sharding.device_set) == n
                                  for leaf in jax.tree.leaves(state))
    res["losses"] = losses
    res["param_change"] = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(start)))
    arrays = {f"state/{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in
              jax.tree_util.tree_leaves_with_path(
                  {"params": state.params, "batch_stats": state.batch_stats,
                   "ema": state.ema_variables})}
    # head outputs spread out (kernel x30, bias 0), so that scores are far from ties (at init
    # they all sit near sigmoid(bias) = 0.01, and rounding decides their order)
    def spread(path, x):
        name = jax.tree_util.keystr(path)
        return x if "gfl_cls" not in name else x * 30 if "kernel" in name else x * 0

    ema = jax.tree_util.tree_map_with_path(spread, state.ema_variables)
    per_image, _ = predict(build_model(cfg, with_aux=False), ema, eval_batches(rng), cfg,
                           mesh=mesh)
    res["eval_ids"] = sorted(per_image)
    for image_id, det in per_image.items():
        for field in ("boxes", "scores", "labels", "valid"):
            arrays[f"eval/{image_id}/{field}"] = np.asarray(getattr(det, field))
    workdir = out.parent / f"refused_{n}"
    try:
        Trainer(validate(tiny_config(batch=6)), workdir, RunOptions(progress=False))
        res["batch6"] = None
    except ConfigError as e:
        res["batch6"] = str(e)
    except Exception as e:  # noqa: BLE001 - one device accepts the batch; the data is absent
        res["batch6"] = f"{type(e).__name__}: {e}"
    res["batch6_wrote"] = workdir.exists()
    np.savez(out, result=json.dumps(res), **arrays)


def _run_worker(out: Path, init: Path, devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0"}
    proc = subprocess.run([sys.executable, __file__, str(out), str(init)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with np.load(out) as z:
        data = {k: z[k] for k in z.files}
    return {"result": json.loads(str(data.pop("result"))), "arrays": data}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The 1-device worker (it writes the initial variables), then the 4-device one."""
    d = tmp_path_factory.mktemp("sharding")
    one = _run_worker(d / "one.npz", d / "init.msgpack", 1)
    four = _run_worker(d / "four.npz", d / "init.msgpack", 4)
    return {1: one, 4: four}


pytestmark = pytest.mark.xdist_group("sharding")


def test_four_devices_really_split_the_batch(runs):
    r1, r4 = runs[1]["result"], runs[4]["result"]
    assert (r1["devices"], r4["devices"]) == (1, 4)
    assert r4["batch_sharded"] and r4["state_replicated"]
    assert r1["batch_sharded"] and r1["state_replicated"]


def _excess(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / (REL_TOL * max|b| + NOISE)``: at most 1 when ``a`` equals ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not b.size:
        return 0.0
    return float(np.max(np.abs(a - b)) / (REL_TOL * np.max(np.abs(b)) + NOISE))


def test_three_steps_on_four_devices_equal_one_device(runs):
    """Params, BN statistics and EMA after 3 steps: 4 devices = 1 device (BN statistics and
    the loss normalisation are over the global batch in both)."""
    a1, a4 = runs[1]["arrays"], runs[4]["arrays"]
    keys = sorted(k for k in a1 if k.startswith("state/"))
    assert keys == sorted(k for k in a4 if k.startswith("state/")) and len(keys) > 100
    worst = max((_excess(a4[k], a1[k]), k) for k in keys)
    assert worst[0] <= 1.0, worst
    np.testing.assert_allclose(runs[4]["result"]["losses"], runs[1]["result"]["losses"],
                               rtol=1e-5)
    assert runs[1]["result"]["param_change"] > 1e-4  # the steps did move the weights


def test_evaluation_on_four_devices_equals_one_device(runs):
    """Forward + exact post-processing of 11 images (4 devices: the batches of 6 padded to 8
    with invalid rows, detections gathered): the same detections as one device."""
    r1, r4 = runs[1], runs[4]
    assert r1["result"]["eval_ids"] == r4["result"]["eval_ids"]
    assert len(r1["result"]["eval_ids"]) == 2 * EVAL_ROWS - 1
    a1, a4 = r1["arrays"], r4["arrays"]
    keys = sorted(k for k in a1 if k.startswith("eval/"))
    assert keys == sorted(k for k in a4 if k.startswith("eval/"))
    assert sum(int(a1[k].sum()) for k in keys if k.endswith("/valid")) > 100  # detections
    for k in keys:
        if k.endswith(("/labels", "/valid")):
            np.testing.assert_array_equal(a4[k], a1[k], err_msg=k)
        else:
            np.testing.assert_allclose(a4[k], a1[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_batch_not_divisible_by_devices_is_refused_before_writing(runs):
    r1, r4 = runs[1]["result"], runs[4]["result"]
    assert r1["batch6"] is None or "not divisible" not in r1["batch6"]
    msg = r4["batch6"]
    assert msg and "device.batchsize_per_gpu" in msg and "device.gpu_ids" in msg
    assert "= 6 is not divisible by the 4 JAX devices" in msg
    assert not r4["batch6_wrote"]


def _batch_by_points_gathers(runs) -> list[tuple[str, str, str]]:
    """All-gathers of the 4-device step whose result has the global batch B as leading
    dimension and the prior count P among the others: per-image work gathered to every
    device."""
    priors = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2
    return [c for c in runs[4]["result"]["collectives"] if c[0] == "all-gather"
            and any(d[:1] == [BATCH] and priors in d[1:] for d in _dims(c[1]))]


def test_step_collectives(runs):
    """What the 4-device step communicates: all-reduces (BN statistics, gradients, the loss
    normalisers) and no all-gather of (B, P, ...) data: the vmapped assigner and its top-k
    stay split along the batch (shard_map over the mesh's data axis)."""
    colls = runs[4]["result"]["collectives"]
    assert any(op == "all-reduce" for op, _, _ in colls)
    assert runs[1]["result"]["collectives"] == []
    gathers = _batch_by_points_gathers(runs)
    assert gathers == [], gathers


# -- configuration and the multi-host start (no subprocess) --------------------------------


def _cfg(**distributed):
    from nanodet_jax.config import validate

    raw = tiny_config()
    raw["device"]["distributed"] = distributed
    return validate(raw)


def test_global_batch_is_per_gpu_times_gpu_count():
    from nanodet_jax.config import ConfigError, validate
    from nanodet_jax.train.sharding import check_batch_divides, global_batch_size

    raw = tiny_config(batch=6)
    raw["device"]["gpu_ids"] = [0, 1]
    assert global_batch_size(validate(raw)) == 12
    assert check_batch_divides(validate(raw), devices=4, processes=2) == 12
    raw["device"]["gpu_ids"] = -1  # the reference's CPU mode
    assert global_batch_size(validate(raw)) == 6
    with pytest.raises(ConfigError, match=r"6 x 1 = 6 is not divisible by the 4 JAX devices"):
        check_batch_divides(validate(raw), devices=4, processes=1)
    with pytest.raises(ConfigError, match=r"divisible by the 4 processes"):
        check_batch_divides(validate(raw), devices=2, processes=4)
    raw["device"]["gpu_ids"] = []
    with pytest.raises(ConfigError, match="device.gpu_ids"):
        global_batch_size(validate(raw))


@pytest.fixture
def mock_init(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_single_process_never_initializes_distributed(mock_init):
    from nanodet_jax.train.sharding import maybe_initialize_distributed

    assert not maybe_initialize_distributed(_cfg(), environ={})
    single_slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert not maybe_initialize_distributed(_cfg(), environ=single_slurm)
    assert not maybe_initialize_distributed(
        _cfg(enabled=False), environ={"NANODET_COORDINATOR_ADDRESS": "h:1"})
    assert mock_init == []


def test_config_coordinator_initializes_distributed_with_its_args(mock_init):
    from nanodet_jax.train.sharding import maybe_initialize_distributed

    cfg = _cfg(coordinator_address="host0:1234", num_processes=2, process_id=0)
    assert maybe_initialize_distributed(cfg, environ={"NANODET_PROCESS_ID": "1"})
    assert mock_init == [{"coordinator_address": "host0:1234", "num_processes": 2,
                          "process_id": 0}]  # the config wins over the environment


@pytest.mark.parametrize("environ, expected", [
    ({"NANODET_COORDINATOR_ADDRESS": "h0:99", "NANODET_NUM_PROCESSES": "4",
      "NANODET_PROCESS_ID": "3"}, {"coordinator_address": "h0:99", "num_processes": 4,
                                   "process_id": 3}),
    ({"JAX_COORDINATOR_ADDRESS": "h0:99"}, {"coordinator_address": "h0:99"}),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}, {}),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
])
def test_environment_initializes_distributed(mock_init, environ, expected):
    """Launchers JAX detects by itself get a bare ``initialize()``."""
    from nanodet_jax.train.sharding import maybe_initialize_distributed

    assert maybe_initialize_distributed(_cfg(), environ=environ)
    assert mock_init == [expected]


def test_enabled_true_always_initializes_and_bad_values_are_refused(mock_init):
    from nanodet_jax.config import ConfigError
    from nanodet_jax.train.sharding import maybe_initialize_distributed

    assert maybe_initialize_distributed(_cfg(enabled=True), environ={})
    assert mock_init == [{}]
    with pytest.raises(ConfigError, match="device.distributed.enabled"):
        _cfg(enabled="yes")


def test_train_script_starts_no_jax_backend_before_the_distributed_start():
    """``scripts/train.py`` loads the config and imports the training modules before
    ``maybe_initialize_distributed``: none of that may start a JAX backend."""
    code = ("import sys; sys.argv = ['x']\n"
            "from nanodet_jax.config import load_config\n"
            "load_config('configs/synthetic.py')\n"
            "import nanodet_jax.data.loader, nanodet_jax.train.loop, nanodet_jax.train.evaluate\n"
            "import nanodet_jax.train.sharding, nanodet_jax.train.checkpoints\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
