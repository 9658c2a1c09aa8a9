"""SPEC §7: properties that hold exactly. The contraction identity and OSDN-with-d≡1 run on every
path (the kernels under the IEEE policy); the others concern phase 1 and decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import make_case, run
from osdn_jax import get_preset, ops
from tolerances import assert_close

PATHS = ("reference", "chunked", "pallas")


def _precision(impl):
    return "ieee" if impl == "pallas" else None


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("beta_aware", [False, True])
@pytest.mark.parametrize("T", [1, 70])
def test_contraction_identity(impl, beta_aware, T):
    """§7.1: after one write, v − S_tᵀk = (1 − β⟨d, k²⟩)(v − S_{t−1}ᵀk), per head. At T = 70
    (chunk 32) the last write sits inside the third chunk, so the WY form is what is checked."""
    case = make_case("osdn", B=2, T=T, H=3, K=16, V=8, segments=False, seed=1)
    a = case.arrays

    def upto(n):  # final state and d after the first n tokens
        cut = lambda x: x[:, :n]  # noqa: E731
        _, S, d = ops.osdn(cut(a["q"]), cut(a["k"]), cut(a["v"]), cut(a["beta"]), a["d0"], eta=1.0, d_min=0.0,
                           d_max=2.0, beta_aware=beta_aware, initial_state=a["initial_state"],
                           initial_d=a["initial_d"], output_final_state=True, chunk_size=32, impl=impl,
                           precision=_precision(impl))
        return S, d

    S_prev, d = upto(T - 1) if T > 1 else (a["initial_state"], a["initial_d"])
    S, _ = upto(T)
    k, v, beta = a["k"][:, -1], a["v"][:, -1], a["beta"][:, -1]  # [B, H, K], [B, H, V], [B, H]
    residual = lambda S: v - jnp.einsum("bhk,bhkv->bhv", k, S, precision="highest")  # noqa: E731
    factor = 1.0 - beta * jnp.sum(d * k * k, axis=-1)
    assert_close(residual(S), factor[..., None] * residual(S_prev), what="contraction")


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("T", [37, 130])
def test_osdn_with_unit_d_equals_deltanet(impl, T):
    """§7.2: d0 = 1, γ = 1 and exactly unit keys keep d ≡ 1, so OSDN is DeltaNet (preset 'may')."""
    case = make_case("deltanet", T=T, initial_state=True, segments=True, seed=2)
    a = dict(case.arrays)
    a["k"] = a["k"] / jnp.linalg.norm(a["k"], axis=-1, keepdims=True)  # unit norm, no eps
    p = get_preset("may")
    H, K = a["k"].shape[2:]
    q, k, v, beta = (a.pop(n) for n in ("q", "k", "v", "beta"))
    prec = _precision(impl)
    o_delta, S_delta = ops.delta_rule(q, k, v, beta, **a, output_final_state=True, chunk_size=32, impl=impl,
                                      precision=prec)
    o_osdn, S_osdn, d = ops.osdn(q, k, v, beta, jnp.full((H, K), p.d0_init), eta=p.eta, d_min=p.d_min,
                                 d_max=p.d_max, **a, output_final_state=True, chunk_size=32, impl=impl,
                                 precision=prec)
    assert_close(o_osdn, o_delta, what="o")
    assert_close(S_osdn, S_delta, what="state")
    assert_close(d, jnp.ones_like(d), what="d")


@pytest.mark.parametrize("apf", [False, True])
@pytest.mark.parametrize("beta_aware", [False, True])
def test_preconditioner_matches_affine_form_without_clip(apf, beta_aware):
    """§7.4: with no clip, d_{t+1} = (γ I − η b² s sᵀ) d + η b s  (b = β in the β-aware form, else 1)."""
    case = make_case("osdn_apf" if apf else "osdn", B=2, T=50, H=2, K=8, segments=False, seed=4)
    a = case.arrays
    eta = 0.7
    beta = a["beta"] if beta_aware else None
    d_traj, d_final = ops.osdn_preconditioner(a["k"], a["d0"], eta=eta, d_min=None, d_max=None,
                                              log_gamma=a.get("log_gamma"), beta=beta, initial_d=a["initial_d"])
    k = np.asarray(a["k"], np.float64)
    gamma = np.exp(np.asarray(a["log_gamma"], np.float64)) if apf else np.ones(k.shape[:3])
    b = np.asarray(a["beta"], np.float64) if beta_aware else np.ones(k.shape[:3])
    d = np.asarray(a["initial_d"], np.float64)
    B, T, H, K = k.shape
    for t in range(T):
        assert_close(d_traj[:, t], d, what=f"d at token {t}")
        s = k[:, t] ** 2  # [B, H, K]
        M = gamma[:, t, :, None, None] * np.eye(K) - eta * (b[:, t] ** 2)[..., None, None] * s[..., :, None] * s[..., None, :]
        d = np.einsum("bhij,bhj->bhi", M, d) + eta * b[:, t, :, None] * s
    assert_close(d_final, d, what="final d")


@pytest.mark.parametrize("impl, variant", [(i, v) for i in PATHS for v in ("deltanet", "gdn", "osdn", "osdn_apf", "os_gdn")
                                            if i != "pallas" or v in ("gdn", "os_gdn")])
def test_carried_state_equals_one_pass(impl, variant):
    """§7.6 at op level: feeding the final (S, d) of one call into the next reproduces one pass,
    down to single tokens (how decoding runs)."""
    case = make_case(variant, B=2, T=41, segments=False, seed=6)
    full = run(case, impl, chunk_size=16, precision=_precision(impl))
    pieces, start = [], 0
    state, d = case.arrays["initial_state"], case.arrays.get("initial_d")
    for stop in (1, 2, 19, 20, 40, 41):
        arrays = {n: (x[:, start:stop] if x.ndim >= 3 and x.shape[1] == 41 else x) for n, x in case.arrays.items()}
        arrays["initial_state"] = state
        if d is not None:
            arrays["initial_d"] = d
        out = run(case, impl, chunk_size=16, arrays=arrays, precision=_precision(impl))
        pieces.append(out["o"])
        state, d = out["state"], out.get("d")
        start = stop
    assert_close(jnp.concatenate(pieces, axis=1), full["o"], what="o")
    assert_close(state, full["state"], what="state")
    if d is not None:
        assert_close(d, full["d"], what="d")


def test_d_never_depends_on_values():
    """d is a function of keys, γ and d0 only: gradients of d w.r.t. v are exactly zero and the
    trajectory is unchanged when v changes."""
    case = make_case("osdn_apf", T=30, seed=8)
    a = case.arrays

    def final_d(v):
        return ops.osdn(a["q"], a["k"], v, a["beta"], a["d0"], **case.kwargs, log_gamma=a["log_gamma"],
                        output_final_state=True, impl="reference")[2]

    dv = jax.grad(lambda v: jnp.sum(final_d(v) ** 2))(a["v"])
    assert float(jnp.max(jnp.abs(dv))) == 0.0
    assert jnp.array_equal(final_d(a["v"]), final_d(2.0 * a["v"] + 1.0))
