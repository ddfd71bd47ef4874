"""The ``dynpart`` command line: one entry point, one module per group of subcommands.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``; it must import only light modules at import time
(torch, ray and transformers are imported inside the command functions) so that ``dynpart --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = ["app.cli.generate", "app.cli.planner", "app.cli.demo", "app.cli.bench", "app.cli.serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynpart", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command group not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # our errors name the problem; no traceback for a user mistake
        print(f"dynpart {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
