"""The ``vlprompt`` command line.

Each area of the library contributes its sub-commands through a ``register(subparsers)`` function, listed in
``COMMAND_MODULES``; this file only assembles them and turns :class:`~vlprompt.errors.VlpromptError` into one
clear line on stderr (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vlprompt import __version__
from vlprompt.errors import ConfigError, VlpromptError

# Modules that provide ``register(subparsers)``. Listed explicitly: no import side effects register anything.
COMMAND_MODULES = [
    "vlprompt.data.commands",
    "vlprompt.bench_commands",
    "vlprompt.engine.commands",
    "vlprompt.compat.commands",
    "vlprompt.reproduce_commands",
    "vlprompt.use_commands",
    "vlprompt.toyworld.commands",
    "vlprompt.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlprompt",
        description="Prompt learning for CLIP-style vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def parse_key_values(pairs: list[str], option: str = "--option") -> dict:
    """``["key=value", ...]`` given to ``option`` → ``{key: value}``, each value read as YAML (``3`` → 3,
    ``[a, b]`` → a list, ``true`` → True; text YAML cannot read stays text; an empty value is "")."""
    import yaml

    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        try:
            values[key] = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            values[key] = text
    return values


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from vlprompt.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # for every later allocation; see vlprompt.allocator for why and how to opt out
    try:
        result = args.func(args)
    except VlpromptError as error:
        print(f"vlprompt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlprompt {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
