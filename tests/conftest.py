import os

# Tests compare float32 results at 1e-5..1e-4: keep XLA from using lower-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def pytest_configure(config):
    """With ``-n N`` keep tests that share an expensive module fixture on one worker
    (``@pytest.mark.xdist_group``): xdist's ``load`` becomes ``loadgroup``."""
    if getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"
