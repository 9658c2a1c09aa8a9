"""Context parallelism (``osdn_jax.ops.context``): numerics on 8 CPU devices against one device (a
subprocess: the device count is fixed per process), the CUDA lowering of the kernels per slice under
an abstract GPU mesh, and the errors."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from osdn_jax import ops
from osdn_jax.kernels.lowering import abstract_gpu_mesh, lower_for_gpu, mosaic_calls, triton_calls
from osdn_jax.ops import context

HERE = pathlib.Path(__file__).parent


def test_context_parallel_equals_one_device():
    """deltanet, gdn, osdn, osdn + APF, os_gdn on context 2 / 4 / 8 and data 2 × context 4, packed
    documents across device edges, initial state and d; T not a multiple of the context size; bf16 inputs; the
    kernels per slice; a CausalLM's loss, gradients and prefill cache; the front door refused inside
    a shard_map that already splits time; the per-device forms inside a user's shard_map (check_vma=True)."""
    out = subprocess.run([sys.executable, str(HERE / "context_check.py")], capture_output=True, text=True,
                         timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    assert sum(line.startswith("ok ") for line in out.stdout.splitlines()) == 27, out.stdout


def _inputs(mesh, B=4, T=256, H=2, K=64):
    rows = NamedSharding(mesh, P("data", "context"))
    x = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=rows)  # noqa: E731
    return dict(q=x(B, T, H, K), k=x(B, T, H, K), v=x(B, T, H, K), beta=x(B, T, H),
                log_decay=x(B, T, H, dt=jnp.float32), segment_ids=x(B, T, dt=jnp.int32),
                d0=jax.ShapeDtypeStruct((H, K), jnp.float32, sharding=NamedSharding(mesh, P())))


def _loss(xs, segment_ids):
    xs = dict(xs, segment_ids=segment_ids)
    q, k, v, beta, d0 = (xs.pop(n) for n in ("q", "k", "v", "beta", "d0"))
    o = ops.osdn(q, k, v, beta, d0, eta=1.0, d_min=0.5, d_max=1.5, beta_aware=True, impl="pallas", **xs)[0]
    return jnp.sum(o.astype(jnp.float32))


@pytest.mark.parametrize("family", ["triton", "mosaic"])
def test_kernels_per_slice_lower_for_cuda_inside_the_manual_region(family):
    mesh = abstract_gpu_mesh((2, 4), ("data", "context"), AxisType.Auto)
    xs = _inputs(mesh)
    lowered = lower_for_gpu(jax.grad(_loss), xs, xs.pop("segment_ids"), mesh=mesh, family=family)
    calls = triton_calls(lowered) + mosaic_calls(lowered)
    # forward: phase 1 (relay rounds and the final pass share one kernel), phase 2; backward: both
    phase2 = {c.name for c in (mosaic_calls if family == "mosaic" else triton_calls)(lowered)} - {
        "osdn_preconditioner_fwd", "osdn_preconditioner_bwd"}
    assert len(phase2) >= (2 if family == "mosaic" else 9), [c.name for c in calls]
    assert all(c.manual for c in calls), [c.name for c in calls if not c.manual]
    text = lowered.as_text()
    assert "all_gather" in text and "collective_permute" in text


def test_per_device_forms_check_their_arguments():
    x = jnp.ones((1, 8, 1, 4))
    with pytest.raises(ValueError, match="impl: expected 'chunked' or 'pallas'"):
        context.delta_rule(x, x, x, jnp.ones((1, 8, 1)), impl="reference")


def test_no_context_axis_means_no_context_parallel_path():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert context.context_mesh(4) is None
