"""Phase 1 (the d trajectory) on its own: resets, clip gradients, agreement with the fused loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inputs import OSDN_SETTINGS, make_case
from osdn_jax import ops
from osdn_jax.ops.preconditioner import precondition_step
from osdn_jax.ops.reference import PreconditionerConfig, osdn_reference
from tolerances import assert_close


def _traj(a, **kw):
    return ops.osdn_preconditioner(a["k"], a["d0"], **{**OSDN_SETTINGS, **kw})


@pytest.mark.parametrize("variant", ["osdn", "osdn_apf", "os_gdn"])
def test_trajectory_equals_fused_reference(variant):
    """The two-phase split uses exactly the d that the fused token loop uses."""
    case = make_case(variant, T=90, seed=1)
    a = case.arrays
    cfg = PreconditionerConfig(**case.kwargs)
    *_, d_final, d_traj = osdn_reference(
        a["q"], a["k"], a["v"], a["beta"], a["d0"], precond=cfg, log_gamma=a.get("log_gamma"),
        log_decay=a.get("log_decay"), scale=0.25, initial_state=a["initial_state"], initial_d=a["initial_d"],
        segment_ids=a["segment_ids"])
    got, got_final = _traj(a, log_gamma=a.get("log_gamma"), beta=a["beta"] if cfg.beta_aware else None,
                           segment_ids=a["segment_ids"], initial_d=a["initial_d"])
    assert_close(got, d_traj, what="trajectory")
    assert_close(got_final, d_final, what="final d")


def test_documents_restart_at_d0():
    case = make_case("osdn", B=1, T=40, seed=2)
    a = case.arrays
    ids = jnp.asarray(np.repeat([0, 1, 2], [10, 13, 17])[None], jnp.int32)
    d, _ = _traj(a, segment_ids=ids, initial_d=a["initial_d"])
    assert_close(d[0, 0], a["initial_d"][0], what="token 0 uses initial_d")
    for start in (10, 23):
        assert_close(d[0, start], a["d0"], what=f"d restarts at token {start}")
        # and the document evolves as if it were alone
        alone, _ = _traj({"k": a["k"][:, start:], "d0": a["d0"]})
        stop = 23 if start == 10 else 40
        assert_close(d[:, start:stop], alone[:, : stop - start], what="document alone")


def test_clip_is_active_in_test_settings_and_bounds_d():
    """The shared test settings do exercise the clip (else the clip-gradient checks of the other
    tests prove nothing), and every updated d lies in [d_min, d_max] (token 0 uses d0 as given)."""
    case = make_case("osdn", T=200, segments=False, seed=3)
    d, _ = _traj(case.arrays)
    lo, hi = OSDN_SETTINGS["d_min"], OSDN_SETTINGS["d_max"]
    assert float(d[:, 1:].min()) >= lo and float(d[:, 1:].max()) <= hi
    before_clip = precondition_step(d, case.arrays["k"], eta=OSDN_SETTINGS["eta"], d_min=None, d_max=None)
    active = (before_clip < lo) | (before_clip > hi)
    assert bool(jnp.any(active[:, 5:])), "clip never active after the first tokens"


def test_clip_passes_zero_gradient_where_active():
    """A d0 entry outside [d_min, d_max] whose updates keep it outside gets exactly zero gradient;
    entries inside get a non-zero one."""
    B, T, H, K = 1, 5, 1, 4
    k = jnp.zeros((B, T, H, K)).at[..., :2].set(1.0 / np.sqrt(2.0))  # features 2, 3 never written
    d0 = jnp.array([[0.5, 0.9, 5.0, 1.0]])  # feature 2 starts above d_max = 2

    def loss(d0):
        d, d_final = ops.osdn_preconditioner(k, d0, eta=0.5, d_min=0.0, d_max=2.0)
        return jnp.sum(d[:, 1:] * jnp.arange(1.0, 5.0)[None, :, None, None]) + jnp.sum(d_final)

    g = jax.grad(loss)(d0)[0]
    assert float(g[2]) == 0.0, "clip active: gradient must be zero"
    assert all(float(abs(g[i])) > 0 for i in (0, 1, 3))


def test_value_on_the_bound_passes_gradient():
    """d0 = d_min = 0 with a zero key feature sits exactly on the bound: not clipped, gradient 1 per step."""
    k = jnp.zeros((1, 3, 1, 2)).at[..., 0].set(1.0)
    d0 = jnp.zeros((1, 2))
    g = jax.grad(lambda d0: jnp.sum(ops.osdn_preconditioner(k, d0, eta=1.0, d_min=0.0, d_max=1e9)[1][..., 1]))(d0)
    assert float(g[0, 1]) == 1.0


def test_gradients_match_finite_differences():
    """The autodiff gradient of the scan (what every path is compared with) agrees with central
    differences, away from clip boundaries."""
    case = make_case("osdn_apf", B=1, T=12, H=1, K=4, segments=False, seed=4)
    a = case.arrays
    w = jax.random.normal(jax.random.PRNGKey(0), (1, 12, 1, 4))

    def f(k, d0, lg):
        d, _ = ops.osdn_preconditioner(k, d0, eta=0.8, d_min=-10.0, d_max=10.0, log_gamma=lg, beta=a["beta"])
        return jnp.sum(d * w)

    args = (a["k"], a["d0"], a["log_gamma"])
    grads = jax.grad(f, argnums=(0, 1, 2))(*args)
    rng = np.random.default_rng(0)
    for i, (x, g) in enumerate(zip(args, grads)):
        direction = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
        eps = 1e-2
        plus = [*args]; plus[i] = x + eps * direction
        minus = [*args]; minus[i] = x - eps * direction
        fd = (f(*plus) - f(*minus)) / (2 * eps)
        an = jnp.sum(g * direction)
        assert abs(float(fd - an)) <= 2e-3 * max(1.0, abs(float(an))), (i, float(fd), float(an))
