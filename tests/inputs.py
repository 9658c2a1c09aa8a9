"""Random inputs for the delta-rule family, as a model would produce them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from osdn_jax.ops import l2_normalize

# name -> (gate, write key, preconditioner, APF, β-aware)
VARIANTS = {
    "deltanet": dict(),
    "gdn": dict(gate=True),
    "two_key": dict(write_key=True),
    "osdn": dict(osdn=True),
    "osdn_apf": dict(osdn=True, apf=True),
    "os_gdn": dict(osdn=True, gate=True, beta_aware=True),
}
OSDN_VARIANTS = [n for n, f in VARIANTS.items() if f.get("osdn")]
# d0 and initial_d are drawn from [0.3, 1.7], wider than the clip range, so the clip is active.
OSDN_SETTINGS = dict(eta=1.0, d_min=0.5, d_max=1.5)


@dataclasses.dataclass
class Case:
    variant: str
    arrays: dict  # keyword arrays for the op (q, k, v, beta, and optional ones)
    kwargs: dict  # static keyword arguments (eta, d_min, d_max, beta_aware)

    @property
    def is_osdn(self) -> bool:
        return bool(VARIANTS[self.variant].get("osdn"))


def packed_segment_ids(rng: np.random.Generator, B: int, T: int, docs: int = 4) -> np.ndarray:
    """``[B, T]`` int32 ids with a few documents per row, boundaries anywhere (inside chunks too)."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=min(docs - 1, max(T - 1, 0)), replace=False)) if T > 1 else []
        for c in cuts:
            ids[b, c:] += 1
    return ids


def make_case(variant: str, *, B=2, T=65, H=2, K=32, V=32, dtype=jnp.float32, seed=0,
              initial_state=True, segments=True) -> Case:
    flags = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    ks = jax.random.split(key, 12)
    arrays = dict(
        q=l2_normalize(jax.random.normal(ks[0], (B, T, H, K))).astype(dtype),
        k=l2_normalize(jax.random.normal(ks[1], (B, T, H, K))).astype(dtype),
        v=jax.random.normal(ks[2], (B, T, H, V)).astype(dtype),
        beta=jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))).astype(dtype),
    )
    kwargs = {}
    if flags.get("gate"):
        arrays["log_decay"] = jax.nn.log_sigmoid(2.0 + jax.random.normal(ks[4], (B, T, H))).astype(dtype)
    if flags.get("write_key"):
        scale = jax.random.uniform(ks[5], (B, T, H, K), minval=0.3, maxval=1.7)
        arrays["write_key"] = (arrays["k"].astype(jnp.float32) * scale).astype(dtype)
    if flags.get("osdn"):
        arrays["d0"] = jax.random.uniform(ks[6], (H, K), minval=0.3, maxval=1.7)
        kwargs.update(OSDN_SETTINGS, beta_aware=bool(flags.get("beta_aware")))
        if flags.get("apf"):
            arrays["log_gamma"] = jax.nn.log_sigmoid(3.0 + jax.random.normal(ks[7], (B, T, H))).astype(dtype)
        if initial_state:
            arrays["initial_d"] = jax.random.uniform(ks[8], (B, H, K), minval=0.3, maxval=1.7)
    if initial_state:
        arrays["initial_state"] = 0.5 * jax.random.normal(ks[9], (B, H, K, V))
    if segments:
        arrays["segment_ids"] = jnp.asarray(packed_segment_ids(rng, B, T))
    return Case(variant, arrays, kwargs)


def run(case: Case, impl: str, *, chunk_size: int = 64, arrays: dict | None = None, precision: str | None = None):
    """Runs the case's op; returns a dict of outputs (o, state, and d for OSDN). ``precision`` is
    the kernels' policy (None: the input dtype's default)."""
    from osdn_jax import ops

    a = dict(case.arrays if arrays is None else arrays)
    pos = [a.pop(n) for n in ("q", "k", "v", "beta")]
    if case.is_osdn:
        o, S, d = ops.osdn(*pos, a.pop("d0"), **a, **case.kwargs, output_final_state=True,
                           chunk_size=chunk_size, impl=impl, precision=precision)
        return dict(o=o, state=S, d=d)
    o, S = ops.delta_rule(*pos, **a, output_final_state=True, chunk_size=chunk_size, impl=impl, precision=precision)
    return dict(o=o, state=S)


FLOAT_INPUTS = ("q", "k", "v", "beta", "log_decay", "write_key", "d0", "log_gamma", "initial_state", "initial_d")


def grads(case: Case, impl: str, *, chunk_size: int = 64, seed: int = 1, upcast: bool = False,
          precision: str | None = None):
    """Gradients of a random linear functional of every output w.r.t. every float input.

    ``upcast`` runs the op on fp32 copies of the inputs (the reference for bf16 cases).
    """
    names = [n for n in FLOAT_INPUTS if n in case.arrays]
    diff = {n: case.arrays[n] for n in names}
    if upcast:
        diff = {n: x.astype(jnp.float32) for n, x in diff.items()}
    fixed = {n: x for n, x in case.arrays.items() if n not in names}
    outs = jax.eval_shape(lambda d: run(case, impl, chunk_size=chunk_size, arrays={**fixed, **d}, precision=precision),
                          diff)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(outs))
    cot = {n: jax.random.normal(kk, s.shape, jnp.float32) for kk, (n, s) in zip(keys, sorted(outs.items()))}

    def loss(d):
        out = run(case, impl, chunk_size=chunk_size, arrays={**fixed, **d}, precision=precision)
        return sum(jnp.sum(out[n].astype(jnp.float32) * cot[n]) for n in out)

    return jax.jit(jax.grad(loss))(diff)


LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def compare_low_precision(case: Case, impl: str, C: int, precision: str | None = None, what: str = "bf16"):
    """Outputs and every gradient of a bf16 / fp16 case against fp32 math on the same (rounded)
    input values, by the relative-RMS rule of ``tolerances.py``."""
    from tolerances import assert_close

    upcast = {n: (x.astype(jnp.float32) if x.dtype in LOW_PRECISION else x) for n, x in case.arrays.items()}
    ref = run(case, "reference", arrays=upcast)
    got = run(case, impl, chunk_size=C, precision=precision)
    assert got["o"].dtype == case.arrays["v"].dtype and got["state"].dtype == jnp.float32
    for name in ref:
        assert_close(got[name], ref[name], what=f"{impl} {case.variant} {what} C={C} {name}", bf16=True)
    gref = grads(case, "reference", upcast=True)
    gout = grads(case, impl, chunk_size=C, precision=precision)
    for name in gref:
        assert gout[name].dtype == case.arrays[name].dtype
        assert_close(gout[name], gref[name], what=f"{impl} {case.variant} {what} C={C} d/d{name}", bf16=True,
                     grad=True)
