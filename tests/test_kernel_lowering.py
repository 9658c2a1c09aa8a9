"""Every phase-2 kernel lowered for CUDA on the CPU host (forward and backward), so a GPU-only
lowering break fails CI. Numerics are checked in test_chunked_vs_reference.py (interpret mode)."""

import jax
import jax.numpy as jnp
import pytest

from cuda_lowering import lower_for_cuda
from inputs import make_case
from osdn_jax.kernels.delta_rule import delta_rule_pallas

KERNELS_FWD = ("delta_rule_intra", "delta_rule_states", "delta_rule_output")
KERNELS_BWD = ("delta_rule_states_bwd", "delta_rule_grads")


@pytest.mark.parametrize("variant, K, V, C", [
    ("deltanet", 64, 64, 64), ("gdn", 128, 128, 64), ("two_key", 128, 64, 32), ("gdn", 48, 80, 16),
])
def test_delta_rule_lowers_for_cuda(variant, K, V, C):
    case = make_case(variant, B=2, T=200, H=2, K=K, V=V, dtype=jnp.bfloat16, segments=True, seed=1)
    names = [n for n in ("q", "k", "v", "beta", "log_decay", "write_key", "initial_state") if n in case.arrays]
    xs = {n: case.arrays[n] for n in names}

    def f(xs):
        a = {**case.arrays, **xs}
        q, k, v, beta = (a.pop(n) for n in ("q", "k", "v", "beta"))
        return delta_rule_pallas(q, k, v, beta, **a, scale=K**-0.5, chunk_size=C, interpret=False)

    fwd = lower_for_cuda(f, xs)
    for name in KERNELS_FWD:
        assert name in fwd, f"{name} missing from the CUDA lowering"
    loss = lambda xs: jnp.sum(f(xs)[0].astype(jnp.float32)) + jnp.sum(f(xs)[1])  # noqa: E731
    bwd = lower_for_cuda(jax.grad(loss), xs)
    for name in KERNELS_BWD:
        assert name in bwd, f"{name} missing from the CUDA lowering"
