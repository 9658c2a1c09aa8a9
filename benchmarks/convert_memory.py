"""Host memory of loading an fla checkpoint with ``osdn_jax.convert.load_fla``.

Writes a randomly initialised model of ``--preset`` as an fla checkpoint (one file, and shards of
``--shard``), then loads each in a fresh process and prints its peak resident memory above the
process's baseline (jax imported, nothing loaded), and its peak anonymous memory (RssAnon: the
copies, without the page cache of the memory-mapped file), next to the size of the weights:

    python benchmarks/convert_memory.py --preset deltanet-340m --shard 200MB

``load_fla`` reads one tensor at a time from the memory-mapped files, so the peak should be the
model's parameters plus at most one file's mapped pages (and one tensor being converted), never
the whole checkpoint twice over.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
import jax
jax.numpy.zeros(1).block_until_ready()
def status_mb(field):  # VmHWM, unlike ru_maxrss, does not inherit the parent's peak across fork + exec
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
import threading, time
anon_peak, stop = [0.0], []
def sample():  # anonymous (private) memory, sampled: mapped file pages are page cache, not copies
    while not stop:
        anon_peak[0] = max(anon_peak[0], status_mb('RssAnon'))
        time.sleep(0.002)
base, base_anon = status_mb('VmRSS'), status_mb('RssAnon')
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
from osdn_jax.convert import load_fla
model, cfg = load_fla(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(model))
stop.append(1)
sampler.join()
print(json.dumps({"base_mb": base, "peak_mb": status_mb('VmHWM'), "after_mb": status_mb('VmRSS'),
                  "anon_peak_mb": anon_peak[0] - base_anon}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deltanet-340m")
    p.add_argument("--shard", default="200MB")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    args = p.parse_args()

    from flax import nnx

    from osdn_jax.convert import save_fla
    from osdn_jax.model import CausalLM, count_params, model_config

    cfg = model_config(args.preset, compute_dtype="float32")
    n = count_params(cfg)
    root = Path(args.dir or tempfile.mkdtemp(prefix="convert-memory-"))
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    save_fla(model, root / "single")
    save_fla(model, root / "sharded", max_shard_size=args.shard)
    del model
    weights_mb = 4 * n / 2**20
    rows = []
    for name in ("single", "sharded"):
        files = sorted((root / name).glob("*.safetensors"))
        biggest = max(f.stat().st_size for f in files) / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD, str(root / name)], capture_output=True, text=True,
                             check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, len(files), biggest, m["peak_mb"] - m["base_mb"], m["anon_peak_mb"],
                     m["after_mb"] - m["base_mb"]))
    print(f"{args.preset}: {n / 1e6:.0f}M parameters, {weights_mb:.0f} MiB of fp32 weights")
    print("| checkpoint | files | largest file (MiB) | peak RSS (MiB) | peak anonymous (MiB) | after load (MiB) | "
          "peak RSS / weights | peak anonymous / weights |")
    print("|---|---|---|---|---|---|---|---|")
    for name, count, biggest, peak, anon, after in rows:
        print(f"| {name} | {count} | {biggest:.0f} | {peak:.0f} | {anon:.0f} | {after:.0f} | {peak / weights_mb:.2f} | "
              f"{anon / weights_mb:.2f} |")
    print("(all above the process's baseline; RSS counts the mapped pages of the open file, which are page cache)")


if __name__ == "__main__":
    main()
