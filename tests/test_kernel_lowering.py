"""Every kernel lowered for CUDA on the CPU host through the front door (forward and backward,
sm_90 and sm_80), so a GPU-only lowering break fails CI. Numerics are checked in interpret mode
(test_chunked_vs_reference.py); machine code in test_compile_kernels.py."""

import jax
import jax.numpy as jnp
import pytest

from inputs import make_case, run
from osdn_jax.kernels.lowering import lower_for_gpu, triton_calls

FWD = {"delta_rule_intra", "delta_rule_states", "delta_rule_output"}
BWD = {"delta_rule_bwd_local", "delta_rule_states_bwd", "delta_rule_grads_wy", "delta_rule_grads_a",
       "delta_rule_grads_k", "delta_rule_grads_q"}
PHASE1 = {"osdn_preconditioner_fwd", "osdn_preconditioner_bwd"}


@pytest.mark.parametrize("variant, K, V, C, dtype, precision, arch", [
    ("deltanet", 64, 64, 64, jnp.bfloat16, None, "sm_90"),
    ("gdn", 128, 128, 64, jnp.bfloat16, None, "sm_80"),
    ("two_key", 128, 64, 32, jnp.float32, "tf32", "sm_90"),
    ("os_gdn", 48, 80, 16, jnp.float32, "ieee", "sm_80"),
    ("osdn_apf", 128, 128, 64, jnp.float16, None, "sm_90"),
])
def test_ops_lower_for_cuda(variant, K, V, C, dtype, precision, arch):
    case = make_case(variant, B=2, T=200, H=2, K=K, V=V, dtype=dtype, segments=True, seed=1)
    floats = {n: x for n, x in case.arrays.items() if n != "segment_ids"}

    def loss(xs):
        out = run(case, "pallas", chunk_size=C, arrays={**case.arrays, **xs}, precision=precision)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in out.values())

    names = {c.name for c in triton_calls(lower_for_gpu(loss, floats, arch=arch))}
    grad_names = {c.name for c in triton_calls(lower_for_gpu(jax.grad(loss), floats, arch=arch))}
    phase1 = PHASE1 if case.is_osdn else set()
    assert names == FWD | (phase1 - {"osdn_preconditioner_bwd"}), names
    assert grad_names == FWD | BWD | phase1, grad_names
