#!/usr/bin/env bash
# GPU suite for the Pallas kernels (about 10 minutes on one H200), run from the tree as is:
#   1. the kernel tests, natively on the GPU (interpret mode is chosen only on CPU backends):
#      Triton: bf16, fp16 and TF32 on tensor cores, IEEE fp32 at the fp32 tolerance; Mosaic GPU
#      (Hopper only): bf16 / fp16, the sequence split;
#   2. the timing / predicted time / TFLOP/s / memory table of benchmarks/gpu_suite.py, bf16 and fp32 rows;
#      then its context-parallel training step over every local GPU against one (skipped on one GPU);
#   3. training-step tokens/s, MFU and predicted step time of osdn-340m and deltanet-340m at T=4096 (bf16),
#      capped at 4 min. The predictions (osdn_jax.perf) stand beside the measurements to calibrate them.
# Peer wheels (fla-core, jax-linear-attention) may be carried in .whl/ (see docs/kernels.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e .
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
python3 -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_preconditioner.py \
  tests/test_chunked_vs_reference.py -k "pallas or kernels or matches_scan or bf16_keys"
if python3 -c "import jax, sys; sys.exit(float(jax.devices()[0].compute_capability) < 9)"; then
  python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_mosaic.py
fi
python3 benchmarks/gpu_suite.py "$@"
timeout 240 python3 benchmarks/train_throughput.py --presets osdn-340m deltanet-340m --seq-len 4096 --batch 4 \
  --compute-dtype bfloat16 --repeats 10 || echo "train_throughput: failed or timed out (rc=$?)"
