"""``osdn_jax.perf``: the optimized-HLO reader, the FLOP counts inside Pallas kernels and the
roofline, each against an independent count: XLA's own cost analysis of the same compiled program,
XLA's own loop trip counts, and the chunkwise algorithm's matmul FLOPs worked out by hand."""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from osdn_jax import hardware, ops
from osdn_jax.flops import PEAK_TFLOPS, device_peak_flops
from osdn_jax.kernels.lowering import abstract_gpu_mesh, lower_for_gpu, mosaic_calls, triton_calls
from osdn_jax.perf import Program, analyze, label, roofline
from osdn_jax.perf.hlo import Kernel, dot_class, parse_module, parse_shape, trip_count
from osdn_jax.perf.pallas import decode_attribute, mosaic_flops, triton_flops

S = jax.ShapeDtypeStruct


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _totals(program: Program) -> tuple[float, float, float]:
    flops = sum(sum(k.flops.values()) * k.count for k in program.kernels)
    return flops, sum(k.bytes * k.count for k in program.kernels), sum(k.transcendentals * k.count
                                                                      for k in program.kernels)


@pytest.mark.parametrize("name, fn, args", [
    ("matmul, tanh", lambda a, b: jnp.tanh(a @ b), (S((256, 128), jnp.float32), S((128, 512), jnp.float32))),
    ("batched einsum", lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (S((8, 64, 32), jnp.float32),
                                                                       S((8, 32, 16), jnp.float32))),
    ("softmax", lambda a: jax.nn.softmax(a, axis=-1) * 2, (S((512, 256), jnp.float32),)),
    ("dynamic slice", lambda x, i: jax.lax.dynamic_slice(x, (i, 0), (16, 64)) * 2,
     (S((1024, 64), jnp.float32), S((), jnp.int32))),
])
def test_work_and_bytes_match_xla_cost_analysis(name, fn, args):
    """Loop-free programs: FLOPs, transcendentals and bytes as XLA's own cost analysis counts them
    (elementwise work within 2%: XLA counts a few conversions we do not)."""
    compiled = _compiled(fn, *args)
    xla = compiled.cost_analysis()
    flops, bytes_, transcendentals = _totals(Program(compiled.as_text(), "gpu"))
    assert flops == pytest.approx(xla["flops"], rel=0.02), name
    assert bytes_ == pytest.approx(xla["bytes accessed"], rel=0.02), name
    assert transcendentals == pytest.approx(xla.get("transcendentals", 0.0), abs=1.0), name


def test_loops_count_every_trip_and_trip_counts_are_read_off_the_loop():
    """A scan of 37 steps: its body's kernels launch 37 times; with XLA's ``known_trip_count``
    removed (TPU programs carry none) the count read off the condition and the step is the same."""
    def f(x, w):
        def body(c, xt):
            return jnp.tanh(c @ w + xt), jnp.sum(c)
        return jax.lax.scan(body, x[0], x)

    compiled = _compiled(f, S((37, 8, 64), jnp.float32), S((64, 64), jnp.float32))
    text = compiled.as_text()
    program = Program(text, "gpu")
    dots = [k for k in program.kernels if k.matmul_flops]
    assert [k.count for k in dots] == [37] and dots[0].matmul_flops == 2 * 8 * 64 * 64
    assert not program.notes

    comps, _ = parse_module(text)
    stripped, _ = parse_module(re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text))
    loops = [(name, inst) for name, comp in comps.items() for inst in comp.instructions if inst.opcode == "while"]
    assert loops
    for name, inst in loops:
        known = trip_count(inst, comps[name], comps)
        read = trip_count(stripped[name].by_name[inst.name], stripped[name], stripped)
        assert known == read == 37


def test_a_fusion_reads_only_the_slices_it_takes_and_writes_only_its_update():
    text = """HloModule m

%fused (p0: f32[1024,64], p1: f32[1024,64], p2: s32[]) -> f32[1024,64] {
  %p0 = f32[1024,64]{1,0} parameter(0)
  %p1 = f32[1024,64]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %ds = f32[16,64]{1,0} dynamic-slice(%p0, %p2, %z), dynamic_slice_sizes={16,64}
  %two = f32[] constant(2)
  %b = f32[16,64]{1,0} broadcast(%two), dimensions={}
  %m = f32[16,64]{1,0} multiply(%ds, %b)
  ROOT %dus = f32[1024,64]{1,0} dynamic-update-slice(%p1, %m, %p2, %z)
}

ENTRY %main (a: f32[1024,64], b: f32[1024,64], i: s32[]) -> f32[1024,64] {
  %a = f32[1024,64]{1,0} parameter(0)
  %b = f32[1024,64]{1,0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %f = f32[1024,64]{1,0} fusion(%a, %b, %i), kind=kLoop, calls=%fused
}
"""
    [k] = Program(text, "gpu").kernels
    assert k.bytes == 16 * 64 * 4 + 0 + 4 + 16 * 64 * 4  # the slice read, the index, the update written
    assert k.flops == {"vector": 16 * 64} and k.count == 1


def test_shapes_and_precision_classes():
    assert parse_shape("(f32[8,16]{1,0}, bf16[4]{0:T(256)}, s32[])") == [
        hardware_array("f32", (8, 16)), hardware_array("bf16", (4,)), hardware_array("s32", ())]
    assert dot_class("gpu", ["bf16", "bf16"], None, None) == "bf16"
    assert dot_class("gpu", ["f32", "f32"], "highest,highest", None) == "fp32"
    assert dot_class("gpu", ["f32", "f32"], None, None) == "tf32"
    assert dot_class("tpu", ["f32", "f32"], "highest,highest", None) == "bf16_6x"
    assert dot_class("tpu", ["f32", "f32"], "high,high", None) == "bf16_3x"
    assert dot_class("tpu", ["f32", "f32"], None, None) == "bf16"
    assert dot_class("gpu", ["f32", "f32"], None, "dot_bf16_bf16_f32_x6") == "fp32"


def hardware_array(dtype, dims):
    from osdn_jax.perf.hlo import Array

    return Array(dtype, dims)


def test_roofline_takes_the_slower_of_compute_and_memory_per_kernel():
    h100 = hardware.chip("h100")
    text = """HloModule m

ENTRY %main (a: f32[8]) -> f32[8] {
  ROOT %a = f32[8]{0} parameter(0)
}
"""
    program = Program(text, "gpu")
    program.kernels = [
        Kernel("mm", "gemm", "jit(f)/dot", 2, {"bf16": 989e9, "fp32": 67e9}, 0.0, 3.35e6),  # 2 ms compute
        Kernel("copy", "kLoop", "jit(f)/add", 10, {"vector": 1e6}, 0.0, 3.35e9),  # 1 ms memory each
    ]
    r = roofline(program, h100)
    assert r.seconds == pytest.approx(2 * 2e-3 + 10 * 1e-3)
    assert r.fp32_share == pytest.approx(2 * 1e-3 / r.seconds)  # the fp32 half of the compute-bound kernel
    assert r.fp32_product_seconds == pytest.approx(2e-3)
    assert r.launches == 12 and r.matmul_flops == 2 * (989e9 + 67e9)
    assert [k.kernel.name for k in r.top(1)] == ["copy"] and r.top(1)[0].bound == "memory"
    assert label(program.kernels[0]) == "gemm: dot"
    with pytest.raises(ValueError, match="chip"):
        roofline(program, hardware.chip("v5e"))


def test_chip_table_feeds_mfu():
    assert hardware.chip_for_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert hardware.chip_for_kind("NVIDIA H100 PCIe").name == "h100-pcie"
    assert hardware.chip_for_kind("NVIDIA H200").name == "h200"
    assert hardware.chip_for_kind("NVIDIA A100-SXM4-80GB").name == "a100"
    assert hardware.chip_for_kind("TPU v5 lite").name == "v5e"
    assert hardware.chip_for_kind("TPU v6 lite").name == "v6e"
    assert hardware.chip_for_kind("cpu") is None
    for name in hardware.TARGETS:
        c = hardware.chip(name)
        assert set(c.peaks) == set(hardware.GPU_CLASSES if c.platform == "gpu" else hardware.TPU_CLASSES)
        assert hardware.chip_for_kind(c.device_kind) is c
    assert device_peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert dict(PEAK_TFLOPS)["v6e"] == {"bfloat16": 918.0, "float32": 918.0}
    with pytest.raises(ValueError, match="target"):
        hardware.chip("b200")


def test_escaped_backend_config_strings_decode():
    attrs = r'backend_config={kernel_hash = "\1A\22", module = "ML\EFR\\x\22y"}'
    assert decode_attribute(attrs, "module") == b"ML\xefR\\x\"y"
    assert decode_attribute(attrs, "ir") is None


# -- FLOPs inside the Pallas kernels, against the chunkwise algorithm's matmuls ------------------

B, T, H, K, V, C = 2, 256, 2, 64, 128, 64
N = T // C  # chunks per sequence


def test_triton_kernel_flops_are_the_algorithms():
    """``delta_rule_states``: per chunk and head ``W S`` and ``K̃ᵀ V'`` (2 · 2CKV);
    ``delta_rule_output``: ``Q K̃ᵀ`` (2C²K), ``Q S`` (2CKV), ``P V'`` (2C²V); bf16 operands."""
    x = lambda *s: S(s, jnp.bfloat16)  # noqa: E731
    lowered = lower_for_gpu(lambda q, k, v, b: ops.delta_rule(q, k, v, b, impl="pallas")[0],
                            x(B, T, H, K), x(B, T, H, K), x(B, T, H, V), x(B, T, H), family="triton")
    calls = {c.name: c for c in triton_calls(lowered)}
    units = B * H * N
    expected = {"delta_rule_states": 4 * C * K * V, "delta_rule_output": 2 * C * C * K + 2 * C * K * V + 2 * C * C * V}
    for name, per_chunk in expected.items():
        flops, approximate = triton_flops(calls[name].ir, math.prod(calls[name].grid))
        assert flops == {"bf16": units * per_chunk} and not approximate, name


def test_mosaic_kernel_flops_are_the_algorithms():
    """The Mosaic state passes, per chunk and head: forward ``Wn S``, ``Qs S``, ``KTᵀ V'`` (3 · 2CKV)
    and ``P V'`` (2C²V); backward ``KT dS``, ``Qsᵀ dO``, ``Wnᵀ dV'`` (3 · 2CKV). Counted from the
    wgmma instructions of the serialized modules, one issuing warpgroup each."""
    from osdn_jax.kernels.mosaic import state_pass

    b = lambda *s: S(s, jnp.bfloat16)  # noqa: E731
    f = lambda *s: S(s, jnp.float32)  # noqa: E731
    Tp, Kp = N * C, 128
    fwd = lambda *a: state_pass.states_forward(*a, out_dtype=jnp.bfloat16)  # noqa: E731
    modules = []
    with jax.sharding.use_abstract_mesh(abstract_gpu_mesh()):
        for fn, args in ((fwd, (b(B, H, Tp, Kp), b(B, H, Tp, Kp), b(B, H, Tp, Kp), b(B, H, Tp, C), f(B, H, Tp, V),
                                f(B, H, 4), f(B, H, Kp, V))),
                         (state_pass.states_backward, (b(B, H, Tp, Kp), b(B, H, Tp, Kp), b(B, H, Tp, Kp),
                                                       b(B, H, Tp, V), f(B, H, Tp, V), f(B, H, 4), f(B, H, Kp, V)))):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
            modules += [c for c in mosaic_calls(lowered)]
    units = B * H * N
    expected = {"osdn_mosaic_states_fwd": 6 * C * Kp * V + 2 * C * C * V, "osdn_mosaic_states_bwd": 6 * C * Kp * V}
    assert {m.name for m in modules} == set(expected)
    for m in modules:
        flops, approximate = mosaic_flops(m.module)
        assert flops == {"bf16": units * expected[m.name]} and not approximate, m.name


def test_analyze_reads_a_compiled_cpu_program():
    """The whole path on a program this machine compiles: nothing uncounted, a positive time."""
    compiled = _compiled(lambda q, k, v, b: ops.delta_rule(q, k, v, b, impl="chunked")[0],
                         *(S((1, 128, 2, 32), jnp.float32),) * 3, S((1, 128, 2), jnp.float32))
    r = analyze(compiled.as_text(), hardware.chip("h100"))
    assert r.seconds > 0 and r.matmul_flops > 0 and r.launches > 1 and not r.uncounted()


def test_loops_without_a_known_trip_count_branches_and_collectives():
    """As a TPU prints them: a loop with no ``known_trip_count`` (``i`` from 2 while ``i < 11``, step
    3: three trips), a conditional (the heavier branch counts) and an all-gather over 4 devices
    (a ring sends 3/4 of the result)."""
    text = """HloModule m

%cond (t: (s32[], f32[64])) -> pred[] {
  %t = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(11)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%double (p: f32[64]) -> f32[64] {
  %p = f32[64]{0} parameter(0)
  ROOT %m = f32[64]{0} add(%p, %p)
}

%body (t: (s32[], f32[64])) -> (s32[], f32[64]) {
  %t = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[64]{0} get-tuple-element(%t), index=1
  %three = s32[] constant(3)
  %next = s32[] add(%i, %three)
  %y = f32[64]{0} fusion(%x), kind=kLoop, calls=%double
  ROOT %out = (s32[], f32[64]{0}) tuple(%next, %y)
}

%small (a: f32[64]) -> f32[64] {
  %a = f32[64]{0} parameter(0)
  ROOT %c = f32[64]{0} copy(%a)
}

%large (a: f32[64]) -> f32[64] {
  %a = f32[64]{0} parameter(0)
  %g = f32[256]{0} all-gather(%a), replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %s = f32[64]{0} slice(%g), slice={[0:64]}
}

ENTRY %main (x: f32[64], k: s32[]) -> f32[64] {
  %x = f32[64]{0} parameter(0)
  %k = s32[] parameter(1)
  %two = s32[] constant(2)
  %init = (s32[], f32[64]{0}) tuple(%two, %x)
  %loop = (s32[], f32[64]{0}) while(%init), condition=%cond, body=%body
  %y = f32[64]{0} get-tuple-element(%loop), index=1
  ROOT %z = f32[64]{0} conditional(%k, %y, %y), branch_computations={%small, %large}
}
"""
    program = Program(text, "tpu")
    by_kind = {k.kind: k for k in program.kernels}
    assert by_kind["kLoop"].count == 3 and by_kind["kLoop"].flops == {"vector": 64}
    assert set(by_kind) == {"kLoop", "all-gather", "slice"}  # the large branch, not the copy
    assert by_kind["all-gather"].comm_bytes == 256 * 4 * 3 / 4
    assert any("conditional" in n for n in program.notes) and not any("trip count" in n for n in program.notes)
    r = roofline(program, hardware.chip("v5e"))
    assert r.comm_seconds == pytest.approx(768 / 200e9)


def test_loops_whose_trip_count_depends_on_the_data_are_marked():
    """A ``while_loop`` bounded by an input: its body counts one trip and is marked dynamic (the
    roofline's ``dynamic_launches``); a scan's body is not."""
    from osdn_jax.hardware import chip
    from osdn_jax.perf.roofline import roofline

    def f(x, n):
        y = jax.lax.scan(lambda c, _: (jnp.tanh(c * 1.5 + 1.0), None), x, None, length=5)[0]
        return jax.lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, jnp.sin(s[1]) * 2.0), (0, y))[1]

    program = Program(_compiled(f, S((64, 64), jnp.float32), S((), jnp.int32)).as_text(), "gpu")
    assert any(k.dynamic for k in program.kernels) and any(k.count == 5 and not k.dynamic for k in program.kernels)
    assert any("without a known trip count" in n for n in program.notes)
    r = roofline(program, chip("h100"))
    assert 0 < r.dynamic_launches < r.launches
    assert r.dynamic_launches == sum(k.count for k in program.kernels if k.dynamic)
    # every launch of these tiny kernels takes the GPU launch latency (2 µs), which the plain roofline leaves out
    assert r.seconds < r.launches * hardware.GPU_LAUNCH_S == pytest.approx(r.seconds_with_launches)
