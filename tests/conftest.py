import os

# Tests run on the CPU backend; the Pallas kernels (next issue) run there with interpret=True.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
