"""Every kernel lowered for CUDA on the CPU host through the front door (forward and backward,
sm_90 and sm_80, both families), so a GPU-only lowering break fails CI. Numerics are checked in
interpret mode (test_chunked_vs_reference.py, test_kernel_mosaic.py); Triton machine code in
test_compile_kernels.py."""

import jax
import jax.numpy as jnp
import pytest

from inputs import make_case, run
from osdn_jax.kernels.lowering import lower_for_gpu, mosaic_calls, triton_calls

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

    names = {c.name for c in triton_calls(lower_for_gpu(loss, floats, arch=arch, family="triton"))}
    grad_names = {c.name for c in triton_calls(lower_for_gpu(jax.grad(loss), floats, arch=arch, family="triton"))}
    phase1 = PHASE1 if case.is_osdn else set()
    assert names == FWD | (phase1 - {"osdn_preconditioner_bwd"}), names
    assert grad_names == FWD | BWD | phase1, grad_names


MOSAIC_FWD, MOSAIC_BWD = "osdn_mosaic_states_fwd", "osdn_mosaic_states_bwd"


@pytest.mark.parametrize("variant, K, V, dtype", [
    ("deltanet", 64, 64, jnp.bfloat16), ("os_gdn", 128, 128, jnp.bfloat16), ("osdn_apf", 48, 80, jnp.float16),
    ("two_key", 128, 64, jnp.bfloat16),
])
def test_default_family_on_hopper_is_mosaic(variant, K, V, dtype):
    """sm_90 with bf16 / fp16 inputs and chunk 64: the front door picks the Mosaic kernels by
    itself (phase 1 stays on its Triton kernel)."""
    case = make_case(variant, B=2, T=200, H=2, K=K, V=V, dtype=dtype, segments=True, seed=1)
    floats = {n: x for n, x in case.arrays.items() if n != "segment_ids"}

    def loss(xs):
        out = run(case, "pallas", chunk_size=64, arrays={**case.arrays, **xs})
        return sum(jnp.sum(x.astype(jnp.float32)) for x in out.values())

    fwd, bwd = lower_for_gpu(loss, floats), lower_for_gpu(jax.grad(loss), floats)
    assert [c.name for c in mosaic_calls(fwd)] == [MOSAIC_FWD]
    assert sorted(c.name for c in mosaic_calls(bwd)) == [MOSAIC_BWD, MOSAIC_FWD]
    phase1 = {"osdn_preconditioner_fwd", "osdn_preconditioner_bwd"} if case.is_osdn else set()
    assert {c.name for c in triton_calls(bwd)} == phase1


@pytest.mark.parametrize("dtype, C, precision, arch", [
    (jnp.float32, 64, None, "sm_90"),  # fp32 inputs: the Triton TF32 / IEEE kernels
    (jnp.bfloat16, 32, None, "sm_90"),  # chunks other than 64
    (jnp.bfloat16, 64, "tf32", "sm_90"),  # fp32 operands asked for
    (jnp.bfloat16, 64, None, "sm_80"),  # no wgmma before Hopper
])
def test_default_family_falls_back_to_triton(dtype, C, precision, arch):
    case = make_case("gdn", B=2, T=100, H=2, K=64, V=64, dtype=dtype, seed=2)

    def loss(xs):
        return jnp.sum(run(case, "pallas", chunk_size=C, arrays={**case.arrays, **xs}, precision=precision)["o"]
                       .astype(jnp.float32))

    lowered = lower_for_gpu(loss, {"q": case.arrays["q"]}, arch=arch)
    assert not mosaic_calls(lowered) and triton_calls(lowered)


def test_few_long_sequences_lower_with_the_split():
    """B·H too small for the GPU: the forward adds the pieces' summary pass, the backward runs the
    reverse pass twice (exit cotangents first)."""
    x = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    loss = lambda q, k, v, b: jnp.sum(run_delta(q, k, v, b).astype(jnp.float32))  # noqa: E731
    names = [c.name for c in mosaic_calls(lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2, 3)), x(1, 2048, 2, 64),
                                                        x(1, 2048, 2, 64), x(1, 2048, 2, 64), x(1, 2048, 2)))]
    assert sorted(names) == sorted(["osdn_mosaic_states_summary", MOSAIC_FWD, MOSAIC_BWD, MOSAIC_BWD]), names


def run_delta(q, k, v, b):
    from osdn_jax import ops

    return ops.delta_rule(q, k, v, b, impl="pallas")[0]
