import os
import shutil
import tempfile

# Tests compare float32 results at 1e-5..1e-4: keep XLA from using lower-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

CACHE_ENV = "NANODET_TEST_JAX_CACHE"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.xdist_group`` share an expensive module fixture and run on
    one xdist worker (``--dist loadgroup`` in pyproject's addopts); they go first, so that
    long group starts at once while the other workers take everything else."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def pytest_configure(config):
    """Compilation is most of this suite's time on CPU, and several tests compile the same
    computation (the same model forward from different test files, both xdist workers):
    one persistent JAX compilation cache, in a fresh directory made by the controlling
    process for this session only (never reused across sessions or machines), serves them
    all; it is removed at the end."""
    if not hasattr(config, "workerinput") and CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="nanodet_test_jax_cache_")
        config._nanodet_cache_dir = os.environ[CACHE_ENV]
    if os.environ.get(CACHE_ENV):
        # the command-line tools run by tests use this cache too, not ~/.cache/nanodet_jax
        os.environ.setdefault("NANODET_COMPILE_CACHE", os.environ[CACHE_ENV])
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def pytest_unconfigure(config):
    cache = getattr(config, "_nanodet_cache_dir", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
