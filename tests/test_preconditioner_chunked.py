"""The chunked phase 1 against the token scan: values and every gradient, with the clip active
often, sometimes and never, and T / C serial steps instead of T."""

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from inputs import OSDN_SETTINGS, make_case
from osdn_jax import ops
from osdn_jax.ops.preconditioner import preconditioner_scan
from osdn_jax.ops.preconditioner_chunked import clipped_chunks, preconditioner_chunked
from osdn_jax.presets import get_preset
from tolerances import assert_close


def _kwargs(settings, arrays, beta_aware):
    return dict(**settings, log_gamma=arrays.get("log_gamma"), segment_ids=arrays.get("segment_ids"),
                initial_d=arrays.get("initial_d"), beta=arrays["beta"] if beta_aware else None)


def _compare(arrays, settings, beta_aware, C, what):
    """Values and the gradients of every input; returns the share of chunks with an active clip."""
    names = [n for n in ("k", "d0", "initial_d", "log_gamma") if arrays.get(n) is not None]
    names += ["beta"] if beta_aware else []
    chunked = lambda k, d0, **kw: preconditioner_chunked(k, d0, chunk_size=C, **kw)  # noqa: E731

    def loss(fn, xs):
        a = {**arrays, **xs}
        d, d_final = fn(a["k"], a["d0"], **_kwargs(settings, a, beta_aware))
        w = jnp.cos(jnp.arange(d.size, dtype=jnp.float32)).reshape(d.shape)
        return jnp.sum(w * d) + jnp.sum(jnp.sin(d_final))

    kw = _kwargs(settings, arrays, beta_aware)
    ref = preconditioner_scan(arrays["k"], arrays["d0"], **kw)
    got = jax.jit(lambda k, d0: chunked(k, d0, **kw))(arrays["k"], arrays["d0"])
    for name, x, y in zip(("d", "d_final"), got, ref):
        assert x.dtype == jnp.float32
        assert_close(x, y, what=f"{what}: {name}")
    xs = {n: arrays[n] for n in names}
    g_ref = jax.grad(lambda xs: loss(preconditioner_scan, xs))(xs)
    g_got = jax.jit(jax.grad(lambda xs: loss(chunked, xs)))(xs)
    for n in names:
        assert_close(g_got[n], g_ref[n], what=f"{what}: d/d{n}")
    flags = clipped_chunks(arrays["k"], ref[0], eta=settings["eta"], d_min=settings["d_min"],
                           d_max=settings["d_max"], log_gamma=kw["log_gamma"], beta=kw["beta"],
                           segment_ids=kw["segment_ids"], chunk_size=C)
    return float(jnp.mean(jnp.any(flags, axis=(1, 2))))


@pytest.mark.parametrize("variant, T, K, C, segments, initial", [
    ("osdn", 1, 32, 64, False, True), ("osdn_apf", 63, 32, 16, True, True), ("os_gdn", 64, 48, 16, True, False),
    ("osdn", 65, 32, 64, True, True), ("os_gdn", 200, 64, 32, True, True), ("osdn_apf", 70, 128, 64, False, False)])
def test_matches_the_scan(variant, T, K, C, segments, initial):
    """The suite's settings (d0 and initial_d drawn wider than the clip range, η = 1): documents
    restart inside chunks and at their edges, T is ragged, APF and the β-aware form."""
    case = make_case(variant, B=2, T=T, H=2, K=K, V=16, segments=segments, initial_state=initial, seed=T + K + C)
    _compare(case.arrays, OSDN_SETTINGS, case.kwargs["beta_aware"], C, f"{variant} T={T} K={K} C={C}")


@pytest.mark.parametrize("variant, preset, key_scale, eta, active", [
    ("osdn", "apr", 0.5, None, "often"),  # d_min = 0; unnormalized keys: every write overshoots
    ("osdn_apf", "may", 0.3, 0.3, "often"),  # the narrow [2/3, 1.5] range with a large step
    ("os_gdn", "apr", 0.3, None, "sometimes"),
    ("os_gdn", "apr-d1", None, 20.0, "sometimes"),
    ("osdn", "may", None, None, "never"),  # the paper's small step on unit keys
    ("os_gdn", "may", None, None, "never"),
])
def test_presets_with_the_clip_active_often_sometimes_never(variant, preset, key_scale, eta, active):
    p = get_preset(preset)
    settings = dict(eta=p.eta if eta is None else eta, d_min=p.d_min, d_max=p.d_max)
    case = make_case(variant, B=2, T=200, H=2, K=32, V=16, seed=7)
    a = dict(case.arrays)
    if key_scale is not None:  # unnormalized keys: ⟨s, s⟩ large, the hypergradient step overshoots
        a["k"] = jax.random.normal(jax.random.PRNGKey(11), a["k"].shape) * key_scale
    a["d0"] = jnp.full_like(a["d0"], p.d0_init)
    a["initial_d"] = jnp.broadcast_to(a["d0"], a["initial_d"].shape) + 0.01
    share = _compare(a, settings, case.kwargs["beta_aware"], 16, f"{preset} {variant}")
    if active == "often":
        assert share > 0.5, share
    elif active == "sometimes":
        assert 0.0 < share < 1.0, share
    else:
        assert share == 0.0, share


@pytest.mark.parametrize("variant, initial", [("osdn", False), ("os_gdn", True), ("osdn_apf", True)])
def test_a_d0_outside_the_range_clips_only_at_first_steps_which_run_apart(variant, initial):
    """'apr' with a trained-like d0 (some entries below d_min = 0): the clip acts at every document's
    first step (and the row's, from initial_d) and nowhere else. Those steps are taken exactly apart,
    so no chunk goes back to the token loop, and values and gradients still match the scan. Short
    documents put starts at chunk edges, inside chunks and at the last token."""
    p = get_preset("apr")
    settings = dict(eta=p.eta, d_min=p.d_min, d_max=p.d_max)
    case = make_case(variant, B=2, T=150, H=2, K=32, V=16, segments=True, initial_state=initial, seed=21)
    a = dict(case.arrays)
    a["d0"] = jax.random.uniform(jax.random.PRNGKey(5), a["d0"].shape, minval=-0.3, maxval=0.2)
    if initial:
        a["initial_d"] = jax.random.uniform(jax.random.PRNGKey(6), a["initial_d"].shape, minval=-0.3, maxval=0.5)
    ids = jnp.cumsum(jnp.zeros((2, 150), jnp.int32).at[:, jnp.array([16, 17, 40, 64, 100, 149])].set(1), axis=1)
    a["segment_ids"] = ids.at[1].set(jnp.cumsum((jnp.arange(150) % 37 == 36).astype(jnp.int32)))
    kw = _kwargs(settings, a, case.kwargs["beta_aware"])
    d, _ = preconditioner_scan(a["k"], a["d0"], **kw)
    s = a["k"].astype(jnp.float32) ** 2
    c = a["beta"] if case.kwargs["beta_aware"] else 1.0
    hyper = (c * (1.0 - c * jnp.sum(d * s, axis=-1)))[..., None] * s
    gamma = 1.0 if a.get("log_gamma") is None else jnp.exp(a["log_gamma"])[..., None]
    assert bool(jnp.any(gamma * d + hyper < 0.0))  # the clip does act (at the first steps)
    share = _compare(a, settings, case.kwargs["beta_aware"], 16, f"apr, d0 below d_min, {variant}")
    assert share == 0.0, share


def test_bf16_keys():
    case = make_case("osdn_apf", T=50, dtype=jnp.bfloat16, seed=3)
    _compare(case.arrays, OSDN_SETTINGS, False, 16, "bf16 keys")  # both compute in fp32 from bf16 values


def _scan_lengths(jaxpr, out):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["length"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _scan_lengths(sub, out)
    return out


def test_serial_steps_are_chunks_not_tokens():
    """Forward and backward scan over T / C chunks; no scan over the T tokens is left (the token
    loops that remain run only inside chunks with an active clip, at most C steps each)."""
    case = make_case("os_gdn", B=1, T=256, H=2, K=32, seed=4)
    a = case.arrays
    kw = _kwargs(OSDN_SETTINGS, a, True)
    fn = lambda k: jnp.sum(preconditioner_chunked(k, a["d0"], chunk_size=64, **kw)[0])  # noqa: E731
    lengths = _scan_lengths(jax.make_jaxpr(jax.grad(fn))(a["k"]).jaxpr, [])
    assert lengths and max(lengths) == 256 // 64, lengths
    lengths = _scan_lengths(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(preconditioner_scan(k, a["d0"], **kw)[0])))(
        a["k"]).jaxpr, [])
    assert max(lengths) == 256  # the reference, for contrast


def test_front_door_chunked_and_reference():
    case = make_case("osdn_apf", T=90, seed=9)
    a = case.arrays
    kw = dict(**OSDN_SETTINGS, log_gamma=a["log_gamma"], segment_ids=a["segment_ids"], initial_d=a["initial_d"])
    ref = ops.osdn_preconditioner(a["k"], a["d0"], **kw, impl="reference")
    for impl, C in (("chunked", 64), ("chunked", 16), ("auto", 32)):
        got = ops.osdn_preconditioner(a["k"], a["d0"], **kw, impl=impl, chunk_size=C)
        for x, y in zip(got, ref):
            assert_close(x, y, what=f"{impl} C={C}")
    with pytest.raises(ValueError, match="chunk_size"):
        ops.osdn_preconditioner(a["k"], a["d0"], **kw, impl="chunked", chunk_size=48)


def test_auto_chunks_phase_one_when_compiling_for_an_accelerator():
    """``auto`` chunks phase 1 for a GPU or TPU (launches per token) and keeps the token scan on a
    CPU; ``chunked`` always chunks. Read off the traced programs of ``ops.osdn``."""
    from osdn_jax.ops.api import phase1_in_chunks

    case = make_case("osdn_apf", B=1, T=256, H=2, K=32, seed=6)
    a = case.arrays

    def longest_scan(impl):
        fn = lambda q: ops.osdn(q, a["k"], a["v"], a["beta"], a["d0"], **OSDN_SETTINGS, log_gamma=a["log_gamma"],  # noqa: E731
                                impl=impl)[0]
        return max(_scan_lengths(jax.make_jaxpr(fn)(a["q"]).jaxpr, []))

    assert not phase1_in_chunks("auto") and phase1_in_chunks("chunked") and not phase1_in_chunks("reference")
    assert longest_scan("auto") == 256 and longest_scan("chunked") == 256 // 64
    with jax.default_device("tpu"):  # as benchmarks/aot.py compiles for a chip that is not here
        assert phase1_in_chunks("auto")
