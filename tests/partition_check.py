"""Run by test_kernel_partition.py in a fresh process with 8 CPU devices: the Pallas kernels
(interpret mode) under (data 2 × fsdp 4), (data 8) and a head-split mesh, with Auto and Explicit
axis types, equal the one-device result, values and gradients. "unplaced" cases call
``jax.jit(..., in_shardings=...)`` with arrays not yet on the mesh.

The families share the partitioning (``osdn_jax.kernels.partition``); the numbers here run the
Triton family (fp32 inputs, IEEE policy, fp32 tolerance). The ``mosaic`` entry of ``FAMILIES``
works but is not in ``CASES``: Mosaic GPU's interpreter simulates every device of a ``shard_map``
in lock step, and in jax 0.11.2 that simulation fails on CPU devices ("Barrier remains allocated",
and race reports between accesses of one warpgroup), while the same kernels run clean on one
device. The Mosaic family's sharded dispatch is checked by its CUDA lowering under abstract 8-GPU
meshes instead (test_kernel_partition.py).

    python tests/partition_check.py [case ...]    # prints one "ok <case>" line per case
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from inputs import FLOAT_INPUTS, make_case  # noqa: E402
from tolerances import assert_close  # noqa: E402

from osdn_jax import ops  # noqa: E402

# name -> (mesh shape, axis names, batch axes, head axes)
MESHES = {
    "data2_fsdp4": ((2, 4), ("data", "fsdp"), ("data", "fsdp"), ()),
    "data8": ((8,), ("data",), ("data",), ()),
    "data4_heads2": ((4, 2), ("data", "model"), ("data",), ("model",)),
}
LAYOUT = dict(q="bthk", k="bthk", v="bthk", write_key="bthk", beta="bth", log_decay="bth", log_gamma="bth",
              initial_state="bhkv", initial_d="bhk", segment_ids="bt", d0="hk")


def spec_for(name, batch, heads):
    names = {"b": batch or None, "h": heads or None}
    return P(*(names.get(c) for c in LAYOUT[name]))


# family -> (input dtype, chunk size, precision policy)
FAMILIES = {"triton": (jnp.float32, 16, "ieee"), "mosaic": (jnp.bfloat16, 64, None)}


def loss_fn(case, family):
    _, C, precision = FAMILIES[family]

    def loss(diff, fixed):
        a = {**fixed, **diff}
        q, k, v, beta = (a.pop(n) for n in ("q", "k", "v", "beta"))
        if case.is_osdn:
            o, S, d = ops.osdn(q, k, v, beta, a.pop("d0"), **a, **case.kwargs, output_final_state=True, chunk_size=C,
                               impl="pallas", precision=precision)
            outs = (o, S, d)
        else:
            o, S = ops.delta_rule(q, k, v, beta, **a, output_final_state=True, chunk_size=C, impl="pallas",
                                  precision=precision)
            outs = (o, S)
        total = sum(jnp.sum(jnp.sin(x.astype(jnp.float32) * (i + 1))) for i, x in enumerate(outs))
        return total, outs

    return jax.value_and_grad(loss, has_aux=True)


def check(mesh_name, axis_type, variant, family="triton", placed=True):
    shape, names, batch, heads = MESHES[mesh_name]
    dtype = FAMILIES[family][0]
    case = make_case(variant, B=8, T=40, H=2, K=16, V=16, dtype=dtype, seed=4)
    diff = {n: x for n, x in case.arrays.items() if n in FLOAT_INPUTS}
    fixed = {n: x for n, x in case.arrays.items() if n not in FLOAT_INPUTS}
    with ops.kernel_target("interpret", family=family):
        (ref_loss, ref_outs), ref_grads = jax.jit(loss_fn(case, family))(diff, fixed)

        mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
        sharding = lambda tree: {n: NamedSharding(mesh, spec_for(n, batch, heads)) for n in tree}  # noqa: E731
        put = lambda tree: {n: jax.device_put(x, s) for (n, x), s in zip(tree.items(), sharding(tree).values())}  # noqa: E731
        with jax.set_mesh(mesh):
            ctx = ops.kernel_partition(batch=batch, heads=heads) if heads and axis_type == AxisType.Auto else None
            if placed:
                f, args = jax.jit(loss_fn(case, family)), (put(diff), put(fixed))
            else:  # the caller's arrays are not on the mesh: jit places them by in_shardings
                f = jax.jit(loss_fn(case, family), in_shardings=(sharding(diff), sharding(fixed)))
                args = (diff, fixed)
            if ctx is not None:
                with ctx:
                    (loss, outs), grads = f(*args)
            else:
                (loss, outs), grads = f(*args)
    what = f"{mesh_name} {axis_type.name} {variant} {family}" + ("" if placed else " unplaced")
    low = dtype == jnp.bfloat16
    for i, (x, y) in enumerate(zip(outs, ref_outs)):
        assert_close(x, y, what=f"{what} output {i}", bf16=low)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], what=f"{what} d/d{n}", bf16=low, grad=True)
    print("ok", what, flush=True)


# OS-GDN (every option, both phases) on every mesh and axis type; the two-key rule once per axis
# type; unplaced inputs under Explicit axes.
CASES = [(m, t, "os_gdn", "triton", True) for m in MESHES for t in (AxisType.Auto, AxisType.Explicit)] + [
    ("data4_heads2", AxisType.Auto, "two_key", "triton", True),
    ("data2_fsdp4", AxisType.Explicit, "two_key", "triton", True),
    ("data8", AxisType.Explicit, "os_gdn", "triton", False),
]

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    wanted = set(sys.argv[1:])
    for m, t, v, fam, placed in CASES:
        if not wanted or f"{m}-{t.name}-{v}-{fam}" in wanted:
            check(m, t, v, fam, placed)
