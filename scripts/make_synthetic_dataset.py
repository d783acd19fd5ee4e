#!/usr/bin/env python
"""Generate the synthetic shapes detection dataset (COCO format, deterministic by seed).

  # the data of configs/synthetic.py, into the cache ($NANODET_DATA_DIR or ~/.cache/nanodet_jax)
  python scripts/make_synthetic_dataset.py

  # anywhere else, other settings
  python scripts/make_synthetic_dataset.py data/shapes --seed 3 --train 500 --val 50 --size 256

Writes OUT/train/*.jpg, OUT/val/*.jpg, OUT/annotations/{train,val}.json and the marker
OUT/synthetic.json, atomically (temporary directory renamed at the end). An OUT holding the
same dataset is left as is; any other existing, non-empty OUT is an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nanodet_jax.data.synthetic import (
    CLASS_NAMES,
    SyntheticSpec,
    ensure_synthetic_dataset,
    read_marker,
    split_paths,
    write_synthetic_dataset,
)


def main(argv: list[str] | None = None) -> int:
    d = SyntheticSpec()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output directory (default: the cache directory "
                   "that configs/synthetic.py reads)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train", type=int, default=d.num_train, help="training images")
    p.add_argument("--val", type=int, default=d.num_val, help="validation images")
    p.add_argument("--size", type=int, default=d.size, help="image width = height, pixels")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: CPU count, at most 8; output is the same)")
    args = p.parse_args(argv)
    try:
        spec = SyntheticSpec(args.seed, args.train, args.val, args.size)
    except ValueError as e:
        p.error(str(e))

    t0 = time.perf_counter()
    if args.out is None:
        root = ensure_synthetic_dataset(None, args.seed, args.train, args.val, args.size,
                                        workers=args.workers)
    elif read_marker(args.out) == spec.marker():
        root = Path(args.out)
        print(f"{root} already holds this dataset; nothing to do")
    else:
        try:
            root = write_synthetic_dataset(args.out, spec, args.workers)
        except FileExistsError as e:
            p.error(str(e))
    print(f"synthetic dataset ({', '.join(CLASS_NAMES)}) at {root} "
          f"[{time.perf_counter() - t0:.1f} s]")
    for split in ("train", "val"):
        img_dir, ann = split_paths(root, split)
        print(f"  {split}: img_path={img_dir}  ann_path={ann}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
