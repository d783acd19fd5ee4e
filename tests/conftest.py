import os
import shutil
import tempfile

# Tests compare float32 results at 1e-5..1e-4: keep XLA from using lower-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

CACHE_ENV = "NANODET_TEST_JAX_CACHE"


def pytest_configure(config):
    """With ``-n N`` keep tests that share an expensive module fixture on one worker
    (``@pytest.mark.xdist_group``): xdist's ``load`` becomes ``loadgroup``.

    Compilation is most of this suite's time on CPU, and several tests compile the same
    computation (the same model forward from different test files, both xdist workers):
    one persistent JAX compilation cache, in a fresh directory made by the controlling
    process for this session only (never reused across sessions or machines), serves them
    all; it is removed at the end."""
    if getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"
    if not hasattr(config, "workerinput") and CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="nanodet_test_jax_cache_")
        config._nanodet_cache_dir = os.environ[CACHE_ENV]
    if os.environ.get(CACHE_ENV):
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_ENV])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def pytest_unconfigure(config):
    cache = getattr(config, "_nanodet_cache_dir", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
