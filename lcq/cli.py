"""The `lcq` command. Each subpackage registers its own subcommands, imported lazily so that
`lcq quantize` needs no server packages and `lcq serve` no quantizer extras."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError
from .format import FormatError, WriteError

# Modules exposing register(subparsers) -> None; each subcommand sets `func(args) -> int | None`.
COMMAND_MODULES = ("lcq.quantizer.commands", "lcq.server.commands", "lcq.environment")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lcq", description="Quantize Llama-family models to low-rank codebooks (LCQ) and "
                           "serve them with an OpenAI-compatible server.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module).register(subparsers)
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith("lcq."):
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FormatError, WriteError) as e:
        print(f"lcq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
