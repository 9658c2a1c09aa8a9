"""``python -m osdn_jax.convert {import,export,inspect}``.

    # an fla checkpoint folder → a run directory (upcycled to OSDN with --as osdn)
    python -m osdn_jax.convert import FLA_DIR RUN_DIR [--as osdn] [--tokenizer byte|PATH]
    # a run directory's newest (or --step) checkpoint → an fla checkpoint folder
    python -m osdn_jax.convert export RUN_DIR FLA_DIR [--dtype bfloat16] [--max-shard-size 5GB]
    # what an fla folder maps to, without loading weights
    python -m osdn_jax.convert inspect FLA_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m osdn_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="an fla checkpoint folder → a new run directory")
    imp.add_argument("source", help="fla folder: config.json + model.safetensors (or sharded with an index)")
    imp.add_argument("run_dir", help="the run directory to create (must not exist, or be empty)")
    imp.add_argument("--as", dest="as_", choices=("osdn",), default=None,
                     help="upcycle: DeltaNet → OSDN, Gated DeltaNet → OS-GDN (d0 = 1, the 'may' preset)")
    imp.add_argument("--tokenizer", default=None,
                     help="byte, a tokenizer.json or a run directory (default: the folder's tokenizer.json)")
    imp.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    imp.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                     help="the training config's compute dtype")
    imp.add_argument("--seq-len", type=int, default=1024, help="the training config's row length")
    exp = sub.add_parser("export", help="a run directory's checkpoint → a new fla checkpoint folder")
    exp.add_argument("run_dir")
    exp.add_argument("dest", help="the fla folder to create (must not exist, or be empty)")
    exp.add_argument("--step", type=int, default=None, help="the checkpoint (default: the newest)")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                     help="the tensors' dtype (default: the parameters')")
    exp.add_argument("--max-shard-size", default=None, help="e.g. 5GB: shards + model.safetensors.index.json")
    exp.add_argument("--as", dest="as_", choices=("deltanet",), default=None,
                     help="write an OSDN model as its DeltaNet / GDN source (only where exact: d0 = 1, no APF)")
    ins = sub.add_parser("inspect", help="print the ModelConfig an fla folder maps to")
    ins.add_argument("source")
    ins.add_argument("--as", dest="as_", choices=("osdn",), default=None)
    for sub_parser in (imp, ins):
        sub_parser.add_argument("--ignore-field", action="append", default=[], metavar="NAME",
                                help="an unknown config.json field you know does not change the math (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "import":
            from osdn_jax.convert.run import import_run

            run_dir = import_run(args.source, args.run_dir, as_osdn=args.as_ == "osdn", tokenizer=args.tokenizer,
                                 param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                                 seq_len=args.seq_len, ignore_fields=tuple(args.ignore_field))
            model = json.loads((run_dir / "model.json").read_text())
            print(f"imported {args.source} → {run_dir} ({model['mixer']['name']} model, {model['num_layers']} layers, "
                  f"hidden {model['hidden_size']}, vocab {model['vocab_size']})")
            print(f"fine-tune: python -m osdn_jax.train --config {run_dir / 'config.json'} --steps N ...")
        elif args.command == "export":
            from osdn_jax.convert.run import export_run

            dest, step = export_run(args.run_dir, args.dest, step=args.step, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size, as_deltanet=args.as_ == "deltanet")
            config = json.loads((Path(dest) / "config.json").read_text())
            print(f"exported {args.run_dir} step {step} → {dest} (model_type {config['model_type']})")
        else:
            from osdn_jax.convert.fla import CONFIG_FILE, _read_json
            from osdn_jax.convert.fla_config import model_config_from_fla

            path = Path(args.source) / CONFIG_FILE
            cfg = model_config_from_fla(_read_json(path), where=str(path), as_osdn=args.as_ == "osdn",
                                        ignore_fields=tuple(args.ignore_field))
            print(json.dumps(cfg.to_dict(), indent=2))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
