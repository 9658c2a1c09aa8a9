"""The Mosaic GPU kernel family in Mosaic GPU's interpreter on the CPU (TMA copies, barriers and
wgmma simulated, the happens-before race detector on): outputs, final states and every gradient
through the front door against the token-by-token reference, over the shape / option matrix the
Triton kernels are held to, and the detector's verdict after every test. CUDA lowering of the same
kernels: test_kernel_lowering.py and test_kernel_partition.py."""

import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races, reset_gpu_interpret_mode_state

from inputs import compare_low_precision, make_case, run
from osdn_jax import ops
from osdn_jax.kernels.mosaic import state_pass


def races_found() -> bool:
    """The detector's verdict since the last reset (no kernel interpreted since: no state, no race)."""
    try:
        return bool(get_races().races_found)
    except AssertionError:  # get_races asserts that a kernel has set up its state
        return False


@pytest.fixture(autouse=True)
def mosaic_interpreted():
    """Every test here runs the Mosaic family interpreted, and fails if the race detector fired."""
    reset_gpu_interpret_mode_state()
    with ops.kernel_target("interpret", family="mosaic"):
        yield
    found = races_found()
    reset_gpu_interpret_mode_state()
    assert not found, "Mosaic GPU interpreter: RACE DETECTED (see the captured output)"


# variant, T, K, V, dtype, initial state, documents. Every variant; T = 1, below / at / above the
# chunk and several chunks; head dims 64, 128 and a padded pair; bf16 and fp16.
MATRIX = [
    ("deltanet", 1, 64, 64, jnp.bfloat16, True, True),
    ("deltanet", 64, 128, 128, jnp.bfloat16, False, False),
    ("gdn", 65, 64, 64, jnp.bfloat16, True, True),
    ("gdn", 200, 128, 128, jnp.float16, True, True),
    ("two_key", 130, 128, 64, jnp.bfloat16, False, True),
    ("osdn", 63, 64, 64, jnp.bfloat16, True, True),
    ("osdn_apf", 150, 64, 128, jnp.bfloat16, True, True),
    ("os_gdn", 200, 128, 128, jnp.bfloat16, True, True),
    ("deltanet", 70, 48, 80, jnp.float16, False, True),
    ("osdn_apf", 100, 48, 80, jnp.bfloat16, True, False),
]


@pytest.mark.parametrize("variant, T, K, V, dtype, initial_state, segments", MATRIX)
def test_mosaic_matches_reference(variant, T, K, V, dtype, initial_state, segments):
    case = make_case(variant, B=2, T=T, H=2, K=K, V=V, dtype=dtype, initial_state=initial_state,
                     segments=segments, seed=T + K + V)
    compare_low_precision(case, "pallas", 64, what=jnp.dtype(dtype).name)


def test_documents_restart_inside_a_chunk():
    """Ids that come back ([0, 1, 0]) are three documents; the last one sees nothing before it."""
    case = make_case("os_gdn", B=1, T=80, dtype=jnp.bfloat16, initial_state=False, seed=5)
    ids = jnp.concatenate([jnp.zeros(10, jnp.int32), jnp.ones(20, jnp.int32), jnp.zeros(50, jnp.int32)])[None]
    case.arrays["segment_ids"] = ids
    full = run(case, "pallas")
    tail = {n: (x[:, 30:] if x.ndim >= 2 and x.shape[1] == 80 else x) for n, x in case.arrays.items()
            if n != "segment_ids"}
    tail = {n: (x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for n, x in tail.items()}
    alone = run(case, "reference", arrays=tail)
    from tolerances import assert_close

    assert_close(full["o"][:, 30:], alone["o"], what="third document alone", bf16=True)


def test_race_detector_sees_a_missing_wait(monkeypatch):
    """The check above can fail: without the wait for the TMA stores to read their SMEM source,
    the next chunk overwrites the staging buffer under a store still in flight."""
    monkeypatch.setattr(state_pass, "_reuse", lambda: None)
    case = make_case("deltanet", B=1, T=130, H=1, K=64, V=64, dtype=jnp.bfloat16, seed=1)
    run(case, "pallas")
    assert races_found()
    reset_gpu_interpret_mode_state()


@pytest.mark.parametrize("kwargs, dtype, match", [
    (dict(chunk_size=32), jnp.bfloat16, "chunk_size 32 .*Mosaic kernels take 64"),
    (dict(), jnp.float32, "float32 operands .*bf16 / fp16"),
    (dict(precision="tf32"), jnp.bfloat16, "float32 operands"),
])
def test_forced_family_refuses_what_it_does_not_cover(kwargs, dtype, match):
    case = make_case("gdn", B=1, T=40, dtype=dtype, seed=1)
    with pytest.raises(ValueError, match=match):
        run(case, "pallas", **kwargs)


def test_head_dim_256_is_refused_with_the_limit():
    case = make_case("deltanet", B=1, T=40, H=1, K=256, V=64, dtype=jnp.bfloat16, seed=1)
    with pytest.raises(ValueError, match=r"K=256.*up to 128.*KiB of shared memory"):
        run(case, "pallas")


def test_mosaic_needs_hopper():
    case = make_case("gdn", B=1, T=40, dtype=jnp.bfloat16, seed=1)
    with ops.kernel_target("interpret", arch="sm_80", family="mosaic"):
        with pytest.raises(ValueError, match="sm_80 .*sm_90 only"):
            run(case, "pallas")
