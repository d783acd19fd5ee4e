#!/usr/bin/env python
"""Check a dataset before training.

    python scripts/check_dataset.py --config CFG [--split train|val] [--max-images N]
                                    [--save-grid PATH]

Prints image/box counts, boxes per class, box sizes, the assignment coverage (share of boxes
that contain a prior centre after the resize to the input size: 0 % is the usual cause of
"mAP 0 on my data") and every problem found, each naming the file and what to do; the last
line summarises errors and warnings. ``--max-images`` decodes only N evenly spaced images
(existence is checked for all). ``--save-grid`` also writes a PNG grid of sample images with
their boxes. Exit status: 0 without errors, 1 with errors or when the dataset cannot be read
(warnings such as boxes partly outside the image do not fail).
"""

from __future__ import annotations

import argparse
import sys

from nanodet_jax.config import ConfigError, load_config
from nanodet_jax.data.check import check_dataset, format_report
from nanodet_jax.data.grid import save_sample_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file (.py or reference .yml)")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--max-images", type=int, default=None,
                   help="decode at most N images (default: all)")
    p.add_argument("--save-grid", default=None, metavar="PATH",
                   help="write a PNG grid of sample images with their boxes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        report = check_dataset(cfg, args.split, args.max_images)
    except (ConfigError, OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    if args.save_grid:
        try:
            written = save_sample_grid(cfg, args.split, args.save_grid)
        except (OSError, ValueError) as e:
            print(f"error: --save-grid: {e}", file=sys.stderr)
            return 1
        print(f"sample grid written to {written}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
