"""``python -m osdn_jax.train [--config FILE] [--field value ...]`` (also the ``osdn-train`` command)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from osdn_jax.train.config import parse_args
    from osdn_jax.train.loop import StopTraining, train

    try:
        cfg = parse_args(argv)
    except ValueError as e:
        print(f"osdn-train: bad configuration: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except StopTraining as e:
        print(f"osdn-train: stopped: {e}", file=sys.stderr)
        return 3
    except ValueError as e:  # bad paths, sizes that do not fit the mesh, ...
        print(f"osdn-train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
