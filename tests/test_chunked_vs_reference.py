"""SPEC §7.3 and §7.5: the chunked path and the Pallas kernels (interpret mode on CPU, native on a
GPU) equal the token-by-token reference, outputs and gradients."""

import jax.numpy as jnp
import pytest

from inputs import VARIANTS, grads, make_case, run
from tolerances import assert_close

ALL = list(VARIANTS)


FAST = ("chunked", "pallas")


def _compare_forward(case, chunk_sizes, impl="chunked"):
    ref = run(case, "reference")
    for C in chunk_sizes:
        got = run(case, impl, chunk_size=C)
        assert set(got) == set(ref)
        for name in ref:
            assert_close(got[name], ref[name], what=f"{impl} {case.variant} C={C} {name}")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_forward_over_lengths_and_chunks(impl, variant, T):
    """Packed documents and an initial state, T below / at / above / far above the chunk."""
    _compare_forward(make_case(variant, T=T, seed=T), chunk_sizes=(16, 32, 64), impl=impl)


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
    full = run(case, impl, chunk_size=16)
    assert_close(full["o"][:, 30:], alone["o"], what="third document alone")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("T, C, segments", [(65, 16, True), (200, 64, False)])
def test_gradients(impl, variant, T, C, segments):
    """Gradients of every input (q, k, v, β, gate, write key, d0, log γ, initial S and d)."""
    case = make_case(variant, T=T, segments=segments, seed=7)
    ref = grads(case, "reference")
    got = grads(case, impl, chunk_size=C)
    assert set(got) == set(ref)
    for name in ref:
        assert_close(got[name], ref[name], what=f"{impl} {variant} d/d{name}")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("variant", ALL)
def test_bf16_inputs(impl, variant):
    """bf16 inputs: output in bf16, states fp32, judged by relative RMS against fp32 math."""
    case = make_case(variant, T=100, dtype=jnp.bfloat16, seed=11)
    upcast = {n: (x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for n, x in case.arrays.items()}
    ref = run(case, "reference", arrays=upcast)
    got = run(case, impl, chunk_size=32)
    assert got["o"].dtype == jnp.bfloat16 and got["state"].dtype == jnp.float32
    for name in ref:
        assert_close(got[name], ref[name], what=f"{impl} {variant} bf16 {name}", bf16=True)
    gref = grads(case, "reference", upcast=True)
    gout = grads(case, impl, chunk_size=32)
    for name in gref:
        assert gout[name].dtype == case.arrays[name].dtype
        assert_close(gout[name], gref[name], what=f"{variant} bf16 d/d{name}", bf16=True, grad=True)


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
