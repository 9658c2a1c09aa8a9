"""Evaluate and sample a training run from its directory (config, tokenizer and checkpoint are
all recorded there), on the local devices.

    python -m osdn_jax.train.evaluate RUN_DIR [--step N] [--prompt TEXT] [--tokens 200]
        [--temperature 0.8] [--top-k 40] [--eval-batches 8]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from osdn_jax.generate import generate
from osdn_jax.model import CausalLM
from osdn_jax.train import data as data_lib
from osdn_jax.train.config import TrainConfig, from_dict
from osdn_jax.train.step import make_eval_step, mean_loss
from osdn_jax.train.tokenizer import Tokenizer, load_tokenizer


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[CausalLM, Tokenizer, TrainConfig, int]:
    """``(model, tokenizer, config, step)`` of a run: the newest checkpoint unless ``step`` is given."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"run_dir: {run_dir} holds no config.json (not a training run directory)")
    cfg = from_dict(json.loads((run_dir / "config.json").read_text())["train"])
    tokenizer = load_tokenizer(run_dir)
    model_cfg = cfg.model.build(tokenizer.vocab_size, cfg.data.seq_len)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract))
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    steps = manager.all_steps()
    if not steps:
        raise ValueError(f"run_dir: {run_dir}/checkpoints holds no checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ValueError(f"step: no checkpoint for step {step} in {run_dir}; saved steps are {sorted(steps)}")
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    manager.close()
    return nnx.merge(graphdef, params), tokenizer, cfg, step


def held_out_loss(model: CausalLM, cfg: TrainConfig, tokenizer: Tokenizer, num_batches: int) -> float:
    """Mean next-token loss (nats) over ``num_batches`` held-out batches of the run's data."""
    graphdef, params = nnx.split(model, nnx.Param)
    batches = data_lib.make_eval_batches(cfg.data, tokenizer, num_batches)
    return mean_loss(jax.jit(make_eval_step(graphdef)), nnx.to_pure_dict(params), batches)[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--prompt", default=None, help="default: the run's sample_prompt")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=8, help="0: no evaluation")
    args = p.parse_args(argv)
    model, tokenizer, cfg, step = load_run(args.run_dir, args.step)
    print(f"{args.run_dir}: step {step}, {model.config.mixer_name} model, tokenizer {tokenizer.kind}")
    if args.eval_batches:
        loss = held_out_loss(model, cfg, tokenizer, args.eval_batches)
        print(f"held-out loss {loss:.4f}, perplexity {math.exp(min(loss, 50.0)):.2f}")
    if args.tokens:
        prompt = cfg.sample_prompt if args.prompt is None else args.prompt
        ids = [int(t) for t in tokenizer.encode(prompt)] or [tokenizer.eos_id]
        out = generate(model, [ids], args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                       stop_token=tokenizer.eos_id)
        print(prompt + tokenizer.decode(out.as_lists()[0]))


if __name__ == "__main__":
    main()
