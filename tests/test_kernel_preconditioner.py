"""The phase-1 Pallas kernel (fwd + bwd) against the scan, in interpret mode on CPU (natively on a
GPU), and lowered for CUDA."""

import jax
import jax.numpy as jnp
import pytest

from inputs import OSDN_SETTINGS, make_case
from osdn_jax.kernels.lowering import lower_for_gpu, triton_calls
from osdn_jax.kernels.preconditioner import preconditioner_pallas
from osdn_jax.ops.preconditioner import preconditioner_scan
from tolerances import assert_close


def _kwargs(case, arrays):
    return dict(**OSDN_SETTINGS, log_gamma=arrays.get("log_gamma"), segment_ids=arrays.get("segment_ids"),
                initial_d=arrays.get("initial_d"), beta=arrays["beta"] if case.kwargs["beta_aware"] else None)


def _diff_inputs(case):
    names = ["k", "d0", "initial_d", "log_gamma"] + (["beta"] if case.kwargs["beta_aware"] else [])
    return {n: case.arrays[n] for n in names if n in case.arrays}


def _loss(fn, case, xs):
    arrays = {**case.arrays, **xs}
    d, d_final = fn(arrays["k"], arrays["d0"], **_kwargs(case, arrays))
    w = jnp.cos(jnp.arange(d.size, dtype=jnp.float32)).reshape(d.shape)
    return jnp.sum(w * d) + jnp.sum(jnp.sin(d_final))


@pytest.mark.parametrize("variant", ["osdn", "osdn_apf", "os_gdn"])
@pytest.mark.parametrize("T, K, segments, initial", [(1, 32, False, True), (65, 48, True, True),
                                                     (200, 64, True, False), (70, 128, False, True)])
def test_matches_scan(variant, T, K, segments, initial):
    case = make_case(variant, B=2, T=T, H=2, K=K, V=16, segments=segments, initial_state=initial, seed=T + K)
    a = case.arrays
    ref = preconditioner_scan(a["k"], a["d0"], **_kwargs(case, a))
    got = preconditioner_pallas(a["k"], a["d0"], **_kwargs(case, a))
    for name, x, y in zip(("d", "d_final"), got, ref):
        assert x.dtype == jnp.float32
        assert_close(x, y, what=f"{variant} {name}")
    xs = _diff_inputs(case)
    g_ref = jax.grad(lambda xs: _loss(preconditioner_scan, case, xs))(xs)
    g_got = jax.grad(lambda xs: _loss(preconditioner_pallas, case, xs))(xs)
    for name in g_ref:
        assert_close(g_got[name], g_ref[name], what=f"{variant} d/d{name}")


def test_bf16_keys():
    case = make_case("osdn_apf", T=50, dtype=jnp.bfloat16, seed=3)
    a = case.arrays
    ref = preconditioner_scan(a["k"], a["d0"], **_kwargs(case, a))
    got = preconditioner_pallas(a["k"], a["d0"], **_kwargs(case, a))
    for x, y in zip(got, ref):
        assert_close(x, y, what="bf16 keys")  # both compute in fp32 from the same bf16 values


@pytest.mark.parametrize("options", ["plain", "all"])
def test_lowers_for_cuda(options):
    B, T, H, K = 2, 200, 2, 128
    case = make_case("os_gdn" if options == "all" else "osdn", B=B, T=T, H=H, K=K, V=16,
                     segments=options == "all", initial_state=options == "all", seed=5)
    xs = _diff_inputs(case)
    fn = lambda xs: preconditioner_pallas(xs["k"], xs["d0"], **_kwargs(case, {**case.arrays, **xs}))  # noqa: E731
    loss = lambda xs: jnp.sum(fn(xs)[0]) + jnp.sum(fn(xs)[1])  # noqa: E731
    fwd = [c.name for c in triton_calls(lower_for_gpu(fn, xs))]
    bwd = [c.name for c in triton_calls(lower_for_gpu(jax.grad(loss), xs))]
    assert fwd == ["osdn_preconditioner_fwd"]
    assert "osdn_preconditioner_bwd" in bwd


def test_front_door_runs_the_kernel():
    from osdn_jax import ops

    case = make_case("osdn_apf", T=40, seed=9)
    a = case.arrays
    kw = dict(**OSDN_SETTINGS, log_gamma=a["log_gamma"], segment_ids=a["segment_ids"])
    got = ops.osdn_preconditioner(a["k"], a["d0"], **kw, impl="pallas")
    ref = ops.osdn_preconditioner(a["k"], a["d0"], **kw, impl="reference")
    for x, y in zip(got, ref):
        assert_close(x, y, what="front door")
    with pytest.raises(ValueError, match="impl: expected one of"):
        ops.osdn_preconditioner(a["k"], a["d0"], **kw, impl="kernel")
