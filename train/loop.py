"""The training run: setup, the step loop, evaluation, checkpoints, the sample and the summary."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from osdn_jax.flops import device_peak_flops, flops_per_token, mfu
from osdn_jax.generate import generate
from osdn_jax.model import CausalLM
from osdn_jax.train import data as data_lib, run_dir as run_dir_lib
from osdn_jax.train.checkpoint import Checkpointer, restore_params
from osdn_jax.train.config import TrainConfig, to_dict
from osdn_jax.train.metrics import MetricsWriter, keep_rows_until, plot
from osdn_jax.train.optim import learning_rate, make_optimizer
from osdn_jax.train.profile import StepProfiler, profile_dir
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
    mfu_line = [f"  MFU              {summary['mfu']:.1%} (this invocation)"] if "mfu" in summary else []
    profile_line = [f"  profile          {summary['profile']}"] if "profile" in summary else []
    return "\n".join([
        "", "summary",
        f"  steps            {summary['steps']} ({summary['skipped_steps']} skipped)",
        f"  tokens           {summary['tokens']:,}",
        f"  wall time        {summary['wall_s']:.1f} s",
        *mfu_line,
        f"  final train loss {summary['final_train_loss']:.4f}",
        f"  held-out         loss {summary['eval_loss']:.4f}, perplexity {summary['eval_ppl']:.2f}",
        f"  checkpoint       {summary['checkpoint']}",
        f"  metrics          {run_dir / 'metrics.jsonl'}" + (f", plot {summary['plot']}" if "plot" in summary else ""),
        *profile_line,
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


@dataclasses.dataclass
class _Run:
    """One invocation of a run: its settings, where it writes, the model and optimizer state (on
    the mesh), the data, and the counters that go into checkpoints."""

    cfg: TrainConfig
    run: run_dir_lib.RunDir
    ckpt: Checkpointer
    tokenizer: object
    model_cfg: object
    mesh: jax.sharding.Mesh
    graphdef: object
    shardings: dict
    opt_shardings: object
    tx: object  # the optimizer (optax)
    params: object
    opt_state: object
    data: _Data
    n_params: int
    t_start: float
    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    elapsed_before: float = 0.0
    last_loss: float = float("nan")
    metrics: MetricsWriter | None = None
    profiler: StepProfiler | None = None
    flops_per_token: float = 0.0  # training FLOPs per token of the model (osdn_jax.flops)
    peak_flops: float | None = None  # peak FLOP/s of all devices (None: unknown, so no MFU)
    windows: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # logged (tokens, seconds)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def say(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs)

    def elapsed(self) -> float:
        """Seconds of training over every invocation of the run."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save(self, at_step: int) -> None:
        self.ckpt.save(at_step, self.params, self.opt_state, self.data.iterator,
                       {"step": at_step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped,
                        "elapsed_s": self.elapsed(), "config": to_dict(self.cfg)})


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The compiled steps, traced and run under the mesh."""

    train: Callable
    eval: Callable


def train(cfg: TrainConfig) -> dict:
    """Runs ``cfg`` to ``cfg.steps`` (resuming from the newest checkpoint); returns the summary.

    Nothing is written to the run directory before every check has passed (its settings against
    the run's, the tokenizer, the model, the mesh, the data, the checkpoint to resume); a run
    already at ``cfg.steps`` is reported and left as it is."""
    _check_paths(cfg)
    setup_jax(cfg)
    r, keep_tokenizer = _set_up_run(cfg)
    resumed = _resume(r)
    if resumed is not None and r.step >= cfg.steps:
        for bad, reason in resumed[4]:
            _warn(f"checkpoint step {bad} cannot be read ({reason}); left in place")
        r.ckpt.close()
        return _finished(cfg, r.run.path, r.step, r.say)
    _open_run_dir(r, keep_tokenizer, resumed)
    stopped, eval_loss = _train_to_the_end(r, _compile_steps(r))
    return stopped if stopped is not None else _end_of_run(r, eval_loss)


def _set_up_run(cfg: TrainConfig) -> tuple[_Run, bool]:
    """Every check, the tokenizer, the mesh, the initialised parameters and optimizer state and the
    data; nothing is written. Also returns whether the run's own tokenizer.json is used."""
    t_start = time.perf_counter()
    run = run_dir_lib.RunDir.read(cfg.run_dir)
    ckpt = Checkpointer(run.path / "checkpoints", cfg.checkpoint, per_process_data=cfg.data_split == "documents")
    keep_tokenizer = _check_run_dir(cfg, run, ckpt)
    tokenizer = _tokenizer(cfg, run.path if keep_tokenizer else None, jax.process_index() == 0)
    model_cfg = cfg.model.build(tokenizer.vocab_size, cfg.data.seq_len, run.path)
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
    return _Run(cfg, run, ckpt, tokenizer, model_cfg, mesh, graphdef, shardings, opt_shardings, tx, params,
                opt_state, _Data(cfg, tokenizer), n_params, t_start), keep_tokenizer


def _resume(r: _Run):
    """The newest readable checkpoint into ``r`` (``ckpt.restore_newest``'s tuple, or None), else
    the parameters of ``model.init_from`` when given."""
    cfg = r.cfg
    resumed = (r.ckpt.restore_newest(r.params, r.opt_state, r.data.iterator, _all_processes, r.model_cfg)
               if cfg.checkpoint.resume else None)
    if resumed is not None:
        _, r.params, r.opt_state, meta, _ = resumed
        r.step, r.tokens_seen, r.skipped = meta["step"], meta["tokens_seen"], meta["skipped_steps"]
        r.elapsed_before = meta["elapsed_s"]
    elif cfg.model.init_from is not None:
        r.params = restore_params(cfg.model.resolve(cfg.model.init_from, r.run.path), r.params, r.model_cfg)
    return resumed


def _open_run_dir(r: _Run, keep_tokenizer: bool, resumed) -> None:
    """Every check has passed: from here on the run directory is written (``_write_run_dir``), and
    the run is announced."""
    cfg = r.cfg
    changed = _write_run_dir(cfg, r.run, r.ckpt, r.tokenizer, r.model_cfg, keep_tokenizer, resumed,
                             r.say) if r.is_main else {}
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("osdn_jax.train: run_dir written")
    r.ckpt.reload()
    _open_writers(r)
    if resumed is not None:
        r.say(f"resumed from {r.ckpt.directory}/{resumed[0]} (step {r.step})")
        if changed:
            r.say("changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    elif cfg.model.init_from is not None:
        r.say(f"parameters from {cfg.model.resolve(cfg.model.init_from, r.run.path)} (step 0, a fresh optimizer)")
    model_name = cfg.model.config_path or cfg.model.preset
    r.say(f"{r.model_cfg.mixer_name} model '{model_name}': {r.n_params / 1e6:.2f}M parameters; "
          f"{jax.device_count()} device(s) {dict(r.mesh.shape)}, {jax.process_count()} process(es); "
          f"batch {cfg.data.batch_size}x{cfg.data.seq_len}; tokenizer {r.tokenizer.to_dict().get('kind', '?')} "
          f"(vocab {r.tokenizer.vocab_size})")


def _open_writers(r: _Run) -> None:
    """The metrics writer (TensorBoard's points past the resumed step hidden, as the JSONL rows are
    dropped), the profiler, and what MFU needs: the FLOPs per token and the peak of all devices
    (``--log.peak-tflops`` per device, else the table's entry for the device and the compute dtype)."""
    cfg = r.cfg
    r.metrics = MetricsWriter(r.run.path, enabled=r.is_main, tensorboard=cfg.log.tensorboard, purge_step=r.step + 1)
    r.profiler = StepProfiler(cfg.profile.window, profile_dir(r.run.path, jax.process_index()))
    last = cfg.steps if cfg.run_steps is None else min(cfg.steps, r.step + cfg.run_steps)
    warning = r.profiler.check(r.step, last)
    if warning and r.is_main:
        _warn(warning)
    r.flops_per_token = flops_per_token(r.model_cfg, cfg.data.seq_len)
    per_device = (cfg.log.peak_tflops * 1e12 if cfg.log.peak_tflops is not None
                  else device_peak_flops(jax.devices()[0].device_kind, r.model_cfg.compute_dtype))
    r.peak_flops = None if per_device is None else per_device * jax.device_count()


def _close_writers(r: _Run) -> None:
    """Stops a profile still recording and closes the TensorBoard file (both idempotent)."""
    if r.profiler is not None:
        r.profiler.close()
    if r.metrics is not None:
        r.metrics.close()


def _under_mesh(fn, mesh):
    """``fn`` traced and run with the mesh in context, so the Pallas kernels split over it
    (``osdn_jax.kernels.partition``) instead of gathering the batch on every device, and the
    delta-rule ops find the ``context`` axis (time split over its devices)."""

    def run(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    return run


def _compile_steps(r: _Run) -> _Steps:
    batches = batch_sharding(r.mesh)
    train_step = jax.jit(make_train_step(r.graphdef, r.tx, r.cfg.optim.grad_accum, r.cfg.loss_chunk),
                         donate_argnums=(0, 1), in_shardings=(r.shardings, r.opt_shardings, batches),
                         out_shardings=(r.shardings, r.opt_shardings, None))
    eval_step = jax.jit(make_eval_step(r.graphdef, r.cfg.loss_chunk), in_shardings=(r.shardings, batches))
    return _Steps(_under_mesh(train_step, r.mesh), _under_mesh(eval_step, r.mesh))


def _evaluate(r: _Run, steps: _Steps) -> float:
    """Held-out loss at the current step; writes its metrics row."""
    loss, count = mean_loss(steps.eval, r.params, (global_batch(b, r.mesh) for b in r.data.eval))
    r.metrics.write({"kind": "eval", "step": r.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
                     "eval_targets": count})
    return loss


def _train_to_the_end(r: _Run, steps: _Steps) -> tuple[dict | None, float | None]:
    """The step loop, then the final evaluation and checkpoint: ``(None, held-out loss)``, or
    ``(stop record, None)`` when the invocation stopped early (SIGTERM, ``run_steps``). A failed
    start of a new run (e.g. a compile error) removes its run directory."""
    stop_signal: list[bool] = []  # SIGTERM: save a checkpoint at the end of the step, then exit
    try:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_signal.append(True))
    except ValueError:  # not the main thread: no handler
        previous_handler = None
    from tqdm.auto import tqdm

    bar = tqdm(total=r.cfg.steps, initial=r.step, disable=not (r.is_main and r.cfg.log.progress), unit="step",
               dynamic_ncols=True)
    first_step = r.step
    try:
        stopped = _step_loop(r, steps, bar, stop_signal)
        if stopped is not None:
            return stopped, None
        bar.close()
        eval_loss = _evaluate(r, steps)
        r.save(r.step)
        r.ckpt.wait()
        return None, eval_loss
    except BaseException:
        _close_writers(r)  # (before a failed start removes the directory they write to)
        if not r.run.existed and r.is_main and r.step == first_step:
            shutil.rmtree(r.run.path, ignore_errors=True)
        raise
    finally:
        bar.close()
        _close_writers(r)
        r.ckpt.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


class _Pending:
    """The dispatched steps whose metrics the host has not read yet, and the window of read ones
    that the next metrics row averages. The loop reads each step one step late, so preparing the
    next batch on the host overlaps the device's work instead of waiting for it."""

    def __init__(self, r: _Run):
        self.r, self.steps, self.window, self.bad_in_a_row = r, [], [], 0
        self.t_window = time.perf_counter()
        self.lr_at = learning_rate(r.cfg.optim, r.cfg.steps)

    def add(self, step: int, metrics: dict) -> None:
        self.steps.append((step, metrics))

    def absorb(self) -> None:
        """Reads the pending steps' metrics; too many non-finite steps in a row save the last good
        state and raise ``StopTraining``."""
        r = self.r
        while self.steps:
            at, m = self.steps.pop(0)
            ok, loss = bool(m["ok"]), float(m["loss"])
            if ok:
                self.bad_in_a_row, r.last_loss = 0, loss
                self.window.append((loss, float(m["grad_norm"])))
                continue
            r.skipped, self.bad_in_a_row = r.skipped + 1, self.bad_in_a_row + 1
            r.say(f"step {at}: non-finite loss/gradient (loss {loss}); step skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= r.cfg.max_bad_steps:
                r.save(r.step)  # skipped steps leave the state as it was: this is the last good state
                r.ckpt.wait()
                raise StopTraining(f"{self.bad_in_a_row} non-finite steps in a row (max_bad_steps="
                                   f"{r.cfg.max_bad_steps}); the last good state is saved in {r.ckpt.directory}/"
                                   f"{r.step}. Lower optim.lr or check the data.")

    def log(self, bar) -> None:
        """The ``train`` metrics row of the window (when a step of it was finite); starts the next."""
        r, now = self.r, time.perf_counter()
        tokens_per_step = r.cfg.data.batch_size * r.cfg.data.seq_len
        tok_s = len(self.window or [0]) * tokens_per_step / max(now - self.t_window, 1e-9)
        if self.window:
            loss = sum(x for x, _ in self.window) / len(self.window)
            utilisation = {"mfu": mfu(r.flops_per_token, tok_s, r.peak_flops)} if r.peak_flops else {}
            r.metrics.write({"kind": "train", "step": r.step, "loss": loss,
                             "grad_norm": sum(g for _, g in self.window) / len(self.window),
                             "lr": float(self.lr_at(r.step - 1)),
                             "tokens": r.tokens_seen, "tokens_per_s": tok_s, "skipped_steps": r.skipped,
                             **utilisation, "elapsed_s": r.elapsed_before + now - r.t_start})
            r.windows.append((len(self.window) * tokens_per_step, now - self.t_window))
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}",
                            **{k: f"{v:.1%}" for k, v in utilisation.items()})
        self.window, self.t_window = [], now


def _step_loop(r: _Run, steps: _Steps, bar, stop_signal: list[bool]) -> dict | None:
    """Steps to ``cfg.steps`` with the log, evaluation and checkpoint cadence; returns the stop
    record when SIGTERM or ``run_steps`` ends the invocation first (after saving a checkpoint)."""
    cfg, first_step, pending = r.cfg, r.step, _Pending(r)
    while r.step < cfg.steps:
        batch = global_batch(r.data.next(), r.mesh)
        r.profiler.before_step(r.step + 1)
        r.params, r.opt_state, m = steps.train(r.params, r.opt_state, batch)
        r.step += 1
        r.profiler.after_step(r.step, (r.params, m))
        r.tokens_seen += cfg.data.batch_size * cfg.data.seq_len
        bar.update(1)
        pending.absorb()  # the previous step's metrics: by now the device is busy with this one
        pending.add(r.step, m)
        log_now = r.step % cfg.log.every == 0 or r.step == cfg.steps
        eval_now = bool(cfg.eval_every) and r.step % cfg.eval_every == 0 and r.step < cfg.steps
        save_now = bool(cfg.checkpoint.every) and r.step % cfg.checkpoint.every == 0 and r.step < cfg.steps
        if log_now or eval_now or save_now or stop_signal or r.step - first_step == cfg.run_steps:
            pending.absorb()  # (these need the counters up to date)
        if log_now:
            pending.log(bar)
            if jax.process_count() > 1:
                stop_signal[:] = [True] if bool(np.any(multihost_utils.process_allgather(
                    np.array(bool(stop_signal))))) else []
        if eval_now:
            _report_eval(r, _evaluate(r, steps), bar)
        # several processes act on SIGTERM only where they have just agreed on it (log steps)
        sigterm = bool(stop_signal) and (jax.process_count() == 1 or log_now)
        reason = "SIGTERM" if sigterm else "run_steps" if r.step - first_step == cfg.run_steps else None
        if reason and r.step < cfg.steps:
            r.save(r.step)
            r.ckpt.wait()
            r.say(f"{reason}: saved step {r.step} to {r.ckpt.directory}; run again to continue")
            return {"steps": r.step, "stopped": reason, "checkpoint": f"{r.ckpt.directory}/{r.step}"}
        if save_now:
            r.save(r.step)
    pending.absorb()
    return None


def _report_eval(r: _Run, loss: float, bar) -> None:
    if r.is_main:
        line = f"step {r.step}: held-out loss {loss:.4f}, perplexity {math.exp(loss):.2f}"
        (bar.write if r.cfg.log.progress else print)(line)


def _run_mfu(r: _Run) -> float | None:
    """This invocation's MFU: its training tokens/s over the windows of its metrics rows, but the
    first one (which holds the compile) when there are several, as a fraction of the peak; None
    when the peak is unknown. (Token-weighted, so not the mean of the rows' ``mfu``.)"""
    if not r.peak_flops or not r.windows:
        return None
    windows = r.windows[1:] if len(r.windows) > 1 else r.windows
    tokens, seconds = sum(t for t, _ in windows), sum(s for _, s in windows)
    return mfu(r.flops_per_token, tokens / max(seconds, 1e-9), r.peak_flops)


def _end_of_run(r: _Run, eval_loss: float) -> dict:
    """The summary (summary.json, printed), the plot and the sample."""
    run_dir = r.run.path
    summary = {"steps": r.step, "tokens": r.tokens_seen, "wall_s": r.elapsed(), "final_train_loss": r.last_loss,
               "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0)), "skipped_steps": r.skipped,
               "parameters": r.n_params, "checkpoint": f"{r.ckpt.directory}/{r.step}", "run_dir": str(run_dir)}
    run_mfu = _run_mfu(r)
    if run_mfu is not None:
        summary["mfu"] = run_mfu
    if r.profiler.trace_dir is not None:
        summary["profile"] = str(r.profiler.trace_dir)
    if r.is_main and r.cfg.log.plot:
        summary["plot"] = str(plot(run_dir))
    if r.cfg.sample_tokens:
        summary["sample"] = _sample(r.cfg, r.graphdef, r.params, r.tokenizer)
    if r.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        r.say(_summary_lines(summary, run_dir))
        if "sample" in summary:
            r.say(f"\nsample:\n{summary['sample']}")
    return summary
