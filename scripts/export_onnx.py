#!/usr/bin/env python
"""Export a NanoDet-Plus checkpoint to ONNX (reference layout) and optionally jax.export.

  python scripts/export_onnx.py --config configs/nanodet_plus_m_416.py \
      --checkpoint nanodet-plus-m_416_checkpoint.ckpt --out nanodet-plus-m_416.onnx

  # non-square input (H=320, W=416) plus a serialized jax.export artifact
  python scripts/export_onnx.py --config configs/nanodet_plus_m_416.py \
      --checkpoint workspace/m416_flax --out m.onnx --input-shape 320,416 --jax-export m.jaxexp

ONNX: input ``data`` float32 (1, 3, H, W) normalised BGR (mean/std not in the graph), output
``output`` (1, P, C + 4*(reg_max+1)) with sigmoid class scores and raw box-distribution
logits. jax.export: fn(images (1, H, W, 3) NHWC) -> raw head output (1, P, C + 4K), weights
embedded. ``--input-shape`` is H,W; the default is the config's ``data.val.input_size``
(written [w, h] in configs). Needs ``pip install 'nanodet_jax[export]'``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got {text!r}") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"H,W = {h},{w}: both must be positive multiples of 32")
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=".py or reference .yml config")
    p.add_argument("--checkpoint", required=True,
                   help="reference .ckpt/.pth file or nanodet_jax orbax directory")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--input-shape", type=_parse_hw, default=None, metavar="H,W",
                   help="network input height,width (multiples of 32); default: the "
                        "config's data.val.input_size")
    p.add_argument("--jax-export", metavar="PATH", help="also write a jax.export artifact")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset (>= 13; default 13)")
    p.add_argument("--no-simplify", action="store_true",
                   help="skip the onnxruntime constant-folding / fusion pass")
    p.add_argument("--no-ema", action="store_true", help="take model.* instead of avg_model.*")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)

    if not Path(args.config).is_file():
        p.error(f"--config {args.config} does not exist")
    if not Path(args.checkpoint).exists():
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    for flag, path in (("--out", args.out), ("--jax-export", args.jax_export)):
        if path is not None and Path(path).exists() and not args.overwrite:
            p.error(f"{flag} {path} exists; pass --overwrite to replace it")
    if args.opset < 13:
        p.error(f"--opset {args.opset}: jax2onnx needs opset >= 13")
    if args.jax_export is not None and Path(args.jax_export).resolve() == Path(args.out).resolve():
        p.error("--jax-export and --out must be different files")

    from nanodet_jax import export
    from nanodet_jax.checkpoint import load_variables
    from nanodet_jax.config import load_config

    try:
        cfg = load_config(args.config)
    except ValueError as e:  # ConfigError
        p.error(f"--config {args.config}: {e}")
    try:
        hw = export.resolve_input_hw(cfg, args.input_shape)
    except ValueError as e:
        p.error(f"config data.val.input_size: {e}")
    try:
        variables = load_variables(args.checkpoint, cfg, prefer_ema=not args.no_ema)
    except (FileNotFoundError, ValueError, KeyError) as e:
        p.error(f"--checkpoint {args.checkpoint}: {e}")

    t0 = time.perf_counter()
    out = export.to_onnx(cfg, variables, args.out, hw, args.opset,
                         simplify=not args.no_simplify, overwrite=args.overwrite)
    import onnx

    model = onnx.load(out)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.input, *model.graph.output)}
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s: input (H, W) = {hw}, "
          f"{shapes}, opset {args.opset}")
    print("ops:", ", ".join(f"{k} {v}" for k, v in export.onnx_op_histogram(model).items()))
    if args.jax_export is not None:
        t0 = time.perf_counter()
        blob = export.to_jax_export(cfg, variables, hw, out_path=args.jax_export,
                                    overwrite=args.overwrite)
        print(f"wrote {args.jax_export} ({len(blob) / 1e6:.1f} MB) in "
              f"{time.perf_counter() - t0:.1f} s: fn(images (1, {hw[0]}, {hw[1]}, 3) NHWC) "
              "-> raw head output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
