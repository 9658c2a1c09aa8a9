"""The training run: setup, the step loop, evaluation, checkpoints, the sample and the summary."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from osdn_jax.generate import generate
from osdn_jax.model import CausalLM
from osdn_jax.train import data as data_lib, run_dir as run_dir_lib
from osdn_jax.train.checkpoint import Checkpointer, restore_params
from osdn_jax.train.config import TrainConfig, to_dict
from osdn_jax.train.metrics import MetricsWriter, keep_rows_until, plot
from osdn_jax.train.optim import learning_rate, make_optimizer
from osdn_jax.train.sharding import batch_sharding, check_batch, global_batch, make_mesh, param_shardings
from osdn_jax.train.step import make_eval_step, make_train_step, mean_loss
from osdn_jax.train.tokenizer import TOKENIZER_FILE, tokenizer_from_dict


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
    """This process's rows of the global batches, for either ``data_split`` (``data.make_process_data``)."""

    def __init__(self, cfg: TrainConfig, tokenizer):
        self.iterator, self.eval = data_lib.make_process_data(cfg.data, tokenizer, cfg.data_split, cfg.eval_batches,
                                                              jax.process_index(), jax.process_count())

    def next(self) -> dict[str, np.ndarray]:
        return next(self.iterator)


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


def _all_processes(ok: bool) -> bool:
    """True where every process says ``ok`` (on one process: ``ok``)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _check_run_dir(cfg: TrainConfig, run: run_dir_lib.RunDir, ckpt: Checkpointer) -> bool:
    """Refuses a resume whose settings differ from the run's in ``run_dir.KEPT_FIELDS`` (the
    checkpoints' own record, else config.json), or, before the first checkpoint, from the run's
    tokenizer.json in ``TOKENIZER_FIELDS``. Returns whether the run's tokenizer.json is used."""
    new = to_dict(cfg)
    if not cfg.checkpoint.resume:  # starting over: the tokenizer stays if it is the one asked for
        return (run.has_tokenizer and run.saved_train is not None
                and not run_dir_lib.differences(run.saved_train, new, run_dir_lib.TOKENIZER_FIELDS))
    steps = ckpt.steps()
    if steps:
        newest = ckpt.newest_meta()
        old = newest[1].get("config") if newest else None
        old = old or run.saved_train
        if old is not None:
            run_dir_lib.check(run.path, old, new, run_dir_lib.KEPT_FIELDS,
                              f"its checkpoints (newest: step {steps[-1]}) were trained with other settings")
    elif run.has_tokenizer and run.saved_train is not None:
        run_dir_lib.check(run.path, run.saved_train, new, run_dir_lib.TOKENIZER_FIELDS,
                          "its tokenizer.json was built with other settings")
    return True


def _tokenizer(cfg: TrainConfig, run_dir: Path | None, is_main: bool):
    """The run's tokenizer, in memory (``run_dir``: load the run's own record): process 0 builds it
    (a BPE is trained) and sends it to the others. It is written once the checks have passed."""
    if jax.process_count() == 1:
        return data_lib.build_tokenizer(cfg.data, run_dir, save=False)
    blob = b""
    if is_main:
        try:
            blob = json.dumps(data_lib.build_tokenizer(cfg.data, run_dir, save=False).to_dict()).encode()
        except Exception:
            multihost_utils.broadcast_one_to_all(np.int32(-1))
            raise
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(blob))))
    if size < 0:
        raise ValueError("tokenizer: process 0 could not build it (see its error)")
    buf = np.frombuffer(blob, np.uint8) if is_main else np.zeros(size, np.uint8)
    blob = np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8).tobytes()
    return tokenizer_from_dict(json.loads(blob.decode()))


def _summary_lines(summary: dict, run_dir: Path) -> str:
    return "\n".join([
        "", "summary",
        f"  steps            {summary['steps']} ({summary['skipped_steps']} skipped)",
        f"  tokens           {summary['tokens']:,}",
        f"  wall time        {summary['wall_s']:.1f} s",
        f"  final train loss {summary['final_train_loss']:.4f}",
        f"  held-out         loss {summary['eval_loss']:.4f}, perplexity {summary['eval_ppl']:.2f}",
        f"  checkpoint       {summary['checkpoint']}",
        f"  metrics          {run_dir / 'metrics.jsonl'}" + (f", plot {summary['plot']}" if "plot" in summary else ""),
    ])


def _finished(cfg: TrainConfig, run_dir: Path, step: int, say) -> dict:
    """A run already at (or past) ``cfg.steps``: says so, re-prints its summary, writes nothing."""
    where = f"(--steps {cfg.steps})" if step == cfg.steps else f", past --steps {cfg.steps}"
    say(f"run_dir {run_dir} is finished: its newest checkpoint is step {step} {where}; nothing to train. Raise "
        f"--steps to continue it; evaluate it with python -m osdn_jax.train.evaluate sample {run_dir}")
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("steps") == step:
        try:
            say(_summary_lines(summary, run_dir))
        except (KeyError, TypeError, ValueError):  # a summary of another version
            pass
    else:
        summary = {}
    return {**summary, "steps": step, "finished": True, "run_dir": str(run_dir)}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _write_run_dir(cfg: TrainConfig, run: run_dir_lib.RunDir, ckpt: Checkpointer, tokenizer, model_cfg,
                   keep_tokenizer: bool, resumed, say) -> dict[str, list]:
    """Process 0, once every check has passed: the first writes of this invocation. Starting over
    moves the earlier run's files aside; unreadable newer checkpoints go to ``<step>.damaged``;
    then the tokenizer, config.json, the metrics trimmed to the resumed step, and a ``config`` row
    with the settings a resume changed (returned: ``{field: [old, new]}``)."""
    run_dir = run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.checkpoint.resume and (run.has_run_files() or (run.has_tokenizer and not keep_tokenizer)):
        previous = run.set_aside(keep_tokenizer)
        say(f"checkpoint.resume False: starting over; the earlier run's files are in {previous}")
    step, meta, unreadable = (resumed[0], resumed[3], resumed[4]) if resumed else (0, None, [])
    for bad, reason in unreadable:
        moved = ckpt.set_aside(bad)
        _warn(f"checkpoint step {bad} cannot be read ({reason}); resuming from step {step} instead; moved it to "
              f"{moved}")
    if not (run_dir / TOKENIZER_FILE).is_file():
        run_dir_lib.write_atomic(run_dir / TOKENIZER_FILE, json.dumps(tokenizer.to_dict()))
    new = to_dict(cfg)
    run.write_config(new, model_cfg.to_dict())
    if cfg.checkpoint.resume:
        keep_rows_until(run_dir, step)
    changed = run_dir_lib.changes(meta.get("config") or {}, new) if meta else {}
    if changed:
        MetricsWriter(run_dir).write({"kind": "config", "step": step, "changes": changed})
    return changed


def train(cfg: TrainConfig) -> dict:
    """Runs ``cfg`` to ``cfg.steps`` (resuming from the newest checkpoint); returns the summary.

    Nothing is written to the run directory before every check has passed (its settings against
    the run's, the tokenizer, the model, the mesh, the data, the checkpoint to resume); a run
    already at ``cfg.steps`` is reported and left as it is."""
    _check_paths(cfg)
    setup_jax(cfg)
    t_start = time.perf_counter()
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    run = run_dir_lib.RunDir.read(cfg.run_dir)
    run_dir = run.path
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, per_process_data=cfg.data_split == "documents")
    keep_tokenizer = _check_run_dir(cfg, run, ckpt)

    tokenizer = _tokenizer(cfg, run_dir if keep_tokenizer else None, is_main)
    model_cfg = cfg.model.build(tokenizer.vocab_size, cfg.data.seq_len, run_dir)
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
    step, tokens_seen, skipped, elapsed_before = 0, 0, 0, 0.0
    resumed = ckpt.restore_newest(params, opt_state, data.iterator, _all_processes) if cfg.checkpoint.resume else None
    if resumed is not None:
        latest, params, opt_state, meta, unreadable = resumed
        step, tokens_seen, skipped = meta["step"], meta["tokens_seen"], meta["skipped_steps"]
        elapsed_before = meta["elapsed_s"]
        if step >= cfg.steps:
            for bad, reason in unreadable:
                _warn(f"checkpoint step {bad} cannot be read ({reason}); left in place")
            ckpt.close()
            return _finished(cfg, run_dir, step, say)
    elif cfg.model.init_from is not None:
        init = cfg.model.resolve(cfg.model.init_from, run_dir)
        params = restore_params(init, params)

    # Every check has passed: from here on the run directory is written.
    changed = _write_run_dir(cfg, run, ckpt, tokenizer, model_cfg, keep_tokenizer, resumed, say) if is_main else {}
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("osdn_jax.train: run_dir written")
    ckpt.reload()
    if resumed is not None:
        say(f"resumed from {ckpt.directory}/{latest} (step {step})")
        if changed:
            say("changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    elif cfg.model.init_from is not None:
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
    except BaseException:
        if not run.existed and is_main and step == first_step:  # a failed start (e.g. a compile error)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
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
        say(_summary_lines(summary, run_dir))
        if "sample" in summary:
            say(f"\nsample:\n{summary['sample']}")
    return summary
