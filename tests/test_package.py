"""The install scheme and the public surface."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

import osdn_jax


def test_subpackages_import_under_osdn_jax(tmp_path):
    """Installed, kernels/ and train/ are osdn_jax.kernels / osdn_jax.train and claim no generic
    top-level name (checked from outside the checkout, where the repo root is not on sys.path)."""
    code = (
        "import importlib, importlib.util\n"
        "for name in ('osdn_jax.ops', 'osdn_jax.kernels', 'osdn_jax.train', 'osdn_jax.train.loop',\n"
        "             'osdn_jax.train.__main__', 'osdn_jax.model', 'osdn_jax.generate', 'osdn_jax.perf',\n"
        "             'osdn_jax.hardware'):\n"
        "    importlib.import_module(name)\n"
        "print([n for n in ('kernels', 'train') if importlib.util.find_spec(n) is not None])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"generic top-level names importable: {out.stdout}"


def test_presets_match_spec():
    apr, may = osdn_jax.get_preset("apr"), osdn_jax.get_preset("may")
    assert (apr.eta, apr.d0_init, apr.d_min, apr.d_max) == (1.0, 0.0, 0.0, 1e9)
    assert (may.eta, may.d0_init, may.d_min, may.d_max) == (0.003, 1.0, 2.0 / 3.0, 1.5)
    d1 = osdn_jax.get_preset("apr-d1")  # ours, not the paper's: apr with d0 = 1
    assert dataclasses.replace(d1, name="apr", d0_init=0.0) == apr and d1.d0_init == 1.0


def test_ops_run_under_user_jit_and_vmap():
    """The front door is a plain function of arrays: jit, grad and vmap over an outer axis work."""
    f32 = jnp.float32
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 20, 2, 8), f32)
    q = k = osdn_jax.ops.l2_normalize(x)
    beta = jnp.full((3, 1, 20, 2), 0.5, f32)

    @jax.jit
    def f(q, k, v, beta):
        return osdn_jax.ops.osdn(q, k, v, beta, jnp.ones((2, 8)), eta=1.0, d_min=0.0, d_max=2.0, chunk_size=16)[0]

    batched = jax.vmap(f)(q, k, x, beta)
    assert batched.shape == x.shape
    one = f(q[1], k[1], x[1], beta[1])
    assert jnp.allclose(batched[1], one, atol=1e-6)
    assert jax.grad(lambda v: jnp.sum(f(q[0], k[0], v, beta[0])))(x[0]).shape == x[0].shape


def test_console_script_and_packaged_corpus():
    from importlib import metadata, resources

    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts.get("osdn-train") == "osdn_jax.train.__main__:main"
    assert scripts.get("osdn-prepare") == "osdn_jax.train.prepare:main"
    assert resources.files("osdn_jax.train").joinpath("corpus/kjv.txt.gz").is_file()
