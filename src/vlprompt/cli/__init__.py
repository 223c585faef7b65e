"""The ``vlprompt`` command line.

Only this package builds parsers and prints for humans; the library below it never imports it. Each command group
is one module here with a ``register(subparsers)`` function, listed in ``COMMAND_MODULES``: ``train`` (train, run,
eval, methods), ``data`` (datasets, data), ``use`` (predict, export, explain) and ``compat`` (import),
``experiments`` (sweep, reproduce, report), ``toyworld``, ``demo`` and ``bench``; ``sweep_job`` is the process a
sweep starts for each run. This file assembles them, holds the option readers they share (``KEY=VALUE`` lists,
``--threads``), applies ``--threads`` before a heavy command runs and turns :class:`~vlprompt.errors.VlpromptError`
into one clear line on stderr (exit status 2) instead of a traceback.

Building the parser imports every command module but never torch: ``vlprompt --version`` and ``--help`` answer in
a fraction of a second. Options whose description needs a heavy import are added with :func:`defer_options`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlprompt import __version__
from vlprompt.errors import ConfigError, VlpromptError

# Modules that provide ``register(subparsers)``. Listed explicitly: no import side effects register anything.
COMMAND_MODULES = [
    "vlprompt.cli.data",
    "vlprompt.cli.bench",
    "vlprompt.cli.train",
    "vlprompt.cli.compat",
    "vlprompt.cli.experiments",
    "vlprompt.cli.use",
    "vlprompt.cli.toyworld",
    "vlprompt.cli.demo",
]

# CPU threads of the heavy commands. One: on a 2-core machine whose cores other jobs share, torch's default (one
# thread per core) ran 1.6-3.9 times slower than one thread, which lost about a fifth when the machine was idle
# (docs/benchmarks.md, "CPU threads"; benchmarks/bench_threads.py).
DEFAULT_THREADS = 1


# What --backbone accepts, for every command that has it; each adds its own default.
BACKBONE_HELP = ("an open_clip architecture, e.g. ViT-B-16-quickgelu, or 'toy': the small CLIP bundled with vlprompt "
                 "(no download), pretrained only on the generated toy world for `vlprompt demo` and for trying the "
                 "commands offline; it does not recognise real photographs")


class CommandParser(argparse.ArgumentParser):
    """The parser of one command: options registered with :func:`defer_options` are added the first time it
    parses or prints help, so that building the whole ``vlprompt`` parser imports nothing heavy."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list = []

    def complete(self) -> "CommandParser":
        """Add the deferred options now (parsing and help do it on their own)."""
        while self._deferred:
            self._deferred.pop(0)(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.complete()
        return super().format_help()

    def format_usage(self) -> str:
        self.complete()
        return super().format_usage()


def defer_options(parser: argparse.ArgumentParser, add_options) -> None:
    """Run ``add_options(parser)`` when ``parser`` is first used (at once for a plain ``ArgumentParser``)."""
    if isinstance(parser, CommandParser):
        parser._deferred.append(add_options)
    else:
        add_options(parser)


def add_alias(parser: argparse.ArgumentParser, alias: str, option: str) -> None:
    """Accept ``alias``, an earlier spelling of ``option``, for one more release: it parses exactly as ``option``
    (required options included) and help shows only ``option``."""
    parser._option_string_actions[alias] = parser._option_string_actions[option]


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``, shared by every command that computes; :func:`main` applies it before the command runs."""
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help=f"CPU threads for torch and for worker processes (default: $OMP_NUM_THREADS if set, "
                        f"else {DEFAULT_THREADS}, which stays fast when other jobs share the cores; 0: leave it to "
                        "torch, one per core)")


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (torch's default) or more threads, got {value}")
    return value


def resolve_threads(threads: int | None) -> int | None:
    """The thread count a ``--threads`` value means: itself, else ``$OMP_NUM_THREADS``, else
    :data:`DEFAULT_THREADS`; ``None`` for 0 (leave it to torch)."""
    if threads is None:
        try:
            threads = int(os.environ.get("OMP_NUM_THREADS", ""))
        except ValueError:
            threads = DEFAULT_THREADS
        threads = threads if threads >= 1 else DEFAULT_THREADS
    return threads or None


def apply_threads(threads: int | None) -> int:
    """Use ``resolve_threads(threads)`` CPU threads in this process (intra- and inter-op) and in the processes it
    starts (``OMP_NUM_THREADS``: sweep workers, data-loader workers, benchmark subprocesses). Returns the count
    torch uses."""
    import torch

    count = resolve_threads(threads)
    if count is None:
        return torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(count)
    except RuntimeError:  # allowed once per process, before any inter-op work (a second main() in one process)
        pass
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlprompt",
        description="Prompt learning for CLIP-style vision-language models.",
        epilog="`vlprompt <command> --help` describes a command. Start with `vlprompt demo` (no download).",
    )
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", parser_class=CommandParser)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def parse_key_values(pairs: list[str], option: str = "--option") -> dict:
    """``["key=value", ...]`` given to ``option`` → ``{key: value}``, each value read as YAML with YAML 1.2's
    numbers (``3`` → 3, ``2e-3`` → 0.002, ``[a, b]`` → a list, ``true`` → True; text YAML cannot read stays text;
    an empty value is ""), as ``--set`` reads its values."""
    from vlprompt.engine.config import read_yaml_value

    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}")
        values[key] = read_yaml_value(text)
    return values


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # answered without importing any command
        print(f"vlprompt {__version__}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from vlprompt.allocator import tune_cpu_allocator

    if hasattr(args, "threads"):
        args.threads = apply_threads(args.threads)
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
