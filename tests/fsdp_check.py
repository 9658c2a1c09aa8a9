"""Run as a script by tests/test_scale.py (8 CPU devices must be set before JAX starts): compiles
the trainer's step on a ``(data=1, fsdp=8, context=1)`` mesh and prints, as JSON, the collectives
that move whole-batch activations (a leading ``[B, T]`` of the global batch) and XLA's temporary
bytes. ``plain`` as the first argument turns ``osdn_jax.activations.constrain_rows`` off."""

import json
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from osdn_jax import loss, model  # noqa: E402
from osdn_jax.model import model_config  # noqa: E402
from osdn_jax.train.step import abstract_train_step  # noqa: E402

if sys.argv[1:] == ["plain"]:
    model.constrain_rows = loss.constrain_rows = lambda x: x
B, T = 16, 1024
mesh = Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "context"), axis_types=(AxisType.Auto,) * 3)
cfg = model_config("tiny", hidden_size=256, num_heads=2, vocab_size=512, max_seq_len=T, remat=True, scan_layers=True)
fn, args, (p, o, b) = abstract_train_step(cfg, B, T, mesh=mesh)
with jax.set_mesh(mesh):
    compiled = jax.jit(fn, donate_argnums=(0, 1), in_shardings=(p, o, b), out_shardings=(p, o, None)).lower(
        *args).compile()
whole = [line.split("=", 1)[1].strip()[:80] for line in compiled.as_text().splitlines()
         if re.search(r"(all-reduce|all-gather|reduce-scatter|all-to-all)(-start)?\(", line)
         and re.search(rf"\[{B},{T}\b", line.split("(", 1)[0] + line.split("=", 1)[1][:120])]
print(json.dumps({"whole_batch_collectives": whole, "temp": compiled.memory_analysis().temp_size_in_bytes}))
