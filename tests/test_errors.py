"""Bad input: a ValueError that names the argument and what was expected."""

import jax.numpy as jnp
import numpy as np
import pytest

from osdn_jax import get_preset, ops

B, T, H, K, V = 2, 10, 3, 8, 6


def good():
    f = jnp.float32
    return dict(q=jnp.ones((B, T, H, K), f), k=jnp.ones((B, T, H, K), f), v=jnp.ones((B, T, H, V), f),
                beta=jnp.ones((B, T, H), f) * 0.5)


def call_delta(**over):
    a = {**good(), **over}
    return ops.delta_rule(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("beta"), **a)


def call_osdn(**over):
    a = {**good(), "d0": jnp.ones((H, K)), "eta": 1.0, "d_min": 0.0, "d_max": 2.0, **over}
    return ops.osdn(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("beta"), a.pop("d0"), **a)


@pytest.mark.parametrize("over, pattern", [
    (dict(q=jnp.ones((B, T, H))), r"q: expected a rank-4 array \[B, T, H, K\]"),
    (dict(k=jnp.ones((B, T, H, K, 1))), r"k: expected a rank-4 array"),
    (dict(q=jnp.ones((B, T, H, K + 1))), r"q: expected shape \[B, T, H, K\] like k = \[2, 10, 3, 8\], got shape \[2, 10, 3, 9\]"),
    (dict(v=jnp.ones((B, T + 1, H, V))), r"v: expected shape \[B, T, H, V\] with B, T, H = 2, 10, 3"),
    (dict(v=jnp.ones((B, T, H, V), jnp.bfloat16)), r"q, k, v: expected one dtype.*v bfloat16"),
    (dict(k=jnp.ones((B, T, H, K), jnp.int32)), r"k: expected a bfloat16, float16 or float32 array"),
    (dict(beta=jnp.ones((B, T))), r"beta: expected shape \[B, T, H\] = \[2, 10, 3\], got shape \[2, 10\]"),
    (dict(log_decay=jnp.ones((B, T, H + 1))), r"log_decay: expected shape \[B, T, H\]"),
    (dict(write_key=jnp.ones((B, T, H, V))), r"write_key: expected shape \[B, T, H, K\] like k"),
    (dict(initial_state=jnp.ones((B, H, V, K))), r"initial_state: expected shape \[B, H, K, V\] = \[2, 3, 8, 6\]"),
    (dict(initial_state=jnp.ones((B, H, K, V), jnp.bfloat16)), r"initial_state: expected a float32 array"),
    (dict(segment_ids=jnp.ones((B, T), jnp.float32)), r"segment_ids: expected an integer array \[B, T\]"),
    (dict(segment_ids=jnp.ones((B, T + 1), jnp.int32)), r"segment_ids: expected shape \[B, T\] = \[2, 10\]"),
    (dict(chunk_size=48), r"chunk_size: expected a power of two"),
    (dict(chunk_size=0), r"chunk_size: expected a power of two"),
    (dict(chunk_size=32.0), r"chunk_size: expected a power of two"),
    (dict(impl="fast"), r"impl: expected one of 'auto', 'reference', 'chunked', 'pallas', got 'fast'"),
    (dict(q=np.ones((B, T, H, K)).tolist()), r"q: expected a rank-4 array"),
])
def test_delta_rule_rejects(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        call_delta(**over)


@pytest.mark.parametrize("over, pattern", [
    (dict(d0=jnp.ones((K,))), r"d0: expected shape \[H, K\] with H, K from k = \[3, 8\], got shape \[8\]"),
    (dict(log_gamma=jnp.ones((B, T, 1))), r"log_gamma: expected shape \[B, T, H\]"),
    (dict(initial_d=jnp.ones((B, H, K + 1))), r"initial_d: expected shape \[B, H, K\]"),
    (dict(eta=-1.0), r"eta: expected a number >= 0.0"),
    (dict(eta="big"), r"eta: expected a Python number"),
    (dict(d_min=2.0, d_max=1.0), r"d_min, d_max: expected d_min <= d_max"),
    (dict(impl="Reference"), r"impl: expected one of"),
])
def test_osdn_rejects(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        call_osdn(**over)


def test_preconditioner_rejects():
    with pytest.raises(ValueError, match=r"k: expected a rank-4 array \[B, T, H, K\]"):
        ops.osdn_preconditioner(jnp.ones((T, H, K)), jnp.ones((H, K)), eta=1.0, d_min=0.0, d_max=2.0)
    with pytest.raises(ValueError, match=r"beta: expected shape \[B, T, H\]"):
        ops.osdn_preconditioner(jnp.ones((B, T, H, K)), jnp.ones((H, K)), eta=1.0, d_min=0.0, d_max=2.0,
                                beta=jnp.ones((B, T)))


@pytest.mark.parametrize("over, pattern", [
    (dict(chunk_size=128), r"impl='pallas': the triton kernels do not cover chunk_size 128"),
    (dict(q=jnp.ones((B, T, H, 256)), k=jnp.ones((B, T, H, 256))), r"impl='pallas': the triton kernels do not cover head dims K=256"),
])
def test_pallas_refuses_what_its_kernels_do_not_cover(over, pattern):
    with pytest.raises(ValueError, match=pattern):
        call_delta(impl="pallas", **over)
    call_delta(impl="auto", **over)  # auto falls back to the chunked path


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown OSDN preset 'june'; expected one of \['apr', 'apr-d1', 'may'\]"):
        get_preset("june")


def test_final_state_only_when_asked():
    o, S = call_delta()
    assert S is None and o.shape == (B, T, H, V) and o.dtype == jnp.float32
    o, S, d = call_osdn()
    assert S is None and d is None
    o, S, d = call_osdn(output_final_state=True)
    assert S.shape == (B, H, K, V) and S.dtype == jnp.float32 and d.shape == (B, H, K)
