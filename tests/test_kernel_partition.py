"""The kernels under a mesh run per device inside ``jax.shard_map``: numerics on 8 CPU devices
(a subprocess: the device count is fixed per process), and the CUDA lowering under an abstract
8-GPU mesh keeps every kernel of both families (Triton, Mosaic GPU) inside the manual region, for
Auto and Explicit axes."""

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

HERE = pathlib.Path(__file__).parent


def test_sharded_kernels_equal_one_device():
    """(data 2 × fsdp 4), (data 8), (data 4 × model 2 over heads); Auto and Explicit axes; inputs
    placed by ``jax.jit``'s ``in_shardings`` under Explicit axes."""
    out = subprocess.run([sys.executable, str(HERE / "partition_check.py")], capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    assert sum(line.startswith("ok ") for line in out.stdout.splitlines()) == 9, out.stdout


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


MOSAIC = {"osdn_mosaic_states_fwd", "osdn_mosaic_states_bwd"}
PHASE1 = {"osdn_preconditioner_fwd", "osdn_preconditioner_bwd"}


def _all_inside(lowered, family):
    """The kernels of a lowered gradient: every one inside the manual region, the expected set."""
    tri, mos = triton_calls(lowered), mosaic_calls(lowered)
    outside = [c.name for c in tri + mos if not c.manual]
    assert not outside, f"kernels outside the manual region (XLA would gather their operands): {outside}"
    if family == "mosaic":  # phase 2 on Mosaic, phase 1 on its Triton kernel
        assert {c.name for c in mos} == MOSAIC and {c.name for c in tri} == PHASE1, (mos, tri)
    else:
        assert not mos and len(tri) == 11, tri  # phase 1 and phase 2, forward and backward


@pytest.mark.parametrize("family", ["triton", "mosaic"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("shape, names, batch", [((2, 4), ("data", "fsdp"), ("data", "fsdp")),
                                                 ((8,), ("data",), "data")])
def test_lowered_kernels_run_inside_shard_map(family, axis_type, shape, names, batch):
    mesh = abstract_gpu_mesh(shape, names, axis_type)
    _all_inside(lower_for_gpu(jax.grad(_loss), _inputs(mesh, batch), mesh=mesh, family=family), family)


@pytest.mark.parametrize("family", ["triton", "mosaic"])
def test_unplaced_inputs_on_an_explicit_mesh(family):
    """``jax.jit(jax.grad(loss), in_shardings=rows)`` traced with unsharded inputs: the kernels'
    operands are resharded to the rows before ``shard_map`` (it used to refuse: "in_specs ...
    does not match the specs of the input")."""
    mesh = abstract_gpu_mesh((2, 4), ("data", "fsdp"), AxisType.Explicit)
    placed = _inputs(mesh, ("data", "fsdp"))
    bare = {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in placed.items()}
    shardings = {n: x.sharding for n, x in placed.items()}
    grad = jax.jit(jax.grad(_loss), in_shardings=(shardings,))
    _all_inside(lower_for_gpu(grad, bare, mesh=mesh, family=family), family)


@pytest.mark.parametrize("family", ["triton", "mosaic"])
def test_heads_split_on_an_explicit_mesh(family):
    mesh = abstract_gpu_mesh((4, 2), ("data", "model"), AxisType.Explicit)
    lowered = lower_for_gpu(jax.grad(_loss), _inputs(mesh, "data", "model"), mesh=mesh, family=family)
    _all_inside(lowered, family)
    assert '{"model"}' in lowered.as_text()  # heads stay split over the model axis inside the kernels


def test_sharded_time_axis_is_refused():
    mesh = abstract_gpu_mesh((2, 4), ("data", "seq"), AxisType.Explicit)
    xs = _inputs(mesh, "data")
    xs["q"] = jax.ShapeDtypeStruct(xs["q"].shape, xs["q"].dtype, sharding=NamedSharding(mesh, P("data", "seq")))
    with pytest.raises(ValueError, match="q: the time axis is sharded over mesh axes .*'seq'"):
        lower_for_gpu(_loss, xs, mesh=mesh)


def test_auto_axes_that_do_not_divide_the_batch_are_left_out():
    mesh = abstract_gpu_mesh((2, 4), ("data", "fsdp"), AxisType.Auto)
    calls = triton_calls(lower_for_gpu(_loss, _inputs(mesh, None, B=2), mesh=mesh, family="triton"))
    assert calls and all(c.manual for c in calls)  # rows over 'data' only (4 does not divide 2·…)
