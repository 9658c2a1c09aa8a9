"""SPEC §7.3 and §7.5: the chunked path and the Pallas kernels (interpret mode on CPU, native on a
GPU) equal the token-by-token reference, outputs and gradients.

fp32 inputs: the kernels run with ``precision="ieee"`` and are held to the fp32 tolerance; the
bf16 and TF32 policies are held to the relative-RMS tolerances of ``tolerances.py``."""

import jax.numpy as jnp
import pytest

from inputs import VARIANTS, compare_low_precision, grads, make_case, run
from tolerances import assert_close

ALL = list(VARIANTS)


FAST = ("chunked", "pallas")


def _fp32(impl):
    """The kernels' IEEE policy (comparable at fp32 tolerance); the other paths take no policy."""
    return "ieee" if impl == "pallas" else None


def _compare_forward(case, chunk_sizes, impl="chunked"):
    ref = run(case, "reference")
    for C in chunk_sizes:
        got = run(case, impl, chunk_size=C, precision=_fp32(impl))
        assert set(got) == set(ref)
        for name in ref:
            assert_close(got[name], ref[name], what=f"{impl} {case.variant} C={C} {name}")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_forward_over_lengths_and_chunks(impl, variant, T):
    """Packed documents and an initial state, T below / at / above / far above the chunk. (The
    kernels skip C = 32 here: the option, head-dim and bf16 tests run them at C = 32.)"""
    chunks = (16, 32, 64) if impl == "chunked" else (16, 64)
    _compare_forward(make_case(variant, T=T, seed=T), chunk_sizes=chunks, impl=impl)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("initial_state, segments", [(False, False), (True, False), (False, True)])
def test_forward_options(impl, variant, initial_state, segments):
    case = make_case(variant, T=100, initial_state=initial_state, segments=segments, seed=3)
    _compare_forward(case, chunk_sizes=(32,), impl=impl)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("K, V", [(64, 64), (128, 128), (32, 64), (64, 32), (48, 80)])
def test_forward_head_dims(impl, variant, K, V):
    case = make_case(variant, B=1, T=70, H=2, K=K, V=V, seed=K + V)
    _compare_forward(case, chunk_sizes=(32,), impl=impl)


@pytest.mark.parametrize("impl", FAST)
def test_segments_reset_inside_a_chunk_with_repeated_ids(impl):
    """Ids that come back later ([0, 1, 0]) are three documents, in every path."""
    case = make_case("gdn", B=1, T=48, seed=5)
    ids = jnp.concatenate([jnp.zeros(10, jnp.int32), jnp.ones(20, jnp.int32), jnp.zeros(18, jnp.int32)])[None]
    case.arrays["segment_ids"] = ids
    _compare_forward(case, chunk_sizes=(16, 64), impl=impl)
    # The last document must not see anything written before token 30: run it alone.
    tail = {n: (x[:, 30:] if n in ("q", "k", "v", "beta", "log_decay") else x) for n, x in case.arrays.items()
            if n not in ("segment_ids", "initial_state")}
    alone = run(case, "reference", arrays=tail)
    full = run(case, impl, chunk_size=16, precision=_fp32(impl))
    assert_close(full["o"][:, 30:], alone["o"], what="third document alone")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("T, C, segments", [(65, 16, True), (200, 64, False)])
def test_gradients(impl, variant, T, C, segments):
    """Gradients of every input (q, k, v, β, gate, write key, d0, log γ, initial S and d)."""
    case = make_case(variant, T=T, segments=segments, seed=7)
    ref = grads(case, "reference")
    got = grads(case, impl, chunk_size=C, precision=_fp32(impl))
    assert set(got) == set(ref)
    for name in ref:
        assert_close(got[name], ref[name], what=f"{impl} {variant} d/d{name}")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
def test_bf16_inputs(impl, variant):
    """bf16 inputs: output in bf16, states fp32, judged by relative RMS against fp32 math. The
    kernels multiply bf16 operands with fp32 accumulation (tensor cores on a GPU)."""
    compare_low_precision(make_case(variant, T=100, dtype=jnp.bfloat16, seed=11), impl, 32)


# Each variant at two or more shapes, each shape with a gated and an OSDN variant.
BF16_MATRIX = [
    ("os_gdn", 1, 16, 32, 32, True, True), ("deltanet", 63, 64, 32, 32, True, True),
    ("osdn_apf", 63, 64, 32, 32, True, True), ("gdn", 65, 16, 64, 64, True, True), ("osdn", 65, 16, 64, 64, True, True),
    ("os_gdn", 200, 64, 128, 128, True, True), ("two_key", 200, 64, 128, 128, True, True),
    ("deltanet", 70, 32, 48, 80, False, True), ("osdn_apf", 70, 32, 48, 80, False, True),
    ("gdn", 100, 32, 64, 32, True, False), ("osdn", 100, 32, 64, 32, True, False),
    ("two_key", 65, 16, 64, 64, False, False),
]


@pytest.mark.parametrize("variant, T, C, K, V, initial_state, segments", BF16_MATRIX)
def test_kernels_bf16_matrix(variant, T, C, K, V, initial_state, segments):
    """The bf16 policy over the shape / option matrix: lengths around the chunk, head dims 64, 128
    and a padded pair, documents and initial state on and off; outputs and every gradient."""
    case = make_case(variant, B=2, T=T, H=2, K=K, V=V, dtype=jnp.bfloat16, initial_state=initial_state,
                     segments=segments, seed=T + K)
    compare_low_precision(case, "pallas", C)


@pytest.mark.parametrize("variant", ["deltanet", "os_gdn"])
def test_kernels_tf32(variant):
    """fp32 inputs under the default TF32 policy (emulated in interpret mode by rounding the
    operands as tensor cores do), held to the relative-RMS tolerances."""
    case = make_case(variant, T=100, K=64, V=64, seed=12)
    compare_low_precision(case, "pallas", 32, precision="tf32", what="tf32")


@pytest.mark.parametrize("impl", ["chunked"])  # pallas: first order only (no autodiff through pallas_call)
@pytest.mark.parametrize("variant", ["gdn", "osdn_apf"])
def test_second_order(impl, variant):
    """Reverse-over-reverse (Hessian-vector products) through the hand-written backward."""
    import jax

    case = make_case(variant, B=1, T=40, H=2, K=16, V=16, seed=13)
    v0 = case.arrays["v"]

    def hvp(impl):
        loss = lambda v: jnp.sum(jnp.sin(run(case, impl, chunk_size=16, arrays={**case.arrays, "v": v})["o"]))
        return jax.grad(lambda v: jnp.vdot(jax.grad(loss)(v), v0))(v0)

    assert_close(hvp(impl), hvp("reference"), what=f"{impl} {variant} Hessian-vector product")
