"""MQAR, multi-query associative recall (the Zoology recipe): data, training and the mixer grid.

A sequence holds N key–value pairs, then queries each key once; the model must answer with the
value. Keys come from ``[1, V/2)``, values from ``[V/2, V)``; queries sit at power-law distributed
gaps after the pairs; every other position holds a random token. Only the query positions are
scored.

    python -m osdn_jax.train.mqar --out-dir runs/mqar          # the grid (resumes from results.jsonl)
    python -m osdn_jax.train.mqar --help                      # every setting

The grid trains 2-layer models (the mixers' short convolution in front, no MLP) for each mixer,
width, (L, N), learning rate and seed and keeps the best learning rate per cell; it writes
``results.jsonl`` (one line per run), ``results.md`` (the table, mean ± std over seeds),
``mqar.png`` (learning curves) and ``strength.png`` (write strength by position), through
``osdn_jax.train.mqar_report``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from osdn_jax.diagnostics import recall_residual_ratio, write_strength_by_position
from osdn_jax.mixers import mixer_config
from osdn_jax.model import CausalLM, ModelConfig
from osdn_jax.ops.checks import require
from osdn_jax.train.optim import decay_mask

IGNORE = -100  # target of every position that is not scored


def _check_mqar(num_examples, seq_len, num_pairs, vocab_size, power_a):
    for name, v in (("num_examples", num_examples), ("seq_len", seq_len), ("num_pairs", num_pairs),
                    ("vocab_size", vocab_size)):
        require(isinstance(v, (int, np.integer)) and v >= 1, name, "an int >= 1", v)
    require(4 * num_pairs <= seq_len, "num_pairs, seq_len",
            f"4 * num_pairs <= seq_len (pairs take 2N positions, queries need 2N more); got N={num_pairs}, "
            f"L={seq_len}", (num_pairs, seq_len))
    require(vocab_size // 2 - 1 >= num_pairs, "vocab_size",
            f"at least 2 * (num_pairs + 1) = {2 * (num_pairs + 1)} so that {num_pairs} distinct keys fit in "
            f"[1, vocab_size/2)", vocab_size)
    require(0 < power_a <= 1, "power_a", "in (0, 1]", power_a)


def make_mqar(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int = 8192, seed: int = 0,
              power_a: float = 0.01, prefix: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``, int32 ``[num_examples, prefix + seq_len]``.

    Row layout: ``k_1 v_1 k_2 v_2 … k_N v_N`` (distinct keys in ``[1, V/2)``, values in ``[V/2, V)``),
    then each key once as a query at position ``2N + 2g`` with distinct gaps ``g`` drawn from
    ``P(g) ∝ (g + 1)^(power_a − 1)`` over the ``(L − 2N) / 2`` slots (short gaps are likely);
    every other position holds a uniformly random token. ``targets[n, t]`` is the value of the key
    queried at position t, ``IGNORE`` (−100) elsewhere. The same arguments give the same data.

    ``prefix`` (the warm variant) puts that many uniformly random filler tokens, never scored,
    before every row, so a mixer's online state (OSDN's d) has run that long when the pairs arrive;
    the rest of the row is exactly the ``prefix=0`` row (the filler has its own random stream).
    """
    _check_mqar(num_examples, seq_len, num_pairs, vocab_size, power_a)
    require(isinstance(prefix, (int, np.integer)) and prefix >= 0, "prefix", "an int >= 0", prefix)
    rng = np.random.default_rng(seed)
    N, L, V = num_pairs, seq_len, vocab_size
    slots = (L - 2 * N) // 2
    p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
    p /= p.sum()
    inputs = rng.integers(0, V, size=(num_examples, L), dtype=np.int64)
    targets = np.full((num_examples, L), IGNORE, np.int64)
    rows = np.arange(num_examples)[:, None]
    keys = np.stack([rng.choice(np.arange(1, V // 2), N, replace=False) for _ in range(num_examples)])
    values = rng.integers(V // 2, V, size=(num_examples, N))
    gaps = np.stack([rng.choice(slots, N, replace=False, p=p) for _ in range(num_examples)])
    inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2] = keys, values
    query_pos = 2 * N + 2 * gaps
    inputs[rows, query_pos] = keys
    targets[rows, query_pos] = values
    if prefix:
        filler = np.random.default_rng([seed, 1]).integers(0, V, size=(num_examples, prefix), dtype=np.int64)
        inputs = np.concatenate([filler, inputs], axis=1)
        targets = np.concatenate([np.full((num_examples, prefix), IGNORE, np.int64), targets], axis=1)
    return inputs.astype(np.int32), targets.astype(np.int32)


def query_positions(targets: np.ndarray) -> np.ndarray:
    """``[n, N]`` positions of the scored tokens of ``targets [n, L]`` (the same count in every row)."""
    scored = targets != IGNORE
    counts = scored.sum(axis=1)
    require(counts.size > 0 and (counts == counts[0]).all(), "targets", "the same number of scored positions "
            "in every row", counts[:8].tolist())
    return np.nonzero(scored)[1].reshape(len(targets), int(counts[0])).astype(np.int32)


# -- training ------------------------------------------------------------------------------------

MIXERS: dict[str, tuple[str, dict]] = {
    # grid name: (mixer registry name, config options)
    "osdn": ("osdn", {}),
    "osdn-apf": ("osdn", {"apf": True}),
    "osdn-d1": ("osdn", {"preset": "apr-d1"}),  # the paper's apr preset but d0 = 1: full writes from token 0
    "osdn-may": ("osdn", {"preset": "may"}),
    "deltanet": ("deltanet", {}),
    "gdn": ("gdn", {}),
    "attention": ("attention", {"conv_size": 4}),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one run trains on; runs in ``results.jsonl`` only count when their budget matches."""

    vocab_size: int = 256  # the Zoology recipe uses 8192; a CPU budget learns nothing there (docs/mqar.md)
    train_tokens: int = 4_915_200  # per run: examples = train_tokens / L (1200 steps at L = 256), prefix not counted
    test_examples: int = 512  # held-out examples scored per run
    epochs: int = 1  # passes over the training examples
    batch_size: int = 16  # examples per step
    head_dim: int = 64  # heads = width / head_dim
    chunk_size: int = 16  # delta-rule mixers' chunked path (exact at any size; 16 is fastest on a CPU)
    warmup_fraction: float = 0.1  # linear warmup over this share of the steps, then cosine to 0
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    data_seed: int = 0  # the test set uses data_seed + 1
    prefix: int = 0  # warm variant: random filler tokens before every row's pairs (make_mqar's prefix)
    curve_every: int = 300  # held-out accuracy every this many steps, into the row's "curve" (0: none)

    def train_examples(self, seq_len: int) -> int:
        return max(self.batch_size, self.train_tokens // seq_len)

    def steps(self, seq_len: int) -> int:
        return self.epochs * (self.train_examples(seq_len) // self.batch_size)


def model_for(mixer: str, width: int, seq_len: int, budget: Budget) -> ModelConfig:
    """The 2-layer MQAR model: the mixer's short conv in front, no MLP, fp32."""
    require(mixer in MIXERS, "mixer", f"one of {sorted(MIXERS)}", mixer)
    require(width % budget.head_dim == 0, "width", f"a multiple of head_dim={budget.head_dim}", width)
    name, options = MIXERS[mixer]
    if name != "attention":
        options = {**options, "chunk_size": budget.chunk_size}
    return ModelConfig(vocab_size=budget.vocab_size, hidden_size=width, num_layers=2,
                       num_heads=width // budget.head_dim, mixer=mixer_config(name, **options), use_mlp=False,
                       compute_dtype="float32", max_seq_len=budget.prefix + seq_len)


def _optimizer(weight_decay: float) -> optax.GradientTransformation:
    """AdamW without its learning rate (the step multiplies by it, so one compile serves every lr)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.98),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask))


def make_steps(graphdef, tx):
    """``(train_step, eval_step)`` on pure-dict parameters; losses only at the query positions."""
    def scores(params, inputs, qpos, qtgt):
        model = nnx.merge(graphdef, params)
        h = jnp.take_along_axis(model.features(inputs), qpos[..., None], axis=1)  # [B, N, D]
        logits = model.head(h)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, qtgt)
        return ce.mean(), (jnp.argmax(logits, -1) == qtgt).mean()

    @jax.jit
    def train_step(params, opt_state, lr, inputs, qpos, qtgt):
        (loss, acc), grads = jax.value_and_grad(scores, has_aux=True)(params, inputs, qpos, qtgt)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, loss, acc

    return train_step, jax.jit(scores)


def lr_at(step: int, steps: int, lr: float, warmup_fraction: float) -> float:
    """Linear warmup over ``warmup_fraction`` of the run, then cosine to 0."""
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class _Data:
    """The train and test sets of one (L, N), generated once per grid."""

    def __init__(self, seq_len: int, num_pairs: int, budget: Budget):
        b = budget
        self.seq_len = seq_len  # without the prefix
        self.train = make_mqar(b.train_examples(seq_len), seq_len, num_pairs, b.vocab_size, b.data_seed,
                               prefix=b.prefix)
        self.test = make_mqar(b.test_examples, seq_len, num_pairs, b.vocab_size, b.data_seed + 1, prefix=b.prefix)
        self.train_q = query_positions(self.train[1])
        self.test_q = query_positions(self.test[1])


def _gather(data, qpos, idx):
    inputs, targets = data
    q = qpos[idx]
    return inputs[idx], q, np.take_along_axis(targets[idx], q, axis=1)


class Cell:
    """One (mixer, width, L, N): the model compiled once, trained at each learning rate and seed."""

    def __init__(self, mixer: str, width: int, data: _Data, seq_len: int, budget: Budget):
        self.mixer, self.width, self.data, self.budget = mixer, width, data, budget
        self.config = model_for(mixer, width, seq_len, budget)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: CausalLM(self.config, rngs=nnx.Rngs(0))), nnx.Param)
        self.graphdef = graphdef
        self.tx = _optimizer(budget.weight_decay)
        self.train_step, self.eval_step = make_steps(graphdef, self.tx)

    def run(self, lr: float, seed: int) -> dict:
        b = self.budget
        model = CausalLM(self.config, rngs=nnx.Rngs(seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        opt_state = self.tx.init(params)
        order = np.random.default_rng(seed)
        L = self.data.seq_len
        steps, examples = b.steps(L), b.train_examples(L)
        per_epoch = examples // b.batch_size
        start, step, losses, curve = time.perf_counter(), 0, [], []
        for _ in range(b.epochs):
            perm = order.permutation(examples)
            for i in range(per_epoch):
                batch = _gather(self.data.train, self.data.train_q, perm[i * b.batch_size:(i + 1) * b.batch_size])
                params, opt_state, loss, _ = self.train_step(params, opt_state,
                                                             jnp.float32(lr_at(step, steps, lr, b.warmup_fraction)),
                                                             *batch)
                step += 1
                if step % 50 == 0 or step == steps:
                    losses.append((step, round(float(loss), 4)))
                if b.curve_every and (step % b.curve_every == 0 or step == steps):
                    curve.append((step, round(self.evaluate(params)[0], 4)))
        train_seconds = time.perf_counter() - start
        acc, loss = self.evaluate(params)
        row = {"mixer": self.mixer, "width": self.width, "seq_len": L,
               "num_pairs": int(self.data.train_q.shape[1]), "lr": lr, "seed": seed, "accuracy": acc,
               "test_loss": loss, "train_loss_curve": losses, "curve": curve,
               "diverged": not math.isfinite(loss), "steps": steps, "train_seconds": round(train_seconds, 1),
               "params": int(sum(x.size for x in jax.tree.leaves(params))), "budget": dataclasses.asdict(b)}
        if self.mixer != "attention":
            row["residual_ratio"] = self.ratio(params)
            row.update(self.strength(params))
        return row

    def evaluate(self, params, batch_size: int = 128) -> tuple[float, float]:
        """Accuracy and loss over every query of the test set."""
        n = self.data.test[0].shape[0]
        accs, losses = [], []
        for i in range(0, n, batch_size):
            idx = np.arange(i, min(n, i + batch_size))
            loss, acc = self.eval_step(params, *_gather(self.data.test, self.data.test_q, idx))
            accs.append(float(acc) * len(idx))
            losses.append(float(loss) * len(idx))
        return sum(accs) / n, sum(losses) / n

    def strength(self, params, examples: int = 128) -> dict:
        """``{"write_strength": buckets, "pair_strength": bucket, "d0": per layer}``: the mean write
        strength by position (powers of two; the prefix included) and over the key-value pairs
        (positions ``[P, P + 2N)``) on test rows, and the learned d0 (OSDN)."""
        from osdn_jax.train.perplexity import position_buckets

        model = nnx.merge(self.graphdef, params)
        rows = self.data.test[0][:examples]
        first = self.budget.prefix
        pairs = (first, first + 2 * int(self.data.test_q.shape[1]))
        result = write_strength_by_position(model, [{"inputs": rows[i:i + 64]} for i in range(0, len(rows), 64)],
                                            position_buckets(rows.shape[1]) + [pairs])
        return {"write_strength": result["buckets"][:-1], "pair_strength": result["buckets"][-1], "d0": result["d0"]}

    def ratio(self, params, examples: int = 128) -> float:
        """The recall residual ratio (geometric mean over every token, head and layer) on test rows."""
        model = nnx.merge(self.graphdef, params)
        batches = [{"inputs": self.data.test[0][i:i + 64]} for i in range(0, min(examples, len(self.data.test[0])), 64)]
        return recall_residual_ratio(model, batches)["overall"]


# -- the grid ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GridConfig:
    """The MQAR grid: every mixer × width × (L, N) × learning rate × seed, resumable."""

    out_dir: str = "runs/mqar"  # results.jsonl, results.md, mqar.png and strength.png go here
    mixers: tuple[str, ...] = tuple(MIXERS)  # the default lists every one
    widths: tuple[int, ...] = (64,)  # model widths (hidden sizes)
    settings: tuple[str, ...] = ("256:16",)  # L:N pairs: sequence length, key-value pairs
    lrs: tuple[float, ...] = (3e-3,)  # learning rates tried per cell (the best one is kept)
    seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the parameter init and the example order
    budget: Budget = Budget()
    progress: bool = True  # progress bar over the runs

    def __post_init__(self):
        for m in self.mixers:
            require(m in MIXERS, "mixers", f"names from {sorted(MIXERS)}", m)
        for s in self.settings:
            parts = s.split(":")
            require(len(parts) == 2 and all(p.isdigit() for p in parts), "settings", "'L:N' pairs like '256:16'", s)
        require(all(lr > 0 for lr in self.lrs) and self.lrs, "lrs", "positive learning rates", self.lrs)

    def pairs(self) -> list[tuple[int, int]]:
        return [tuple(int(p) for p in s.split(":")) for s in self.settings]


def run_key(row: dict) -> tuple:
    return (row["mixer"], row["width"], row["seq_len"], row["num_pairs"], float(row["lr"]), row["seed"])


# Budget fields added after rows were first written, at the value those rows ran with.
_LEGACY_BUDGET = {"prefix": 0, "curve_every": 0}


def same_budget(saved: dict | None, budget: Budget) -> bool:
    """Whether a row's recorded budget is ``budget``; a field added since the row was written counts
    at the value the row ran with (rows from before ``prefix`` existed were cold runs, and had no
    learning curve)."""
    return isinstance(saved, dict) and {**_LEGACY_BUDGET, **saved} == dataclasses.asdict(budget)


def read_results(path: Path, budget: Budget | None = None) -> list[dict]:
    """Rows of ``results.jsonl`` (those with ``budget`` when given); a torn last line is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption: that run is redone
        if budget is None or same_budget(row.get("budget"), budget):
            rows.append(row)
    return rows


def best_per_cell(rows: list[dict]) -> dict[tuple, dict]:
    """``(mixer, width, L, N, seed) -> row`` with the best test accuracy over learning rates."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["mixer"], r["width"], r["seq_len"], r["num_pairs"], r["seed"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    return best


def run_grid(cfg: GridConfig) -> list[dict]:
    """Trains every run of the grid not already in ``out_dir/results.jsonl`` (same budget), then
    writes the table and the plot. Returns the grid's rows."""
    from tqdm import tqdm

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if results.is_file() and not results.read_bytes().endswith(b"\n"):
        with results.open("a") as f:  # an interrupted write left a torn line: close it
            f.write("\n")
    done = {run_key(r) for r in read_results(results, cfg.budget)}
    todo = [(L, N, m, w, lr, s) for L, N in cfg.pairs() for m in cfg.mixers for w in cfg.widths
            for lr in cfg.lrs for s in cfg.seeds if (m, w, L, N, float(lr), s) not in done]
    total = len(cfg.pairs()) * len(cfg.mixers) * len(cfg.widths) * len(cfg.lrs) * len(cfg.seeds)
    print(f"mqar: {total - len(todo)} of {total} runs already in {results}; {len(todo)} to train "
          f"({', '.join(f'{cfg.budget.steps(L)} steps at L={L}' for L, _ in cfg.pairs())})", flush=True)
    bar = tqdm(total=len(todo), disable=not cfg.progress, desc="mqar", file=sys.stdout)
    data: _Data | None = None
    cell: Cell | None = None
    for L, N, m, w, lr, s in todo:
        if data is None or data.seq_len != L or data.train_q.shape[1] != N:
            data, cell = _Data(L, N, cfg.budget), None
        if cell is None or (cell.mixer, cell.width) != (m, w):
            cell = Cell(m, w, data, L, cfg.budget)
        bar.set_postfix_str(f"{m} w={w} L={L} N={N} lr={lr:g} seed={s}")
        row = cell.run(lr, s)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update()
        bar.write(f"{m:>9} w={w:<4} L={L:<4} N={N:<3} lr={lr:<7g} seed={s}: acc {row['accuracy']:.3f} "
                  f"({row['train_seconds']:.0f}s)")
    bar.close()
    wanted = {(m, w, L, N, float(lr), s) for L, N in cfg.pairs() for m in cfg.mixers for w in cfg.widths
              for lr in cfg.lrs for s in cfg.seeds}
    rows = [r for r in read_results(results, cfg.budget) if run_key(r) in wanted]
    from osdn_jax.train.mqar_report import write_reports

    print(write_reports(out, rows))
    print(f"mqar: wrote {out / 'results.md'}, {out / 'mqar.png'} (learning curves) and {out / 'strength.png'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    import tyro

    try:
        cfg = tyro.cli(GridConfig, args=argv, prog="python -m osdn_jax.train.mqar", description=__doc__,
                       config=(tyro.conf.FlagConversionOff,))
    except ValueError as e:
        print(f"mqar: bad configuration: {e}", file=sys.stderr)
        return 2
    run_grid(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
