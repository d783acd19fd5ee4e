#!/usr/bin/env python
"""COCO evaluation of a checkpoint on the config's ``data.val``.

    python scripts/eval.py --config CFG --checkpoint CKPT [--save-dir D] [--batch-size N]
                           [--workers N] [--no-ema] [--precision highest]

``CKPT`` is an orbax directory or a reference ``.ckpt``/``.pth`` (EMA weights ``avg_model.*``
preferred, as the reference; ``--no-ema`` takes the live weights). The reference evaluation
post-processing (score > 0.05, class-aware NMS IoU 0.6, 100 detections per image, exact for
any number of candidates) runs jitted with the forward pass; pycocotools scores the result.

Prints the COCO summary and a per-class AP / AP50 table, and writes into the save dir
(default ``<save_dir of the config>/eval``): ``results.json`` (COCO detections: the dataset's
category ids, ``[x, y, w, h]`` in original-image pixels, score) and ``metrics.json`` (``mAP``,
``AP50``, ``AP75``, ``AP_small``, ``AP_m``, ``AP_l``, ``per_class``...). Existing files are
never overwritten: the pair ``results_1.json``/``metrics_1.json`` (``_2``...) is used instead.
Exit status 0 on success, 1 when the config, checkpoint or dataset cannot be used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help=".py or reference .yml config")
    p.add_argument("--checkpoint", required=True, help="orbax directory or reference .ckpt/.pth")
    p.add_argument("--save-dir", type=Path, help="output folder (default <save_dir>/eval)")
    p.add_argument("--batch-size", type=int,
                   help="images per global batch (default device.batchsize_per_gpu x "
                        "len(device.gpu_ids), at most the number of images; rounded up to a "
                        "multiple of the device count)")
    p.add_argument("--workers", type=int, help="loader worker processes (default "
                                               "device.workers_per_gpu; 0: in this process)")
    p.add_argument("--no-ema", action="store_true", help="use live weights, not avg_model.*")
    p.add_argument("--precision", choices=("default", "high", "highest"),
                   help="matmul/conv precision on accelerators (default: JAX's default)")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # heavy imports after argument parsing (fast --help and usage errors)
    from nanodet_jax.checkpoint import load_variables
    from nanodet_jax.compile_cache import enable_compile_cache
    from nanodet_jax.config import ConfigError, load_config
    from nanodet_jax.data.loader import build_loader
    from nanodet_jax.data.readers import build_dataset
    from nanodet_jax.models import build_model
    from nanodet_jax.train.evaluate import evaluate, format_per_class_table, write_results
    from nanodet_jax.train.sharding import global_batch_size, maybe_initialize_distributed

    ckpt = Path(args.checkpoint)
    try:
        cfg = load_config(args.config)
        maybe_initialize_distributed(cfg)  # multi-host only; before any other JAX call
        enable_compile_cache()
        import jax

        main_process = jax.process_index() == 0
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        t0 = time.perf_counter()
        variables = load_variables(ckpt, cfg, prefer_ema=not args.no_ema)
        which = "live weights" if args.no_ema else "EMA weights when present"
        print(f"loaded {ckpt} ({which}) in {time.perf_counter() - t0:.2f} s")
        dataset = build_dataset(cfg.data.val, cfg.class_names, where="data.val")
        batch = args.batch_size or min(global_batch_size(cfg), len(dataset))
        batch = -(-max(batch, 1) // jax.device_count()) * jax.device_count()  # split evenly
        workers = (int(cfg.device.get("workers_per_gpu", 0)) if args.workers is None
                   else args.workers)
        loader = build_loader(cfg.data.val, dataset.records, batch_size=batch, seed=0,
                              train=False, num_workers=workers, field="data.val")
        model = build_model(cfg, with_aux=False)
        print(f"evaluating {len(dataset)} image(s) of {dataset.source} in {len(loader)} "
              f"batch(es) of {batch} on {jax.device_count()} device(s)")
        t0 = time.perf_counter()
        result = evaluate(model, variables, loader, dataset, cfg,
                          precision=None if args.precision in (None, "default")
                          else args.precision)
        elapsed = time.perf_counter() - t0
    except (ConfigError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not main_process:  # every process has the same result; the first one reports it
        return 0
    print(result.summary)
    print(format_per_class_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(" | ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    print(f"{result.num_images} image(s), {len(result.detections)} detection(s) in "
          f"{elapsed:.1f} s (including compilation)")
    save_dir = args.save_dir or Path(cfg.save_dir) / "eval"
    try:
        res, met = write_results(result, save_dir)
    except OSError as e:
        print(f"error: cannot write the results into {save_dir}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {res} and {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
