"""The kernels under a mesh run per device inside ``jax.shard_map``: numerics on 8 CPU devices
(a subprocess: the device count is fixed per process), and the CUDA lowering under an abstract
8-GPU mesh keeps every kernel inside the manual region, for Auto and Explicit axes."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from osdn_jax import ops
from osdn_jax.kernels.lowering import abstract_gpu_mesh, lower_for_gpu, triton_calls

HERE = pathlib.Path(__file__).parent


def test_sharded_kernels_equal_one_device():
    """(data 2 × fsdp 4), (data 8), (data 4 × model 2 over heads); Auto and Explicit axes."""
    out = subprocess.run([sys.executable, str(HERE / "partition_check.py")], capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    assert sum(line.startswith("ok ") for line in out.stdout.splitlines()) == 8, out.stdout


def _inputs(mesh, batch_spec, heads_spec=None, B=8, T=128, H=2, K=64):
    sh = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    x = lambda *shape, spec, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh(*spec))  # noqa: E731
    rows = (batch_spec, None, heads_spec)
    return dict(q=x(B, T, H, K, spec=rows), k=x(B, T, H, K, spec=rows), v=x(B, T, H, K, spec=rows),
                beta=x(B, T, H, spec=rows),
                d0=x(H, K, spec=(heads_spec,), dt=jnp.float32))


def _loss(xs):
    o = ops.osdn(xs["q"], xs["k"], xs["v"], xs["beta"], xs["d0"], eta=1.0, d_min=0.5, d_max=1.5, impl="pallas")[0]
    return jnp.sum(o.astype(jnp.float32))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("shape, names, batch", [((2, 4), ("data", "fsdp"), ("data", "fsdp")),
                                                 ((8,), ("data",), "data")])
def test_lowered_kernels_run_inside_shard_map(axis_type, shape, names, batch):
    mesh = abstract_gpu_mesh(shape, names, axis_type)
    calls = triton_calls(lower_for_gpu(jax.grad(_loss), _inputs(mesh, batch), mesh=mesh))
    assert len(calls) == 11, calls  # phase 1 and phase 2, forward and backward
    outside = [c.name for c in calls if not c.manual]
    assert not outside, f"kernels outside the manual region (XLA would gather their operands): {outside}"


def test_heads_split_on_an_explicit_mesh():
    mesh = abstract_gpu_mesh((4, 2), ("data", "model"), AxisType.Explicit)
    lowered = lower_for_gpu(jax.grad(_loss), _inputs(mesh, "data", "model"), mesh=mesh)
    assert all(c.manual for c in triton_calls(lowered))
    assert '{"model"}' in lowered.as_text()  # heads stay split over the model axis inside the kernels


def test_sharded_time_axis_is_refused():
    mesh = abstract_gpu_mesh((2, 4), ("data", "seq"), AxisType.Explicit)
    xs = _inputs(mesh, "data")
    xs["q"] = jax.ShapeDtypeStruct(xs["q"].shape, xs["q"].dtype, sharding=NamedSharding(mesh, P("data", "seq")))
    with pytest.raises(ValueError, match="q: the time axis is sharded over mesh axes .*'seq'"):
        lower_for_gpu(_loss, xs, mesh=mesh)


def test_auto_axes_that_do_not_divide_the_batch_are_left_out():
    mesh = abstract_gpu_mesh((2, 4), ("data", "fsdp"), AxisType.Auto)
    calls = triton_calls(lower_for_gpu(_loss, _inputs(mesh, None, B=2), mesh=mesh))
    assert calls and all(c.manual for c in calls)  # rows over 'data' only (4 does not divide 2·…)
