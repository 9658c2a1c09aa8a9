"""The Mosaic GPU kernels compiled to Hopper machine code on this CPU host
(``benchmarks/compile_mosaic.py``: the serialized Mosaic module → JAX's CUDA plugin's
``MosaicGpuCompile`` with a stand-in driver → ``ptxas``): no compile error, no register spill,
shared memory within Hopper's 227 KiB, wgmma and TMA instructions in the PTX. The CI subset is the
largest config (OS-GDN with every option, K = V = 128, bf16) and a small fp16 one; the script's
default run checks the whole table. The toolchain (~730 MB, pip) installs on first use."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
if shutil.which("cc") is None:
    pytest.skip("the Mosaic compile check builds a stand-in CUDA driver with cc", allow_module_level=True)


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_mosaic.py"), *args],
                          capture_output=True, text=True, timeout=1500)


def _rows(out):
    return [line for line in out.stdout.splitlines() if line.startswith("| osdn_mosaic")]


def test_quick_subset_compiles_without_spills():
    out = _run("--quick")
    rows = _rows(out)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert len(rows) == 6 and {row.split("|")[1].strip() for row in rows} == {  # 2 configs, split sequences
        "osdn_mosaic_states_fwd", "osdn_mosaic_states_bwd", "osdn_mosaic_states_summary"}, out.stdout
    assert all(row.rstrip().endswith("| yes | yes | ok |") for row in rows), out.stdout


def test_the_check_fails_past_the_shared_memory_limit():
    """The check has teeth: the state passes at K = 256 (past the front door's limit) need more
    shared memory than a Hopper block has."""
    out = _run("--raw-k", "256")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert any("FAIL" in row and "shared memory" in row for row in _rows(out)), out.stdout
