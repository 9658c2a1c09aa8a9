"""Evaluate a training run from its directory (config, tokenizer and checkpoint are all recorded
there), on the local devices. Every command prints a table and writes a JSON record (and a plot
where one helps) to ``RUN_DIR/eval/<command>-<data>-step<N>.json``.

    python -m osdn_jax.train.evaluate sample RUN_DIR [--prompt TEXT] [--tokens 200] [--temperature 0.8]
        [--top-k 40] [--eval-batches 8]          # held-out loss of the run's data + a sample
    python -m osdn_jax.train.evaluate ppl RUN_DIR --data PATH [--source text|jsonl|npy|bin]
        [--seq-len N] [--batch-size N] [--max-batches N] [--buckets N]   # perplexity, loss by position
    python -m osdn_jax.train.evaluate recall RUN_DIR --data FILE.jsonl [--twice] [--max-tokens 48]
        [--context-budget 1000] [--limit N]      # JRT-style in-context recall (FDA / SWDE / SQuAD)
    python -m osdn_jax.train.evaluate ratio RUN_DIR --data PATH [--max-batches 16]
        # recall residual ratio per layer and head (delta-rule mixers), geometric mean over tokens
    python -m osdn_jax.train.evaluate strength RUN_DIR --data PATH [--max-batches 16] [--buckets N]
        # mean write strength by position in the document (delta-rule mixers), and the learned d0

Every command takes ``--step N`` (default: the newest checkpoint) and ``--out-dir DIR`` (default
``RUN_DIR/eval``). ``python -m osdn_jax.train.evaluate RUN_DIR ...`` (no command) is ``sample``.
lm-evaluation-harness tasks: ``python -m osdn_jax.train.lm_eval_adapter`` (docs/evaluation.md).

Adding a command: write ``_<name>_arguments(parser)`` and ``_<name>(args)`` (load the run with
``_load(args)``, print with ``_table``, save with ``_save``; a command that reads a corpus file takes
``_data_arguments``, checks them with ``_check_data_flags`` before loading the run, builds its
``DataConfig`` with ``_data_config`` and reads inside
``_data_errors()``) and add an entry to ``COMMANDS``.
Bad arguments (paths, fields, sizes) raise ``ValueError`` naming the flag; ``main`` prints it and
returns 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from osdn_jax.generate import generate
from osdn_jax.model import CausalLM
from osdn_jax.train import data as data_lib, report
from osdn_jax.train.checkpoint import restore_newest_params, restore_params, restore_step_params
from osdn_jax.train.config import TrainConfig, from_dict, run_settings
from osdn_jax.train.step import make_eval_step, mean_loss
from osdn_jax.train.tokenizer import Tokenizer, load_tokenizer


def load_run(run_dir: str | Path, step: int | None = None) -> tuple[CausalLM, Tokenizer, TrainConfig, int]:
    """``(model, tokenizer, config, step)`` of a run: the newest checkpoint unless ``step`` is given."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"run_dir: {run_dir} holds no config.json (not a training run directory)")
    cfg = from_dict(run_settings(json.loads((run_dir / "config.json").read_text())))
    tokenizer = load_tokenizer(run_dir)
    model_cfg = cfg.model.build(tokenizer.vocab_size, cfg.data.seq_len, run_dir)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract))
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    steps = manager.all_steps()
    if not steps and cfg.model.init_from is not None and step in (None, 0):  # an imported, untrained run
        manager.close()
        params = restore_params(cfg.model.resolve(cfg.model.init_from, run_dir), target, model_cfg)
        return nnx.merge(graphdef, params), tokenizer, cfg, 0
    if not steps:
        raise ValueError(f"run_dir: {run_dir}/checkpoints holds no checkpoint")
    if step is None:  # the newest readable one (a damaged newer one is named in a warning)
        try:
            step, params = restore_newest_params(manager, target, run_dir / "checkpoints", model_cfg)
        finally:
            manager.close()
        return nnx.merge(graphdef, params), tokenizer, cfg, step
    if step not in steps:
        raise ValueError(f"step: no checkpoint for step {step} in {run_dir}; saved steps are {sorted(steps)}")
    params = restore_step_params(manager, step, target, model_cfg)
    manager.close()
    return nnx.merge(graphdef, params), tokenizer, cfg, step


def held_out_loss(model: CausalLM, cfg: TrainConfig, tokenizer: Tokenizer, num_batches: int) -> float:
    """Mean next-token loss (nats) over ``num_batches`` held-out batches of the run's data."""
    graphdef, params = nnx.split(model, nnx.Param)
    batches = data_lib.make_eval_batches(cfg.data, tokenizer, num_batches)
    return mean_loss(jax.jit(make_eval_step(graphdef, cfg.loss_chunk)), nnx.to_pure_dict(params), batches)[0]


# ---------------------------------------------------------------------------------------------
# Shared pieces of the commands


@dataclasses.dataclass(frozen=True)
class Run:
    model: CausalLM
    tokenizer: Tokenizer
    cfg: TrainConfig
    step: int
    run_dir: Path


def _load(args: argparse.Namespace) -> Run:
    model, tokenizer, cfg, step = load_run(args.run_dir, args.step)
    print(f"{args.run_dir}: step {step}, {model.config.mixer_name} model, tokenizer {tokenizer.kind}")
    return Run(model, tokenizer, cfg, step, Path(args.run_dir))


def _table(headers: list[str], rows: list[list]) -> None:
    print(report.format_table(headers, rows))


def _save(args: argparse.Namespace, run: Run, command: str, name: str | None, record: dict) -> Path:
    path = report.output_path(run.run_dir, command, name, run.step, out_dir=args.out_dir)
    header = {"command": command, "run_dir": str(run.run_dir), "step": run.step,
              "mixer": run.model.config.mixer_name, "tokenizer": run.tokenizer.kind}
    report.write_json(path, {**header, **record})
    print(f"wrote {path}")
    return path


def _positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")


# ---------------------------------------------------------------------------------------------
# sample: held-out loss of the run's own data, and a sample


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None, help="text the sample continues (default: the run's sample_prompt)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to sample, default 200 (0: no sample)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, default 0.8 (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens, default 40")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, default 0")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches, default 8 (0: no evaluation)")


def _sample(args: argparse.Namespace) -> None:
    run = _load(args)
    record: dict = {}
    if args.eval_batches:
        loss = held_out_loss(run.model, run.cfg, run.tokenizer, args.eval_batches)
        print(f"held-out loss {loss:.4f}, perplexity {report.perplexity(loss):.2f}")
        record.update(eval_batches=args.eval_batches, loss=loss, ppl=report.perplexity(loss))
    if args.tokens:
        prompt = run.cfg.sample_prompt if args.prompt is None else args.prompt
        ids = [int(t) for t in run.tokenizer.encode(prompt)] or [run.tokenizer.eos_id]
        out = generate(run.model, [ids], args.tokens, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, stop_token=run.tokenizer.eos_id, vocab_limit=run.tokenizer.vocab_size)
        text = run.tokenizer.decode(out.as_lists()[0])
        print(prompt + text)
        record.update(prompt=prompt, sample=text, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if record:
        _save(args, run, "sample", None, record)


# ---------------------------------------------------------------------------------------------
# Corpus files (ppl, and any command that reads documents): flags, the DataConfig, error names


def _data_arguments(p: argparse.ArgumentParser) -> None:
    """``--data`` and how to read it into windows of documents (the training readers)."""
    from osdn_jax.train.perplexity import SOURCE_SUFFIXES

    p.add_argument("--data", required=True,
                   help="a file or directory of text / JSONL / token files, or a prepared folder (shards)")
    p.add_argument("--source", choices=[*SOURCE_SUFFIXES, "shards"], default=None,
                   help="default: from the suffix (shards: a folder with index.json)")
    p.add_argument("--text-field", default="text", help="JSONL: the field holding the document text (text)")
    p.add_argument("--doc-split", choices=list(data_lib.DOC_SPLITS), default="blank_line",
                   help="text files: documents end at blank lines (default), or one per file")
    p.add_argument("--token-dtype", choices=list(data_lib.TOKEN_DTYPES), default="uint16",
                   help=".bin token files: element type (uint16)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (8)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_data_flags(args: argparse.Namespace) -> str:
    """Validates the corpus flags before any loading; returns the source kind."""
    from osdn_jax.train.perplexity import infer_source

    if args.source is not None and not Path(args.data).exists():
        raise ValueError(f"--data: {args.data} does not exist")
    _positive("--batch-size", args.batch_size, allow_none=False)
    _positive("--max-batches", args.max_batches)
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len: expected an int >= 2, got {args.seq_len}")
    return args.source or infer_source(args.data)


def _data_config(args: argparse.Namespace, run: Run) -> data_lib.DataConfig:
    """The run's data settings (tokenizer, append_eos) pointed at ``--data`` with the flags' shape."""
    source = _check_data_flags(args)
    return dataclasses.replace(run.cfg.data, source=source, path=str(args.data), text_field=args.text_field,
                               doc_split=args.doc_split, token_dtype=args.token_dtype, token_eos_id=None,
                               seq_len=args.seq_len or run.cfg.data.seq_len, batch_size=args.batch_size,
                               packing_bins=None)


_DATA_FLAGS = {"path:": "--data:", "text_field:": "--text-field:", "token_dtype:": "--token-dtype:",
               "DataConfig.path:": "--data:", "DataConfig.tokenizer:": "--data:"}


@contextlib.contextmanager
def _data_errors():
    """The readers' errors name their config fields (``path: ...``); name our flags instead."""
    try:
        yield
    except ValueError as e:
        msg = str(e)
        for prefix, flag in _DATA_FLAGS.items():
            if msg.startswith(prefix):
                raise ValueError(flag + msg[len(prefix):]) from None
        raise


# ---------------------------------------------------------------------------------------------
# ppl: perplexity of any corpus file, loss by position in the window


def _ppl_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    p.add_argument("--heldout", action="store_true",
                   help="a prepared folder: its held-out documents only (default: every document)")
    p.add_argument("--buckets", type=int, default=None,
                   help="N equal-width position buckets (default: powers of two)")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="positions of each row whose logits exist at once (default: the run's loss_chunk; 0: all)")


def _ppl(args: argparse.Namespace) -> None:
    from osdn_jax.train import perplexity

    _positive("--buckets", args.buckets)
    if args.loss_chunk is not None and args.loss_chunk < 0:
        raise ValueError(f"--loss-chunk: expected >= 0 (0: the whole logits at once), got {args.loss_chunk}")
    _check_data_flags(args)
    run = _load(args)
    cfg = _data_config(args, run)
    source = cfg.source
    if args.heldout and source != "shards":
        raise ValueError(f"--heldout: needs a prepared folder (source shards), --data is {source}")
    with _data_errors():
        doc_ids = None
        if args.heldout:  # the folder's own split, whatever the run held out
            doc_ids = data_lib.prepared_heldout(cfg)
        chunk = run.cfg.loss_chunk if args.loss_chunk is None else args.loss_chunk
        by_position, summary = perplexity.evaluate_perplexity(run.model, run.tokenizer, cfg,
                                                              max_batches=args.max_batches,
                                                              progress=not args.no_progress, doc_ids=doc_ids,
                                                              loss_chunk=chunk)
    buckets = by_position.buckets(perplexity.position_buckets(cfg.seq_len, args.buckets))
    print(f"{args.data} ({source}): {summary['documents']} documents, {summary['tokens_in_source']:,} targets; "
          f"{summary['batches']} batches of {cfg.batch_size}x{cfg.seq_len}, {summary['tokens']:,} targets counted")
    _table(["positions", "tokens", "loss", "ppl"],
           [[f"[{b['lo']}, {b['hi']})", b["tokens"], b["loss"], b["ppl"]] for b in buckets]
           + [["all", summary["tokens"], summary["loss"], summary["ppl"]]])
    name = report.data_name(args.data)
    record = {"data": str(args.data), "source": source, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
              "append_eos": cfg.append_eos, **summary,
              "bucketing": "equal" if args.buckets else "pow2", "buckets": buckets,
              "by_position": {"tokens": by_position.tokens.tolist(), "loss_sum": by_position.loss_sum.tolist()}}
    path = _save(args, run, "ppl", name, record)
    title = f"{run.run_dir.name} step {run.step}: {name}, ppl {summary['ppl']:.2f}"
    print(f"wrote {perplexity.plot_buckets(buckets, path.with_suffix('.png'), title, log_x=not args.buckets)}")


# ---------------------------------------------------------------------------------------------
# recall: JRT-style in-context recall (FDA / SWDE / SQuAD-completion shaped JSONL)


def _recall_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a JSONL file (or a directory of them)")
    p.add_argument("--twice", action="store_true", help="JRT prompt: context, context again, question")
    p.add_argument("--max-tokens", type=int, default=48, help="greedy tokens to generate (48)")
    p.add_argument("--context-budget", type=int, default=1000, help="tokens of one copy of the context (1000)")
    p.add_argument("--limit", type=int, default=None, help="the first N records only")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (8)")
    p.add_argument("--text-field", default="text", help="the whole prompt: context + question (text)")
    p.add_argument("--answer-field", default="value", help="answer: string, list, or {'text': [...]} (value)")
    p.add_argument("--context-field", default="context",
                   help="optional field: the passage that the text starts with (context; '' for none)")
    p.add_argument("--key-field", default="key",
                   help="optional field: the attribute the text ends with as 'key:' (key; '' for none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _recall(args: argparse.Namespace) -> None:
    from osdn_jax.train import recall

    _positive("--limit", args.limit)
    examples = recall.read_recall_jsonl(args.data, text_field=args.text_field, answer_field=args.answer_field,
                                        context_field=args.context_field or None,
                                        key_field=args.key_field or None, limit=args.limit)
    run = _load(args)
    result = recall.evaluate_recall(run.model, run.tokenizer, examples, twice=args.twice,
                                    max_tokens=args.max_tokens, context_budget=args.context_budget,
                                    batch_size=args.batch_size, progress=not args.no_progress)
    _table(["data", "prompt", "examples", "accuracy", "mean prompt tokens", "truncated", "answer in prompt"],
           [[str(args.data), "twice" if args.twice else "once", result["examples"], result["accuracy"],
             f"{result['mean_prompt_tokens']:.1f}", result["truncated"], result["answer_in_prompt"]]])
    name = report.data_name(args.data) + ("-twice" if args.twice else "")
    _save(args, run, "recall", name, {"data": str(args.data), **result})


# ---------------------------------------------------------------------------------------------
# ratio: the recall residual ratio (1 − β⟨d, k²⟩)² per layer and head on a set of prompts


def _ratio_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    p.set_defaults(max_batches=16)


def _document_batches(args: argparse.Namespace, run: Run, cfg: data_lib.DataConfig, desc: str):
    """The first ``--max-batches`` batches of ``--data``'s documents, behind a progress bar."""
    from tqdm import tqdm

    batches = data_lib.iter_document_batches(cfg, run.tokenizer)
    if args.max_batches is not None:
        batches = itertools.islice(batches, args.max_batches)
    return tqdm(batches, desc=desc, unit="batch", disable=args.no_progress)


def _ratio(args: argparse.Namespace) -> None:
    from osdn_jax import diagnostics

    _check_data_flags(args)
    run = _load(args)
    cfg = _data_config(args, run)
    with _data_errors():
        result = diagnostics.recall_residual_ratio(run.model, _document_batches(args, run, cfg, "ratio"))
    print(diagnostics.format_ratio_table(result, f"{args.data}: recall residual ratio (geometric mean)"))
    _save(args, run, "ratio", report.data_name(args.data),
          {"data": str(args.data), "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, **result})


# ---------------------------------------------------------------------------------------------
# strength: where the model writes, β⟨d, k²⟩ by position in the document, and the learned d0


def _strength_arguments(p: argparse.ArgumentParser) -> None:
    _data_arguments(p)
    p.add_argument("--buckets", type=int, default=None,
                   help="N equal-width position buckets (default: powers of two)")
    p.set_defaults(max_batches=16)


def _strength(args: argparse.Namespace) -> None:
    from osdn_jax import diagnostics
    from osdn_jax.train import perplexity

    _positive("--buckets", args.buckets)
    _check_data_flags(args)
    run = _load(args)
    cfg = _data_config(args, run)
    with _data_errors():
        result = diagnostics.write_strength_by_position(run.model, _document_batches(args, run, cfg, "strength"),
                                                        perplexity.position_buckets(cfg.seq_len, args.buckets))
    print(diagnostics.format_strength_table(result, f"{args.data}: mean write strength by position in the document"))
    name = report.data_name(args.data)
    path = _save(args, run, "strength", name, {"data": str(args.data), "seq_len": cfg.seq_len,
                                                "batch_size": cfg.batch_size, **result})
    title = f"{run.run_dir.name} step {run.step}: {name}, write strength by position"
    png = report.plot_write_strength({run.model.config.mixer_name: result["buckets"]}, path.with_suffix(".png"), title)
    print(f"wrote {png}")


# ---------------------------------------------------------------------------------------------
# The front door


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS: dict[str, Command] = {
    "sample": Command("held-out loss of the run's data and a sample", _sample_arguments, _sample),
    "ppl": Command("perplexity of a text / JSONL / token file, loss by position", _ppl_arguments, _ppl),
    "recall": Command("JRT-style in-context recall on FDA / SWDE / SQuAD-shaped JSONL", _recall_arguments,
                      _recall),
    "ratio": Command("recall residual ratio (1 − β⟨d, k²⟩)² per layer and head on a corpus or prompt file",
                     _ratio_arguments, _ratio),
    "strength": Command("mean write strength β⟨d, k²⟩ by position in the document, and the learned d0",
                        _strength_arguments, _strength),
}


def _help_epilog() -> str:
    """The module doc for ``--help``: the command forms and the notes after them, up to the notes
    for developers ("Adding a command")."""
    user_part = __doc__.split("\nAdding a command:")[0]
    return user_part.split("\n\n", 1)[1].replace("``", "").strip("\n").rstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m osdn_jax.train.evaluate",
                                description="Evaluate a training run from its directory; results go to RUN_DIR/eval/.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_help_epilog())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        c = sub.add_parser(name, help=cmd.help, description=cmd.help)
        c.add_argument("run_dir", help="the training run's directory")
        c.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
        c.add_argument("--out-dir", default=None, help="where the JSON / PNG go (default: RUN_DIR/eval)")
        cmd.add_arguments(c)
        c.set_defaults(handler=cmd.run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "sample")  # the original form: evaluate RUN_DIR [--prompt ...]
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ValueError as e:
        print(f"evaluate {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
