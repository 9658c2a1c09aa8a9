import os

import pytest

# Tests run on the CPU backend; the Pallas kernels run there with interpret=True.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled executables after each test module: one long pytest process otherwise holds
    every program the suite ever compiled."""
    yield
    import jax

    jax.clear_caches()
