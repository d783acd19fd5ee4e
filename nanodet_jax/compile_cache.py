"""A persistent XLA compilation cache for the command-line tools.

Compiling the train step takes about a minute on a CPU (tens of seconds on a GPU); a resumed
run, a second run of the same config, or ``scripts/eval.py`` after training would compile the
same programs again. :func:`enable_compile_cache` leaves an already configured JAX cache
(``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir``, with its own settings) alone;
otherwise it points JAX's persistent cache at

* ``$NANODET_COMPILE_CACHE`` if set (``off``/``0``/empty disables it),
* else ``$XDG_CACHE_HOME/nanodet_jax/xla`` (``~/.cache/nanodet_jax/xla``).

JAX keys every entry by the program, the jax/jaxlib versions, the backend, the device kind
and the XLA flags, so an entry is never used for a different computation or machine. Only
programs that took at least :data:`MIN_COMPILE_SECONDS` to compile are stored. The cache is
safe to delete at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "NANODET_COMPILE_CACHE"
MIN_COMPILE_SECONDS = 2.0


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nanodet_jax" / "xla"


def enable_compile_cache() -> Path | None:
    """Turn the persistent compilation cache on (see the module docstring); returns its
    directory, or None when disabled. An unwritable directory only disables the cache."""
    import jax

    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    setting = os.environ.get(ENV)
    if setting is not None and setting.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    path = Path(setting).expanduser() if setting else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
