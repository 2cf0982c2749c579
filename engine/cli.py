"""The `mashup` console script: parse, validate, call one function. User errors print one line, exit 2."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from engine.core.errors import MashupError
from engine.core.version import __version__  # importlib.metadata: the installed distribution's version

# One line per command; each module defines `register(subparsers)` and sets `handler` on its parser.
COMMANDS = (
    "engine.commands.score",
    "engine.commands.select",
    "engine.commands.merge",
    "engine.commands.finetune",
    "engine.commands.run",
    "engine.commands.checkpoints",
    "engine.commands.freeze",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mashup", description="Recycle LoRA donors into a head start.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mashup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except MashupError as exc:
        print(f"mashup {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mashup {args.command}: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
