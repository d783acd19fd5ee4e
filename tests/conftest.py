import os

# Tests compare float32 results at 1e-5..1e-4: keep XLA from using lower-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
