#!/usr/bin/env python
"""Benchmarks with JSON output.

    python scripts/benchmark.py --suite depthwise|loss|inference|all [--out results.json]

Each suite lives in ``nanodet_jax/bench/<suite>.py``; timings are taken after compilation
(compile time is reported separately) with ``block_until_ready``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time

from nanodet_jax.bench import SUITES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions per case")
    p.add_argument("--quick", action="store_true", help="smaller cases (smoke test)")
    args = p.parse_args(argv)

    import jax

    result = {
        "host": platform.node(), "python": platform.python_version(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "suites": {},
    }
    for name in SUITES if args.suite == "all" else (args.suite,):
        mod = importlib.import_module(f"nanodet_jax.bench.{name}")
        print(f"[benchmark] running suite {name} ...", file=sys.stderr, flush=True)
        result["suites"][name] = mod.run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
