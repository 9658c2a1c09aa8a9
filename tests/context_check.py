"""Run by test_context_parallel.py in a fresh process with 8 CPU devices: the context-parallel ops
(time split over a ``context`` mesh axis) equal the one-device chunked path — outputs, final state
and d, and the gradients of every float input — and so do a CausalLM's loss, gradients and prefill
cache.

    python tests/context_check.py [case ...]    # prints one "ok <case>" line per case
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from inputs import grads, make_case, run  # noqa: E402
from tolerances import assert_close  # noqa: E402

from jax import lax  # noqa: E402

from osdn_jax import CausalLM, model_config, ops  # noqa: E402
from osdn_jax.layers import short_conv, short_conv_slice  # noqa: E402
from osdn_jax.ops import context, segments  # noqa: E402

MESHES = {  # name -> (shape, axis names)
    "context2": ((2,), ("context",)),
    "context4": ((4,), ("context",)),
    "context8": ((8,), ("context",)),
    "data2_context4": ((2, 4), ("data", "context")),
}
CHUNK = 8


def segment_ids(T: int) -> np.ndarray:
    """Row 0: documents that cross device edges (cuts at T/4 + 5 and T/2 + 3); row 1: a cut exactly on the
    edge of every context size that divides T (T/2) and one inside device 0."""
    ids = np.zeros((2, T), np.int32)
    for cut in (T // 4 + 5, T // 2 + 3):
        ids[0, cut:] += 1
    for cut in (3, T // 2):
        ids[1, cut:] += 1
    return ids


def make(variant: str, T: int, dtype=jnp.float32):
    case = make_case(variant, B=2, T=T, H=2, K=16, V=8, seed=7, dtype=dtype)
    case.arrays["segment_ids"] = jnp.asarray(segment_ids(T))
    return case


def mesh_for(name):
    shape, names = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def check_op(variant: str, mesh_names=tuple(MESHES), T: int = 48, impl: str = "chunked", dtype=jnp.float32):
    """One variant on each mesh of ``mesh_names`` against one reference run (bf16 inputs: both runs take
    the bf16 inputs; the relative-RMS rule of ``tolerances``)."""
    case = make(variant, T, dtype)
    bf16 = dtype == jnp.bfloat16
    ref_out = jax.jit(lambda a: run(case, "chunked", chunk_size=CHUNK, arrays=a))(case.arrays)
    ref_grads = grads(case, "chunked", chunk_size=CHUNK)
    chunk, precision = (16, "ieee") if impl == "pallas" else (CHUNK, None)
    for mesh_name in mesh_names:
        with jax.set_mesh(mesh_for(mesh_name)):
            f = jax.jit(lambda a: run(case, impl, chunk_size=chunk, arrays=a, precision=precision))
            assert "all_gather" in f.lower(case.arrays).as_text(), "the op did not run context-parallel"
            out = f(case.arrays)
            got_grads = grads(case, impl, chunk_size=chunk, precision=precision)
        what = f"{mesh_name} {variant} T={T} {impl} {jnp.dtype(dtype).name}"
        for n in ref_out:
            assert_close(out[n], ref_out[n], what=f"{what} {n}", bf16=bf16)
        assert set(got_grads) == set(ref_grads)
        for n in ref_grads:
            assert_close(got_grads[n], ref_grads[n], what=f"{what} d/d{n}", bf16=bf16, grad=True)
        print("ok", what, flush=True)


def check_model(mesh_name: str, mixer: str):
    """Loss and gradients of every parameter, and the prefill cache (S, d, conv histories)."""
    cfg = model_config("tiny", mixer=mixer, hidden_size=32, num_heads=2, num_layers=2, vocab_size=64)
    if mixer == "osdn":
        cfg = model_config("tiny", mixer=type(cfg.mixer)(apf=True, chunk_size=CHUNK, preset="may"), hidden_size=32,
                           num_heads=2, num_layers=2, vocab_size=64)
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)))
    T = 48
    tokens = jax.random.randint(jax.random.key(3), (2, T), 0, 64)
    seg = jnp.asarray(segment_ids(T))

    def loss(params, tokens, seg):
        logits = nnx.merge(graphdef, params)(tokens, seg)
        picked = jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

    def prefill(params, tokens, seg):
        return nnx.merge(graphdef, params).prefill(tokens, seg)

    f, g = jax.jit(jax.value_and_grad(loss)), jax.jit(prefill)
    ref, ref_cache = f(params, tokens, seg), g(params, tokens, seg)
    mesh = mesh_for(mesh_name)
    with jax.set_mesh(mesh):
        sh = NamedSharding(mesh, P("data" if "data" in mesh.axis_names else None, "context"))
        tokens_s, seg_s = jax.device_put(tokens, sh), jax.device_put(seg, sh)
        assert "all_gather" in f.lower(params, tokens_s, seg_s).as_text()
        got, got_cache = f(params, tokens_s, seg_s), g(params, tokens_s, seg_s)
    what = f"model {mesh_name} {mixer}"
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path((got, got_cache)), jax.tree.leaves((ref, ref_cache))):
        assert_close(x, y, what=f"{what} {jax.tree_util.keystr(path)}")
    print("ok", what, flush=True)


def check_user_shard_map():
    """The per-device forms inside the user's own ``jax.shard_map`` (default ``check_vma=True``):
    OS-GDN with every option and the short convolution's halo, values and gradients."""
    case = make("os_gdn", 48)
    a = dict(case.arrays)
    x = jax.random.normal(jax.random.key(5), (2, 48, 6))
    w = jax.random.normal(jax.random.key(6), (4, 6))
    hist = jax.random.normal(jax.random.key(7), (2, 3, 6))
    seg = a.pop("segment_ids")
    names = sorted(a)

    def one_device(arrays, x, w, hist):
        arrays = dict(arrays)
        q, k, v, beta, d0 = (arrays.pop(n) for n in ("q", "k", "v", "beta", "d0"))
        o, S, d = ops.osdn(q, k, v, beta, d0, **arrays, **case.kwargs, segment_ids=seg, output_final_state=True,
                           chunk_size=CHUNK, impl="chunked")
        doc = segments.document_index(seg)
        y = short_conv(x, w, doc, hist)
        return jnp.sum(jnp.sin(o)) + jnp.sum(S * S) + jnp.sum(d ** 3) + jnp.sum(jnp.cos(y))

    def per_device(arrays, x, w, hist, seg):
        arrays = dict(arrays)
        q, k, v, beta, d0 = (arrays.pop(n) for n in ("q", "k", "v", "beta", "d0"))
        o, S, d = context.osdn(q, k, v, beta, d0, **arrays, **case.kwargs, segment_ids=seg, chunk_size=CHUNK)
        y = short_conv_slice(x, w, seg, hist)
        last = lax.axis_index("context") == lax.axis_size("context") - 1
        ends = jnp.where(last, jnp.sum(S * S) + jnp.sum(d ** 3), 0.0)
        return lax.psum(jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(y)) + ends, "context")

    timed = P(None, "context")
    specs = {n: (timed if n in ("q", "k", "v", "beta", "log_decay") else P()) for n in names}
    mesh = mesh_for("context4")
    f = jax.shard_map(per_device, mesh=mesh, in_specs=(specs, timed, P(), P(), timed), out_specs=P())
    ref = jax.jit(jax.value_and_grad(one_device, argnums=(0, 1, 2, 3)))(a, x, w, hist)
    got = jax.jit(jax.value_and_grad(lambda *args: f(*args, seg), argnums=(0, 1, 2, 3)))(a, x, w, hist)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
        assert_close(g, r, what=f"user shard_map {jax.tree_util.keystr(path)}")
    print("ok user shard_map (check_vma=True)", flush=True)


def check_refused_inside_shard_map():
    """Inside a shard_map over ``context`` the front door cannot see the whole sequence: it refuses."""
    mesh = mesh_for("context4")
    x, b = jnp.ones((1, 8, 1, 4)), jnp.full((1, 8, 1), 0.5)
    spec = P(None, "context")
    try:
        jax.shard_map(lambda x, b: ops.delta_rule(x, x, x, b, impl="chunked")[0], mesh=mesh, in_specs=(spec, spec),
                      out_specs=spec)(x, b)
    except ValueError as e:
        assert "'context' is already manual" in str(e) and "osdn_jax.ops.context" in str(e), e
    else:
        raise AssertionError("the front door ran inside a shard_map over 'context'")
    print("ok refused inside shard_map", flush=True)


CASES = {
    **{v: (check_op, v) for v in ("deltanet", "gdn", "osdn", "osdn_apf", "os_gdn")},  # on every mesh
    "osdn_apf-T45": (check_op, "osdn_apf", ("context4",), 45),  # T padded to a multiple of 4
    "os_gdn-pallas": (check_op, "os_gdn", ("context2",), 32, "pallas"),  # the kernels per slice
    "os_gdn-bf16": (check_op, "os_gdn", ("context4",), 48, "chunked", jnp.bfloat16),
    "model-data2_context4-osdn": (check_model, "data2_context4", "osdn"),
    "model-context8-gdn": (check_model, "context8", "gdn"),
    "refused": (check_refused_inside_shard_map,),
    "user-shard-map": (check_user_shard_map,),
}

if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    wanted = sys.argv[1:] or list(CASES)
    for name in wanted:
        fn, *args = CASES[name]
        fn(*args)
