"""The kernels compiled to GPU machine code on this CPU host (``benchmarks/compile_kernels.py``:
jaxlib's Triton IR → the pip ``triton`` wheel → ``ptxas``): no compile error, no register spill,
shared memory within the limits, tensor-core instructions in every bf16 / TF32 kernel. The CI
subset covers the largest tiles (K = V = 128, chunk 64, every option on) in bf16 on sm_90 and
sm_80, and TF32 and IEEE on sm_90; ``python benchmarks/compile_kernels.py`` checks the whole table."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
pytest.importorskip("triton", reason="the GPU compile check needs the triton wheel (pip install -e '.[test]')")


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_kernels.py"), *args, "--workers", "2"],
                          capture_output=True, text=True, timeout=1500)


def test_quick_subset_compiles_without_spills():
    out = _run("--quick")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| delta_rule") or line.startswith("| osdn")]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    configs = {row.split("|")[2].strip() for row in rows}
    assert len(configs) == 4, out.stdout
    for cfg in configs:  # every phase-2 kernel of every config (phase 1 is shared where its IR is the same)
        assert sum(row.startswith("| delta_rule") and row.split("|")[2].strip() == cfg for row in rows) == 9, cfg
    assert {row.split("|")[1].strip() for row in rows if row.startswith("| osdn")} == {
        "osdn_preconditioner_fwd", "osdn_preconditioner_bwd"}
    assert all(row.rstrip().endswith("| ok |") for row in rows), out.stdout
    tensor_core = [row for row in rows if row.startswith("| delta_rule") and " ieee " not in row]
    assert all("mma" in row for row in tensor_core), out.stdout
    assert any("wgmma" in row for row in tensor_core) and any("sm_80" in row for row in tensor_core)


def test_the_check_fails_on_spills():
    """The check has teeth: tiles twice as wide as the table's make Ampere's dk kernel spill."""
    out = _run("--operand", "bfloat16", "--dims", "128x128", "--arch", "sm_80", "--variant", "full",
               "--kernel", "delta_rule_grads_k", "--tiles", "grads_k=num_warps:8,bk:64,bv:64")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    failing = [line for line in out.stdout.splitlines() if "FAIL: spills" in line]
    assert len(failing) == 1 and failing[0].startswith("| delta_rule_grads_k"), out.stdout
