#!/usr/bin/env python
"""Convert checkpoints between the reference PyTorch format and nanodet_jax (orbax).

  # reference .ckpt/.pth -> orbax directory (EMA weights preferred, as the reference does)
  python scripts/convert_checkpoint.py --config configs/nanodet_plus_m_416.py \
      --checkpoint nanodet-plus-m_416_checkpoint.ckpt --out workspace/m416_flax

  # orbax directory -> reference-style .pth ({"state_dict": ...}, unprefixed keys)
  python scripts/convert_checkpoint.py --config configs/nanodet_plus_m_416.py \
      --checkpoint workspace/m416_flax --out m416.pth

  # fine-tuning start: an 80-class COCO checkpoint into a 5-class config (head.gfl_cls.* and
  # aux_head.gfl_cls.* are freshly initialised; every replaced entry is named in one warning)
  python scripts/convert_checkpoint.py --config my_5_classes.yml --non-strict \
      --checkpoint nanodet-plus-m_416_checkpoint.ckpt --out workspace/finetune_init

  # fresh model + torchvision ImageNet ShuffleNetV2 backbone (pretraining) -> orbax
  python scripts/convert_checkpoint.py --config configs/coco.py \
      --torchvision-backbone shufflenetv2_x1-5666bf0f80.pth --out workspace/init
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import jax

from nanodet_jax.checkpoint import load_variables, save_variables
from nanodet_jax.config import load_config
from nanodet_jax.convert import flax_to_torch, load_torchvision_backbone
from nanodet_jax.models import build_model, init_variables


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=".py or reference .yml config")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="reference .ckpt/.pth file or orbax directory")
    src.add_argument("--torchvision-backbone", help="torchvision ShuffleNetV2 .pth state dict")
    p.add_argument("--out", required=True, help="orbax directory, or a .pth file")
    p.add_argument("--no-ema", action="store_true", help="take model.* instead of avg_model.*")
    p.add_argument("--non-strict", action="store_true",
                   help="fine-tuning load (e.g. other num_classes): mis-shaped and missing "
                        "entries come from a fresh initialisation (--seed), unexpected ones are "
                        "ignored; all are named in one warning")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0, help="init seed for --non-strict/backbone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    cfg = load_config(args.config)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} exists; pass --overwrite to replace it")
    hw = tuple(cfg.data.val.input_size)[::-1]
    if args.torchvision_backbone:
        base = init_variables(build_model(cfg), jax.random.key(args.seed), hw)
        variables = load_torchvision_backbone(args.torchvision_backbone, base, cfg)
    else:
        variables = load_variables(args.checkpoint, cfg, prefer_ema=not args.no_ema,
                                   strict=not args.non_strict, rng=jax.random.key(args.seed))

    if out.suffix in (".pth", ".pt"):
        import numpy as np
        import torch

        sd = flax_to_torch(variables, reg_max=int(cfg.model.arch.head.reg_max))
        torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}},
                   out)
    else:
        save_variables(out, variables, overwrite=args.overwrite)
    n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    print(f"wrote {out} ({n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
