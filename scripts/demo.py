#!/usr/bin/env python
"""Detection demo on images, a video file or a webcam.

    python scripts/demo.py image  --config CFG --checkpoint CKPT --path IMG_OR_DIR [--save-dir D]
    python scripts/demo.py video  --config CFG --checkpoint CKPT --path VIDEO --save-dir D
    python scripts/demo.py webcam --config CFG --checkpoint CKPT [--camera 0] [--save-dir D]

Options: ``--score-thr`` (display threshold, default 0.35; it is also the post-processing
score threshold, which gives the same boxes as filtering the evaluation output),
``--json`` (also write the detections as JSON into --save-dir), ``--no-ema`` (live weights
of a reference ``.ckpt`` instead of ``avg_model.*``), ``--max-frames`` (video/webcam),
``--show`` (display windows, needs an OpenCV build with GUI support).

Outputs are never overwritten: when ``<save-dir>/<name>`` exists, ``<stem>_1<ext>``,
``<stem>_2<ext>``... is used instead. Annotated images keep the input's file name; videos are
written as ``<stem>.mp4`` (codec mp4v, the input's fps); the JSON file is
``detections.json``: ``{"config", "checkpoint", "score_thr", "results": [{"file",
["frame",] "boxes", "scores", "labels", "class_names"}, ...]}`` with boxes ``[x1, y1, x2,
y2]`` in original pixels. Per-stage times (preprocess, forward + post-process, drawing) are
printed per image/frame and summarised at the end (compilation is reported separately).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from nanodet_jax.inference import Detector, ImageDetections

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, deterministic BGR colour per class index."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(img: np.ndarray, det: ImageDetections) -> np.ndarray:
    """A copy of the BGR ``img`` with boxes and ``"<class> <score>"`` labels drawn on it."""
    out = img.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 320))
    font_scale = 0.4 * thick
    for box, score, label, name in zip(det.boxes, det.scores, det.labels, det.class_names):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        color = class_color(int(label))
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
        ty = y1 - th - base if y1 - th - base >= 0 else y1  # above the box, else inside
        tx = min(max(x1, 0), max(w - tw, 0))
        cv2.rectangle(out, (tx, ty), (tx + tw, ty + th + base), color, -1)
        lum = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
        cv2.putText(out, text, (tx, ty + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0) if lum > 128 else (255, 255, 255), thick, cv2.LINE_AA)
    return out


def unique_path(directory: Path, name: str) -> Path:
    """``directory/name``, or ``stem_1.ext``, ``stem_2.ext``... if it already exists."""
    p = directory / name
    stem, suffix, i = p.stem, p.suffix, 1
    while p.exists():
        p = directory / f"{stem}_{i}{suffix}"
        i += 1
    return p


def list_images(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise SystemExit(f"no image ({', '.join(IMAGE_EXTS)}) in {path}")
        return files
    if not path.is_file():
        raise SystemExit(f"{path} does not exist")
    return [path]


class Stats:
    """Per-stage times (ms) collected over the run."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.compile_ms = 0.0

    def add(self, timings: dict[str, float], draw_ms: float) -> str:
        self.compile_ms += timings["compile"]
        row = {"preprocess": timings["preprocess"], "forward+postprocess": timings["infer"],
               "draw": draw_ms}
        for k, v in row.items():
            self.times.setdefault(k, []).append(v)
        extra = f" | compile {timings['compile']:.0f} ms" if timings["compile"] > 1 else ""
        return " | ".join(f"{k} {v:.1f} ms" for k, v in row.items()) + extra

    def summary(self) -> str:
        n = len(next(iter(self.times.values()), []))
        parts = [f"{k} {statistics.median(v):.1f}" for k, v in self.times.items()]
        return (f"{n} frame(s); median ms: " + ", ".join(parts)
                + f"; compilation {self.compile_ms / 1e3:.2f} s")


def frames(cap: cv2.VideoCapture, max_frames: int | None) -> Iterator[np.ndarray]:
    i = 0
    while max_frames is None or i < max_frames:
        ok, frame = cap.read()
        if not ok:
            return
        yield frame
        i += 1


def show(window: str, img: np.ndarray, wait_ms: int) -> bool:
    """Display ``img``; False when the user pressed q/Esc (or no GUI is available)."""
    try:
        cv2.imshow(window, img)
        return cv2.waitKey(wait_ms) & 0xFF not in (ord("q"), 27)
    except cv2.error as e:
        print(f"--show: this OpenCV build cannot open windows ({e}); not showing",
              file=sys.stderr)
        return False


def run_images(args, det: Detector, stats: Stats, records: list) -> None:
    for f in list_images(Path(args.path)):
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is None:
            print(f"{f}: not readable as an image, skipped", file=sys.stderr)
            continue
        result = det(img)
        t0 = time.perf_counter()
        drawn = draw_detections(img, result)
        line = stats.add(det.last_timings, (time.perf_counter() - t0) * 1e3)
        msg = f"{f}: {len(result)} detection(s) | {line}"
        if args.save_dir:
            out = unique_path(args.save_dir, f.name)
            if not cv2.imwrite(str(out), drawn):
                raise SystemExit(f"could not write {out}")
            msg += f" -> {out}"
        print(msg, flush=True)
        records.append({"file": str(f), **result.to_dict()})
        if args.show and not show("nanodet", drawn, 0):
            args.show = False


def run_stream(args, det: Detector, stats: Stats, records: list, source, name: str) -> None:
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise SystemExit(f"cannot open {'camera' if isinstance(source, int) else 'video'} "
                         f"{source}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer, out = None, None
    try:
        for i, frame in enumerate(frames(cap, args.max_frames)):
            result = det(frame)
            t0 = time.perf_counter()
            drawn = draw_detections(frame, result)
            line = stats.add(det.last_timings, (time.perf_counter() - t0) * 1e3)
            if args.save_dir:
                if writer is None:
                    out = unique_path(args.save_dir, f"{name}.mp4")
                    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                             (frame.shape[1], frame.shape[0]))
                    if not writer.isOpened():
                        raise SystemExit(f"could not open {out} for writing (mp4v)")
                writer.write(drawn)
            print(f"{name} frame {i}: {len(result)} detection(s) | {line}", flush=True)
            records.append({"file": str(source), "frame": i, **result.to_dict()})
            if args.show and not show("nanodet", drawn, 1):
                break
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
            print(f"wrote {out}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=("image", "video", "webcam"))
    p.add_argument("--config", required=True, help=".py or reference .yml config")
    p.add_argument("--checkpoint", required=True, help="orbax directory or reference .ckpt/.pth")
    p.add_argument("--path", help="image file or directory (image), video file (video)")
    p.add_argument("--camera", type=int, default=0, help="camera id (webcam)")
    p.add_argument("--save-dir", type=Path, help="where annotated outputs are written")
    p.add_argument("--score-thr", type=float, default=0.35, help="display score threshold")
    p.add_argument("--json", action="store_true", help="write detections.json to --save-dir")
    p.add_argument("--no-ema", action="store_true", help="use live weights, not avg_model.*")
    p.add_argument("--max-frames", type=int, help="stop after this many frames")
    p.add_argument("--show", action="store_true", help="display results in a window")
    args = p.parse_args(argv)
    if args.mode in ("image", "video") and not args.path:
        p.error(f"{args.mode} mode needs --path")
    if args.json and not args.save_dir:
        p.error("--json needs --save-dir")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    det = Detector.from_checkpoint(args.config, args.checkpoint, prefer_ema=not args.no_ema,
                                   score_thr=args.score_thr)
    print(f"model loaded in {time.perf_counter() - t0:.2f} s (input {det.input_wh[0]}x"
          f"{det.input_wh[1]} w x h, keep_ratio {det.keep_ratio}, score_thr {det.score_thr})")
    stats, records = Stats(), []
    if args.mode == "image":
        run_images(args, det, stats, records)
    elif args.mode == "video":
        if not Path(args.path).is_file():
            raise SystemExit(f"{args.path} does not exist")
        run_stream(args, det, stats, records, str(args.path), Path(args.path).stem)
    else:
        run_stream(args, det, stats, records, args.camera, f"webcam{args.camera}")
    if stats.times:
        print(stats.summary())
    if args.json:
        out = unique_path(args.save_dir, "detections.json")
        out.write_text(json.dumps({"config": str(args.config), "checkpoint": str(args.checkpoint),
                                   "score_thr": det.score_thr, "results": records}, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
