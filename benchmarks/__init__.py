"""Benchmark suites run by ``scripts/benchmark.py``; each module exposes ``run(args) -> dict``."""

SUITES = ("depthwise", "max_pool", "loss", "inference", "data", "train", "step_profile")
