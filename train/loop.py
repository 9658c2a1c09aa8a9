"""The training run: setup, the step loop, evaluation, checkpoints, the sample and the summary."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from osdn_jax.generate import generate
from osdn_jax.model import CausalLM
from osdn_jax.train import data as data_lib
from osdn_jax.train.checkpoint import Checkpointer, restore_params
from osdn_jax.train.config import TrainConfig, to_dict
from osdn_jax.train.metrics import MetricsWriter, plot
from osdn_jax.train.optim import learning_rate, make_optimizer
from osdn_jax.train.sharding import batch_sharding, check_batch, global_batch, make_mesh, param_shardings
from osdn_jax.train.step import make_eval_step, make_train_step, mean_loss


class StopTraining(RuntimeError):
    """Too many consecutive non-finite steps; the last good state was checkpointed."""


def setup_jax(cfg: TrainConfig) -> None:
    """Fake CPU devices and the multi-process runtime; must run before JAX touches a device."""
    if cfg.mesh.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cfg.mesh.cpu_devices)
    if cfg.dist.enabled:
        jax.config.update("jax_cpu_collectives_implementation", cfg.dist.cpu_collectives)
        jax.distributed.initialize(coordinator_address=cfg.dist.coordinator, num_processes=cfg.dist.num_processes,
                                   process_id=cfg.dist.process_id)


def _check_paths(cfg: TrainConfig) -> None:
    if cfg.data.source != "embedded" and not Path(cfg.data.path).exists():
        raise ValueError(f"data.path: no such file or directory {cfg.data.path!r}")
    if cfg.data.tokenizer_path is not None and not Path(cfg.data.tokenizer_path).exists():
        raise ValueError(f"data.tokenizer_path: no such file or directory {cfg.data.tokenizer_path!r}")


class _Data:
    """This process's rows of the global batches, for either ``data_split``."""

    def __init__(self, cfg: TrainConfig, tokenizer):
        pi, pc = jax.process_index(), jax.process_count()
        B = cfg.data.batch_size
        if B % pc:
            raise ValueError(f"data.batch_size: expected a multiple of the process count {pc}, got {B}")
        self.rows = slice(pi * (B // pc), (pi + 1) * (B // pc))
        self.per_process = cfg.data_split == "documents"
        if self.per_process:
            local = dataclasses.replace(cfg.data, batch_size=B // pc)
            self.iterator = data_lib.make_train_iterator(local, tokenizer, pi, pc)
            self.eval = data_lib.make_eval_batches(local, tokenizer, cfg.eval_batches, pi, pc)
        else:
            self.iterator = data_lib.make_train_iterator(cfg.data, tokenizer, 0, 1)
            self.eval = [self._mine(b) for b in data_lib.make_eval_batches(cfg.data, tokenizer, cfg.eval_batches)]

    def _mine(self, batch):
        return batch if self.per_process else {k: v[self.rows] for k, v in batch.items()}

    def next(self) -> dict[str, np.ndarray]:
        return self._mine(next(self.iterator))


def _check_context(cfg: TrainConfig, model_cfg) -> None:
    """Each ``context`` device's positions cover the halo of a short convolution of ``conv_size``
    taps (``conv_size - 1`` positions of the previous device; the config checks 4 taps)."""
    mixer, T = model_cfg.mixer, cfg.data.seq_len
    halo = mixer.conv_size - 1 if getattr(mixer, "short_conv", False) else 0
    if cfg.mesh.context > 1 and T // cfg.mesh.context < halo:
        raise ValueError(f"mesh.context: expected at most data.seq_len / {halo} = {T // halo} (the short "
                         f"convolution of {mixer.conv_size} taps reads {halo} positions of the previous device), "
                         f"got {cfg.mesh.context}")


def _sample(cfg: TrainConfig, graphdef, params, tokenizer) -> str:
    """A short continuation of ``sample_prompt``, on one device of every process and outside the
    training mesh (like ``python -m osdn_jax.train.evaluate``): the decode steps feed one token per
    row, which a ``context`` axis cannot split."""
    if jax.process_count() > 1:  # host copies of the global arrays
        params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    params = jax.device_put(params, jax.local_devices()[0])
    model = nnx.merge(graphdef, params)
    prompt = [int(t) for t in tokenizer.encode(cfg.sample_prompt)] or [tokenizer.eos_id]
    out = generate(model, [prompt], cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed,
                   stop_token=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    return cfg.sample_prompt + tokenizer.decode(out.as_lists()[0])


def train(cfg: TrainConfig) -> dict:
    """Runs ``cfg`` to ``cfg.steps`` (resuming from the newest checkpoint); returns the summary."""
    _check_paths(cfg)
    setup_jax(cfg)
    t_start = time.perf_counter()
    is_main = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    say = print if is_main else (lambda *a, **k: None)

    # Tokenizer: process 0 builds (a BPE is trained) and records it in the run; the others load it.
    if is_main:
        tokenizer = data_lib.build_tokenizer(cfg.data, run_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("osdn_jax.train: tokenizer")
    if not is_main:
        tokenizer = data_lib.build_tokenizer(cfg.data, run_dir)
    model_cfg = cfg.model.build(tokenizer.vocab_size, cfg.data.seq_len, run_dir)
    if is_main:
        (run_dir / "config.json").write_text(json.dumps({"train": to_dict(cfg), "model": model_cfg.to_dict()},
                                                        indent=2))

    mesh = make_mesh(cfg.mesh)
    check_batch(cfg.data.batch_size, mesh)
    _check_context(cfg, model_cfg)
    make_model = lambda: CausalLM(model_cfg, rngs=nnx.Rngs(cfg.seed))  # noqa: E731
    graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
    shardings = param_shardings(abstract_params, mesh)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make_model(), nnx.Param)), out_shardings=shardings)()
    tx = make_optimizer(cfg.optim, cfg.steps)
    opt_state = jax.jit(tx.init)(params)  # moments follow the parameters' shardings
    opt_shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else NamedSharding(mesh, PartitionSpec()),
        opt_state)
    opt_state = jax.device_put(opt_state, opt_shardings)
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))

    data = _Data(cfg, tokenizer)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, per_process_data=data.per_process)
    step, tokens_seen, skipped, elapsed_before = 0, 0, 0, 0.0
    latest = ckpt.latest_step() if cfg.checkpoint.resume else None
    if latest is not None:
        params, opt_state, meta = ckpt.restore(latest, params, opt_state, data.iterator)
        step, tokens_seen, skipped = meta["step"], meta["tokens_seen"], meta["skipped_steps"]
        elapsed_before = meta["elapsed_s"]
        say(f"resumed from {ckpt.directory}/{latest} (step {step})")
    elif cfg.model.init_from is not None:
        init = cfg.model.resolve(cfg.model.init_from, run_dir)
        params = restore_params(init, params)
        say(f"parameters from {init} (step 0, a fresh optimizer)")
    model_name = cfg.model.config_path or cfg.model.preset
    say(f"{model_cfg.mixer_name} model '{model_name}': {n_params / 1e6:.2f}M parameters; "
        f"{jax.device_count()} device(s) {dict(mesh.shape)}, {jax.process_count()} process(es); "
        f"batch {cfg.data.batch_size}x{cfg.data.seq_len}; tokenizer {tokenizer.to_dict().get('kind', '?')} "
        f"(vocab {tokenizer.vocab_size})")

    def under_mesh(fn):
        """Trace and run ``fn`` with the mesh in context, so the Pallas kernels split over it
        (``osdn_jax.kernels.partition``) instead of gathering the batch on every device, and the
        delta-rule ops find the ``context`` axis (time split over its devices)."""

        def run(*args):
            with jax.set_mesh(mesh):
                return fn(*args)

        return run

    train_step = under_mesh(jax.jit(make_train_step(graphdef, tx, cfg.optim.grad_accum), donate_argnums=(0, 1),
                                    in_shardings=(shardings, opt_shardings, batch_sharding(mesh)),
                                    out_shardings=(shardings, opt_shardings, None)))
    eval_step = under_mesh(jax.jit(make_eval_step(graphdef), in_shardings=(shardings, batch_sharding(mesh))))
    lr_at = learning_rate(cfg.optim, cfg.steps)
    metrics = MetricsWriter(run_dir, enabled=is_main)

    def evaluate(at_step: int) -> float:
        loss, count = mean_loss(eval_step, params, (global_batch(b, mesh) for b in data.eval))
        metrics.write({"kind": "eval", "step": at_step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                       "eval_targets": count})
        return loss

    def save(at_step: int) -> None:
        ckpt.save(at_step, params, opt_state, data.iterator,
                  {"step": at_step, "tokens_seen": tokens_seen, "skipped_steps": skipped,
                   "elapsed_s": elapsed_before + time.perf_counter() - t_start, "config": to_dict(cfg)})

    stop_signal: list[bool] = []  # SIGTERM: save a checkpoint at the end of the step, then exit
    try:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_signal.append(True))
    except ValueError:  # not the main thread: no handler
        previous_handler = None

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (is_main and cfg.log.progress), unit="step",
               dynamic_ncols=True)
    window, bad_in_a_row, last_loss, t_window, eval_loss = [], 0, float("nan"), time.perf_counter(), None
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    first_step = step
    pending = []  # (step, metrics) of dispatched steps whose results the host has not read yet

    def absorb() -> None:
        """Reads the pending steps' metrics. The loop reads each step one step late, so preparing
        the next batch on the host overlaps the device's work instead of waiting for it."""
        nonlocal bad_in_a_row, last_loss, skipped
        while pending:
            at, m = pending.pop(0)
            ok, loss = bool(m["ok"]), float(m["loss"])
            if ok:
                bad_in_a_row, last_loss = 0, loss
                window.append((loss, float(m["grad_norm"])))
                continue
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            say(f"step {at}: non-finite loss/gradient (loss {loss}); step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= cfg.max_bad_steps:
                save(step)  # skipped steps leave the state as it was: this is the last good state
                ckpt.wait()
                raise StopTraining(f"{bad_in_a_row} non-finite steps in a row (max_bad_steps={cfg.max_bad_steps}); "
                                   f"the last good state is saved in {ckpt.directory}/{step}. Lower optim.lr or "
                                   f"check the data.")

    try:
        while step < cfg.steps:
            batch = global_batch(data.next(), mesh)
            params, opt_state, m = train_step(params, opt_state, batch)
            step += 1
            tokens_seen += tokens_per_step
            bar.update(1)
            absorb()  # the previous step's metrics: by now the device is busy with this one
            pending.append((step, m))
            log_now = step % cfg.log.every == 0 or step == cfg.steps
            eval_now = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.steps
            save_now = bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0 and step < cfg.steps
            if log_now or eval_now or save_now or stop_signal or step - first_step == cfg.run_steps:
                # (these need the counters up to date)
                absorb()
            if log_now:
                now = time.perf_counter()
                tok_s = len(window or [0]) * tokens_per_step / max(now - t_window, 1e-9)
                if window:
                    window_loss = sum(x for x, _ in window) / len(window)
                    metrics.write({"kind": "train", "step": step, "loss": window_loss,
                                   "grad_norm": sum(g for _, g in window) / len(window), "lr": float(lr_at(step - 1)),
                                   "tokens": tokens_seen, "tokens_per_s": tok_s, "skipped_steps": skipped,
                                   "elapsed_s": elapsed_before + now - t_start})
                    bar.set_postfix(loss=f"{window_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                window, t_window = [], now
                if jax.process_count() > 1:
                    stop_signal[:] = [True] if bool(np.any(multihost_utils.process_allgather(
                        np.array(bool(stop_signal))))) else []
            if eval_now:
                eval_loss = evaluate(step)
                if is_main:
                    line = f"step {step}: held-out loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}"
                    (bar.write if cfg.log.progress else print)(line)
            # several processes act on SIGTERM only where they have just agreed on it (log steps)
            sigterm = bool(stop_signal) and (jax.process_count() == 1 or log_now)
            reason = "SIGTERM" if sigterm else "run_steps" if step - first_step == cfg.run_steps else None
            if reason and step < cfg.steps:
                save(step)
                ckpt.wait()
                say(f"{reason}: saved step {step} to {ckpt.directory}; run again to continue")
                return {"steps": step, "stopped": reason, "checkpoint": f"{ckpt.directory}/{step}"}
            if save_now:
                save(step)
        absorb()
        bar.close()
        eval_loss = evaluate(step)
        save(step)
        ckpt.wait()
    finally:
        bar.close()
        ckpt.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    wall = elapsed_before + time.perf_counter() - t_start
    summary = {"steps": step, "tokens": tokens_seen, "wall_s": wall, "final_train_loss": last_loss,
               "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "skipped_steps": skipped,
               "parameters": n_params, "checkpoint": f"{ckpt.directory}/{step}", "run_dir": str(run_dir)}
    if is_main and cfg.log.plot:
        summary["plot"] = str(plot(run_dir))
    if cfg.sample_tokens:
        summary["sample"] = _sample(cfg, graphdef, params, tokenizer)
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        say("\n".join([
            "", "summary",
            f"  steps            {step} ({skipped} skipped)",
            f"  tokens           {tokens_seen:,}",
            f"  wall time        {wall:.1f} s",
            f"  final train loss {last_loss:.4f}",
            f"  held-out         loss {eval_loss:.4f}, perplexity {summary['eval_ppl']:.2f}",
            f"  checkpoint       {summary['checkpoint']}",
            f"  metrics          {run_dir / 'metrics.jsonl'}" + (f", plot {summary['plot']}" if "plot" in summary else ""),
        ]))
        if "sample" in summary:
            say(f"\nsample:\n{summary['sample']}")
    return summary
