"""Roofline of the Pallas kernels: matmul FLOPs and HBM bytes per kernel, and the time they imply
at H200 peak, at the GPU-suite shapes. A GPU run of ``benchmarks/gpu_suite.py`` has a target to
compare with; nothing here runs a kernel.

    python benchmarks/roofline.py                 # bf16, the GPU-suite shapes
    python benchmarks/roofline.py --dtype fp32    # TF32 operands (fp32 inputs)

Counts follow the kernels in ``kernels/delta_rule.py`` (per chunk of C tokens and head, times
B·H·T/C): a dot ``[m, k] @ [k, n]`` is ``2mkn`` FLOPs; bytes are the loads and stores each kernel
issues to HBM (operands in the input dtype ``e`` bytes, fp32 buffers 4 bytes), each counted once
(re-reads of a tile inside one program are assumed to hit L2). The triangular solve's 16×16
forward substitution is elementwise and left out (~1% of ``intra``). Time at peak is
``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)``; the serial kernels (``states``,
``states_bwd``) are latency-bound chains of T/C small steps, so their real time is well above it.
"""

from __future__ import annotations

import argparse

# H200 SXM: dense tensor-core peaks and HBM3e bandwidth (NVIDIA's data sheet).
PEAK_FLOPS = {"bf16": 989e12, "fp32": 494e12}  # fp32 inputs run as TF32
HBM_BYTES_PER_S = 4.8e12
SHAPES = [(8, 2048, 16, 128), (4, 4096, 16, 128), (2, 8192, 16, 128), (8, 4096, 8, 64)]


def kernel_costs(K: int, V: int, C: int, e: int, osdn: bool) -> dict[str, tuple[float, float]]:
    """``{kernel: (FLOPs, bytes)}`` per chunk and head. ``osdn``: the write key is ``d ⊙ k`` with
    ``d`` read in fp32 (else ``k̃ = k``, read once)."""
    f = 4
    kw_bytes = f * C * K if osdn else 0  # d, read next to k wherever k̃ is needed (DeltaNet: k̃ = k)
    mm = lambda m, k, n: 2.0 * m * k * n  # noqa: E731
    merge = sum(mm(16, 16, 16) * (2 + (m - n - 1) + 1) for m in range(C // 16) for n in range(m))
    return {
        "delta_rule_intra": (mm(C, K, C) + mm(C, C, K) + mm(C, C, V) + merge,
                             e * C * K + kw_bytes + e * C * V + f * C * C + e * C * K + f * C * V + e * C * K),
        "delta_rule_states": (2 * mm(C, K, V), e * C * K * 2 + f * C * V + e * K * V + e * C * V),
        "delta_rule_output": (mm(C, K, C) + mm(C, K, V) + mm(C, C, V),
                              2 * e * C * K + kw_bytes + e * K * V + 2 * e * C * V),
        "delta_rule_bwd_local": (2 * mm(C, C, K) + mm(C, C, V),
                                 f * C * C + 2 * e * C * K + kw_bytes + e * C * V + 3 * e * C * K + f * C * V),
        "delta_rule_states_bwd": (3 * mm(C, K, V), 3 * e * C * K + f * C * V + e * C * V + e * K * V + e * C * V),
        "delta_rule_grads_wy": (2 * mm(C, C, V) + mm(C, V, K) + 2 * mm(C, C, K),
                                f * C * C + 2 * e * C * V + e * K * V + e * C * K + e * C * V + f * C * C),
        "delta_rule_grads_a": (2 * mm(C, C, C) + mm(C, K, C), 2 * f * C * C + e * C * K + kw_bytes + f * C * C),
        "delta_rule_grads_k": (mm(C, V, C) + 2 * mm(C, V, K) + 4 * mm(C, C, K),
                               2 * e * C * K + kw_bytes + 2 * f * C * C + 3 * e * C * V + 2 * e * K * V
                               + e * C * K + (f * C * K if osdn else e * C * K)),
        "delta_rule_grads_q": (mm(C, V, C) + mm(C, V, K) + mm(C, C, K),
                               2 * e * C * K + kw_bytes + 2 * e * C * V + e * K * V + e * C * K),
        # phase 1 (OSDN only): elementwise, per token: read k, write d (fp32); backward reads k, d, dd
        "osdn_preconditioner_fwd": (0.0, C * (e * K + f * K)) if osdn else (0.0, 0.0),
        "osdn_preconditioner_bwd": (0.0, C * (e * K + 2 * f * K + e * K)) if osdn else (0.0, 0.0),
    }


FORWARD = ("osdn_preconditioner_fwd", "delta_rule_intra", "delta_rule_states", "delta_rule_output")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()
    e = 2 if args.dtype == "bf16" else 4
    peak = PEAK_FLOPS[args.dtype]
    print(f"H200 peak: {peak / 1e12:.0f} TFLOP/s ({'bf16' if e == 2 else 'TF32'} dense), "
          f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s HBM; chunk {args.chunk}")
    for op in ("deltanet", "osdn"):
        for B, T, H, K in SHAPES:
            V, C = K, args.chunk
            units = B * H * T / C
            print(f"\n{op}, B={B} T={T} H={H} K=V={K}, {args.dtype}")
            print("| kernel | GFLOP | MB moved | FLOP/byte | µs at peak | bound |")
            print("|---|---|---|---|---|---|")
            total = {"fwd": 0.0, "fwd+bwd": 0.0}
            for name, (fl, by) in kernel_costs(K, V, C, e, op == "osdn").items():
                if fl == 0 and by == 0:
                    continue
                fl, by = fl * units, by * units
                t = max(fl / peak, by / HBM_BYTES_PER_S)
                total["fwd+bwd"] += t
                if name in FORWARD:
                    total["fwd"] += t
                bound = "compute" if fl / peak > by / HBM_BYTES_PER_S else "memory"
                print(f"| {name} | {fl / 1e9:.1f} | {by / 1e6:.1f} | {fl / by:.0f} | {t * 1e6:.1f} | {bound} |")
            print(f"| **total** | | | | fwd {total['fwd'] * 1e6:.0f} µs, fwd+bwd {total['fwd+bwd'] * 1e6:.0f} µs | |")


if __name__ == "__main__":
    main()
