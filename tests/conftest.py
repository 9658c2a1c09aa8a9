import os

import pytest

# Tests run on the CPU backend; the Pallas kernels run there with interpret=True.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Mosaic GPU's interpreter runs each warpgroup of a kernel as its own computation on JAX's CPU
# thread pool, next to the computation that launched them; with the pool sized by this 2-core
# machine (2 threads) a warpgroup waiting on a barrier can starve the other one for good. XLA's
# CPU client sizes its pool by NPROC when it is set. Subprocesses inherit it.
os.environ.setdefault("NPROC", str(max(8, os.cpu_count() or 1)))
# The suite is dominated by XLA:CPU compiles of small programs (the Pallas interpreter above all);
# skipping LLVM's backend optimisations compiles them ~40% faster. No fast-math either way, but the
# last bits can differ: a 2-layer os_gdn model's A_log gradient (a sum over every token with
# cancellation), computed op by op, moved by 1e-5 of its size between the two levels. Subprocesses
# inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled executables after each test module: one long pytest process otherwise holds
    every program the suite ever compiled."""
    yield
    import jax

    jax.clear_caches()
