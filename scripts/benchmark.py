#!/usr/bin/env python
"""Benchmarks with JSON output.

    python scripts/benchmark.py \
        --suite depthwise|max_pool|loss|inference|data|train|step_profile|all [--out results.json]
    python scripts/benchmark.py --suite train --reference PATH   # + the PyTorch reference's step

Run from a repository checkout: each suite lives in the top-level ``benchmarks/<suite>.py``
package (not installed with ``nanodet_jax``: it uses private helpers and the repository's
``configs/``); timings are taken after compilation (compile time is reported separately)
with ``block_until_ready``. ``--reference PATH`` (train suite only) is a RangiLyu/nanodet
checkout: each train case also times the reference's step on the same inputs, with torch, and
reports the ratio (see ``benchmarks/train.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python scripts/benchmark.py` puts scripts/ there instead
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import SUITES  # noqa: E402
from benchmarks.reference_train import ReferenceUnavailable  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--repeats", type=int, default=20, help="timed repetitions per case")
    p.add_argument("--quick", action="store_true", help="smaller cases (smoke test)")
    p.add_argument("--cases", metavar="PATTERN", default="*",
                   help="train/step_profile suites: only the cases whose name matches this shell "
                        "pattern, e.g. '*_b8_before_detach' or 'm_320_*'")
    p.add_argument("--reference", metavar="PATH",
                   help="train suite: also time the PyTorch reference's step from this "
                        "RangiLyu/nanodet checkout (needs torch)")
    args = p.parse_args(argv)
    if args.reference and args.suite != "train":
        p.error("--reference goes with --suite train only")
    if args.reference and args.quick:
        p.error("--reference times the m_320/m_416 cases: it does not go with --quick")
    if args.cases != "*" and args.suite not in ("train", "step_profile"):
        p.error("--cases goes with --suite train or step_profile only")

    import jax

    result = {
        "host": platform.node(), "python": platform.python_version(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "suites": {},
    }
    for name in SUITES if args.suite == "all" else (args.suite,):
        mod = importlib.import_module(f"benchmarks.{name}")
        print(f"[benchmark] running suite {name} ...", file=sys.stderr, flush=True)
        try:
            result["suites"][name] = mod.run(args)
        except ReferenceUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    from nanodet_jax.hugepages import reexec_with_hugepages

    reexec_with_hugepages()  # before any work: glibc reads its tunables at start
    sys.exit(main())
