"""``benchmarks/aot.py`` compiles for accelerators that are not here: one small op program (OSDN,
chunked path, forward and forward+backward) and one tiny training step for an H100 and for a TPU
v5e, read through XLA's memory analysis and ``osdn_jax.perf``. The toolchains (~730 MB CUDA, ~220
MB libtpu, pip) install on first use into a cache folder of their own; the test skips only where
they cannot be installed."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
KINDS = {"h100": "NVIDIA H100 80GB HBM3", "v5e": "TPU v5 lite"}


def _rows(target, tmp_path):
    path = tmp_path / f"{target}.json"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot.py"), "--target", target, "--quick",
                          "--json", str(path)], capture_output=True, text=True, timeout=1200)
    if out.returncode == 3 and "cannot compile" in out.stderr:
        pytest.skip(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads(path.read_text()), out.stdout


@pytest.mark.parametrize("target", ["h100", "v5e"])
def test_compiles_ops_and_a_train_step_for_a_chip_that_is_not_here(target, tmp_path):
    rows, stdout = _rows(target, tmp_path)
    assert {r["device_kind"] for r in rows} == {KINDS[target]}, stdout
    fwd, fb = (next(r for r in rows if r["kind"] == "op" and r["mode"] == m) for m in ("fwd", "fwd+bwd"))
    T = fwd["shape"][1]
    for r in (fwd, fb):
        assert "error" not in r, r
        m = r["memory"]
        assert m["arguments"] > 0 and m["outputs"] > 0 and m["peak"] >= m["arguments"] + m["outputs"], r
        assert r["seconds"] > 0 and r["hbm_bytes"] > m["io"] and r["top"], r
    assert fb["memory"]["peak"] > fwd["memory"]["peak"]
    assert 2.0 < fb["matmul_flops"] / fwd["matmul_flops"] < 4.0  # the backward costs about twice the forward
    # phase 1 runs in chunks for a GPU or TPU (not T launches of a token loop); its fallback passes,
    # whose trips depend on where the clip is active, are counted apart
    assert fwd["launches"] < T and 0 < fwd["dynamic_launches"] < fwd["launches"], fwd
    [step] = [r for r in rows if r["kind"] == "train"]
    assert "error" not in step and step["rows_per_device"] == 2, step
    assert step["memory"]["peak"] > step["memory"]["arguments"] > 0
    assert step["tokens_per_s"] > 0 and 0 < step["mfu"] < 1
    assert "| osdn | chunked |" in stdout and "| tiny | auto | 1 | 2 |" in stdout


def test_refuses_an_unknown_target():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot.py"), "--target", "b200", "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--target: unknown ['b200']" in out.stderr


def test_largest_batch_search():
    """The rows-per-device search: the largest count whose peak fits, in a few compiles, for a
    linear peak, one that bends near the limit (XLA rematerializes there), one where nothing fits
    and one where everything does."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from aot import largest_batch

    cases = [
        (lambda b: 5e9 + 0.575e9 * b, 115, 4),
        (lambda b: 5e9 + 0.575e9 * min(b, 80) + 0.3e9 * max(b - 80, 0), 147, 6),
        (lambda b: 80e9 + b, 0, 1),
        (lambda b: 1e9 + b, 1024, 3),
    ]
    for peak, expected, most_compiles in cases:
        rows, seen = largest_batch(peak, 71.2e9)
        assert rows == expected and len(seen) <= most_compiles, (rows, sorted(seen))
        assert all(peak(b) <= 71.2e9 for b in seen if b <= rows) and (rows == 1024 or peak(rows + 1) > 71.2e9)


def test_a_compile_the_tpu_refuses_counts_as_not_fitting():
    """A TPU compiler refuses a program larger than the chip (RESOURCE_EXHAUSTED) instead of
    planning it; the search reads the size it names as that count's peak (a lower bound) and goes
    on, and anything else is not mistaken for a refusal."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from aot import largest_batch, refused_bytes

    refusal = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "({:.2f}G) exceeds available HBM (15.75G).")
    assert refused_bytes(RuntimeError(refusal.format(23.76))) == pytest.approx(23.76 * 2**30)
    assert refused_bytes(RuntimeError("RESOURCE_EXHAUSTED: out of memory")) == float("inf")
    assert refused_bytes(ValueError("shapes do not match")) is None

    def peak(b):  # 3 GiB a row; the compiler refuses from 5 rows on
        need = 3 * 2**30 * b
        return need if b < 5 else refused_bytes(RuntimeError(refusal.format(need / 2**30)))

    assert largest_batch(peak, 14.2 * 2**30)[0] == 4
    assert largest_batch(lambda b: refused_bytes(RuntimeError(refusal.format(23.76))), 14.2 * 2**30)[0] == 0
