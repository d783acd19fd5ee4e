"""Benchmark suites run by ``scripts/benchmark.py``; each module exposes ``run(args) -> dict``."""

SUITES = ("depthwise", "loss", "inference", "data", "train")
