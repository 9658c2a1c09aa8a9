"""The Mosaic GPU kernel family in Mosaic GPU's interpreter on the CPU (TMA copies, barriers and
wgmma simulated, the happens-before race detector on): outputs, final states and every gradient
through the front door against the token-by-token reference, over the shape / option matrix the
Triton kernels are held to, and the detector's verdict after every test. On a GPU backend
(``benchmarks/gpu_suite.sh``) the same tests run the compiled kernels natively. CUDA lowering of
the same kernels: test_kernel_lowering.py and test_kernel_partition.py."""

import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races, reset_gpu_interpret_mode_state

import jax

from inputs import compare_low_precision, make_case, run
from osdn_jax import ops
from osdn_jax.kernels.config import Target
from osdn_jax.kernels.mosaic import state_pass
from osdn_jax.kernels.mosaic.delta_rule import delta_rule_mosaic, pieces_for
from tolerances import assert_close


def races_found() -> bool:
    """The detector's verdict since the last reset (no kernel interpreted since: no state, no race)."""
    try:
        return bool(get_races().races_found)
    except AssertionError:  # get_races asserts that a kernel has set up its state
        return False


ON_GPU = jax.default_backend() == "gpu"


@pytest.fixture(autouse=True)
def mosaic_interpreted():
    """Every test here runs the Mosaic family (interpreted on CPU, where it fails if the race
    detector fired; compiled on a GPU)."""
    reset_gpu_interpret_mode_state()
    with ops.kernel_target("gpu" if ON_GPU else "interpret", family="mosaic"):
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
    assert_close(full["o"][:, 30:], alone["o"], what="third document alone", bf16=True)


@pytest.mark.skipif(ON_GPU, reason="the race detector is part of the interpreter")
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


DELTA_INPUTS = ("q", "k", "v", "beta", "write_key", "log_decay", "initial_state")


def _split_outputs(case, pieces, upcast=False):
    """``delta_rule_mosaic`` with ``pieces`` (None: the reference op), outputs and gradients of a
    random functional of (o, S) with respect to every float input."""
    a = case.arrays
    names = [n for n in DELTA_INPUTS if n in a]
    xs = {n: (a[n].astype(jnp.float32) if upcast else a[n]) for n in names}
    cot = jax.random.normal(jax.random.PRNGKey(2), a["v"].shape, jnp.float32)

    def op(xs):
        if pieces is None:
            return ops.delta_rule(**xs, segment_ids=a.get("segment_ids"), output_final_state=True, impl="reference")
        return delta_rule_mosaic(**xs, scale=a["q"].shape[-1] ** -0.5, segment_ids=a.get("segment_ids"),
                                 target=Target(not ON_GPU, "sm_90"), pieces=pieces)

    def loss(xs):
        o, S = op(xs)
        return jnp.sum(o.astype(jnp.float32) * cot) + jnp.sum(jnp.sin(S))

    return jax.jit(op)(xs), jax.jit(jax.grad(loss))(xs)


@pytest.mark.parametrize("variant, T, V, pieces", [("gdn", 300, 64, 4), ("two_key", 200, 128, 3)])
def test_sequence_split_matches_reference(variant, T, V, pieces):
    """Each sequence cut into pieces that run side by side (entry states from the pieces' affine
    maps, the backward's exit cotangents through the transposed maps): documents crossing piece
    edges, the gate, an initial state, and a last piece padded with inert chunks (T = 200: 4
    chunks in 3 pieces of 2)."""
    case = make_case(variant, B=1, T=T, H=2, K=64, V=V, dtype=jnp.bfloat16, seed=T)
    (o, S), g = _split_outputs(case, pieces)
    (o_ref, S_ref), g_ref = _split_outputs(case, None, upcast=True)
    assert_close(o, o_ref, what=f"{variant} split o", bf16=True)
    assert_close(S, S_ref, what=f"{variant} split state", bf16=True)
    for n in g_ref:
        assert_close(g[n], g_ref[n], what=f"{variant} split d/d{n}", bf16=True, grad=True)


def test_front_door_splits_few_long_sequences():
    """B·H = 2 programs of one value tile: the front door splits T = 1100 (18 chunks) in two."""
    assert pieces_for(1, 2, 64, 18) == 2
    case = make_case("gdn", B=1, T=1100, H=2, K=64, V=64, dtype=jnp.bfloat16, seed=8)
    compare_low_precision(case, "pallas", 64)


def test_pieces_fill_the_gpu_but_stay_long():
    assert pieces_for(8, 16, 128, 64) == 1  # 256 programs: no split
    assert pieces_for(1, 4, 128, 64) == 8  # 8 programs → 64 needs 16 pieces, but 64 chunks allow 8 of ≥ 8
    assert pieces_for(1, 1, 64, 10) == 1  # too short to split


@pytest.mark.skipif(ON_GPU, reason="the interpreter's thread pool")
def test_interpreter_refuses_a_thread_pool_that_would_deadlock():
    """With 2 CPU pool threads the interpreter's two warpgroups can starve each other forever: the
    call is refused with the way out instead."""
    import os
    import pathlib
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); import jax.numpy as jnp; from inputs import make_case, run; "
            "from osdn_jax import ops\n"
            "with ops.kernel_target('interpret', family='mosaic'):\n"
            "    run(make_case('gdn', B=1, T=40, dtype=jnp.bfloat16), 'pallas')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NPROC": "2"}, cwd=str(pathlib.Path(__file__).parents[1]))
    assert out.returncode != 0 and "Start it with NPROC=4" in out.stderr, out.stderr[-2000:]
