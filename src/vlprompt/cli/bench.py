"""``vlprompt bench``: speed and memory of the methods at real backbone shapes (see :mod:`vlprompt.bench`)."""

from __future__ import annotations

import argparse
import sys

from vlprompt.cli import add_alias, add_threads_option, apply_threads, defer_options
from vlprompt.errors import ConfigError

USAGE_NOTE = ("Every figure is measured side by side with the plain way (full-length text, class side recomputed per "
              "test batch, one image pass per visual prompt set, no checkpointing) and given as a ratio. The full run "
              "takes about an hour on 2 CPU cores and 24 GB; --quick takes about 10 minutes.")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark training and evaluation speed and memory of the methods",
                                   description=USAGE_NOTE)
    defer_options(parser, add_arguments)  # the section names come from vlprompt.bench, which imports torch
    parser.set_defaults(func=run_bench)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vlprompt.bench import SECTIONS

    parser.add_argument("--quick", action="store_true", help="a few-minute subset (fewer methods, K and repeats)")
    parser.add_argument("--model", default="ViT-B-16", help="backbone architecture, random weights (default ViT-B-16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    add_threads_option(parser)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds for cheap configurations; K = 1000 and batch 100 run once (default 3)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--methods", help="comma-separated methods for the training and evaluation sections "
                        "(default coop,maple,align)")
    parser.add_argument("--num-classes", dest="classes", help="comma-separated class counts K (default 10,100,1000)")
    add_alias(parser, "--classes", "--num-classes")
    parser.add_argument("--json", dest="json_path", help="also write the raw results to this JSON file")
    parser.add_argument("--markdown", dest="markdown_path", help="also write the tables to this Markdown file")


def run_bench(args: argparse.Namespace) -> int:
    from vlprompt.bench import BenchSettings, run

    if args.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
    try:
        classes = tuple(int(k) for k in _split(args.classes)) or None
    except ValueError:
        raise ConfigError(f"--num-classes must be comma-separated integers, got {args.classes!r}") from None
    settings = BenchSettings(model=args.model, device=args.device, threads=args.threads, quick=args.quick,
                             repeats=args.repeats, sections=_split(args.only),
                             methods=_split(args.methods) or None,
                             classes=classes)

    def save(report) -> None:  # after every section, so that a long run interrupted late keeps its results
        if args.json_path:
            with open(args.json_path, "w") as file:
                file.write(report.to_json())
        if args.markdown_path:
            with open(args.markdown_path, "w") as file:
                file.write(report.to_markdown())

    report = run(settings, log=lambda line: print(line, file=sys.stderr, flush=True), on_section=save)
    print(report.to_markdown())
    return 0


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlprompt bench", description=USAGE_NOTE)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = "bench"
    args.threads = apply_threads(args.threads)
    try:
        return run_bench(args)
    except ConfigError as error:
        print(f"vlprompt bench: error: {error}", file=sys.stderr)
        return 2
