#!/usr/bin/env python
"""Train NanoDet-Plus.

    python scripts/train.py --config configs/synthetic.py
    python scripts/train.py --config configs/coco.py --workdir runs/coco \\
        --config.device.batchsize_per_gpu=64 --config.schedule.optimizer.lr=0.0007
    python scripts/train.py --config nanodet-plus-m_416.yml          # a reference YAML
    python scripts/train.py --config configs/coco.py --workdir runs/coco --resume

CONFIG is a project ``.py`` config or a reference NanoDet YAML, trained as written.
``--config.a.b=value`` overrides one field (value parsed as YAML: numbers, lists, true/false).
The workdir (default: the config's ``save_dir``) receives ``config.json``, ``metrics.jsonl``,
``tb/`` (TensorBoard), ``checkpoints/`` (latest), ``best/``, ``model_best.pth``,
``curves.png`` and ``per_class_ap.txt`` (and, after a resume, ``metrics.superseded.jsonl``:
the interrupted run's rows past its checkpoint). A workdir that holds another run is never
overwritten: pass ``--resume`` (or set ``schedule.resume``) to continue it.

Every device takes part (one jitted step over a mesh of all devices; the global batch is
``device.batchsize_per_gpu * len(device.gpu_ids)``). Multi-host: run the same command on
every host, with ``--config.device.distributed.coordinator_address=HOST0:PORT
--config.device.distributed.num_processes=N --config.device.distributed.process_id=I`` (or
the ``NANODET_*`` environment variables; SLURM, Open MPI and TPU pods are detected).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from nanodet_jax.config import ConfigError, load_config, validate
from nanodet_jax.train.checkpoints import ResumeError


def apply_overrides(cfg, overrides: list[str], source: str):
    """``["a.b=value", ...]`` applied to a config (re-validated: unknown fields fail)."""
    raw = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config.{item}: expected --config.FIELD=VALUE")
        node = raw
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--config.{key}: '{'.'.join(parents[:i + 1])}' is not a "
                                  "section of the config")
            node = node[part]
        node[leaf] = yaml.safe_load(text)
    return validate(raw, f"{source} (with --config overrides)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    argv = [a for a in argv if not a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="project .py config or reference .yml")
    p.add_argument("--workdir", help="run directory (default: the config's save_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--force", action="store_true",
                   help="resume even if the config or the dataset changed")
    p.add_argument("--seed", type=int, default=0, help="data order/augmentation/init seed")
    p.add_argument("--workers", type=int, default=None,
                   help="loader processes (default: device.workers_per_gpu, at most #CPUs)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    p.add_argument("--checkpoint-steps", type=int, default=None,
                   help="also checkpoint every N steps (default: every epoch end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    # importing these starts no JAX backend (maybe_initialize_distributed must come first)
    from nanodet_jax.compile_cache import enable_compile_cache
    from nanodet_jax.data.loader import DataError
    from nanodet_jax.train.loop import RunOptions, TrainingStopped, run_training
    from nanodet_jax.train.sharding import maybe_initialize_distributed

    try:
        cfg = load_config(args.config)
        if overrides:
            cfg = apply_overrides(cfg, overrides, args.config)
        maybe_initialize_distributed(cfg)  # multi-host runs only; before any other JAX call
        enable_compile_cache()  # a rerun or resume of the same config skips the compile
        resume = args.resume or bool(cfg.schedule.get("resume"))
        workdir = args.workdir or cfg.save_dir
        metrics = run_training(cfg, workdir, RunOptions(
            resume=resume, force=args.force, seed=args.seed, num_workers=args.workers,
            max_steps=args.max_steps, checkpoint_steps=args.checkpoint_steps,
            progress=not args.no_progress))
    except (ConfigError, ResumeError, TrainingStopped, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import jax

    if metrics and jax.process_index() == 0:
        print("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                               if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    from nanodet_jax.hugepages import reexec_with_hugepages

    reexec_with_hugepages()  # before any work: glibc reads its tunables at start
    sys.exit(main())
