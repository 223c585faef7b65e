"""What the commands that run experiments share (``train``, ``run``, ``eval``, ``sweep``, ``reproduce``, ``demo`` and
each sweep job): the run options (``--config``, ``--set``, ``--data-root``, ...) and their readers, log lines on the
console above the progress bars, SIGTERM as an interruption, and the one-line summary of a finished run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Iterator

from vlprompt.cli import BACKBONE_HELP, add_threads_option

log = logging.getLogger("vlprompt")


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default",
                        help="preset variant: default (the original code's values) or paper (the paper's, where "
                        "they differ); see docs/reproduce.md")
    parser.add_argument("--config", dest="config_file", help="YAML file with config values (see --print-config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.002 --set method.options.beta=0.5")
    parser.add_argument("--backbone", help=f"{BACKBONE_HELP} (default ViT-B-16-quickgelu)")
    parser.add_argument("--pretrained", help="open_clip tag (default openai), a local weights file, or 'none' "
                        "(random weights)")
    parser.add_argument("--data-root", help="folder holding the datasets (custom_folder: the dataset folder)")
    parser.add_argument("--targets", type=names_option, help="transfer targets (cross protocols), name or name@root")
    parser.add_argument("--output", help="runs folder (default: runs)")
    parser.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="autocast precision (default fp32)")
    parser.add_argument("--tag", help="suffix that keeps runs with other settings apart (ablations)")
    parser.add_argument("--overwrite", action="store_true", help="discard existing run folders and start again")
    parser.add_argument("--quiet", action="store_true", help="no progress bars; warnings only")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config(s) as YAML and exit")
    add_threads_option(parser)


# --------------------------------------------------------------------------------------------- argument types


def int_option(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def ints_option(text: str) -> list[int]:
    return [int_option(part) for part in text.split(",") if part.strip()]


def names_option(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """Nested config values from the dedicated options that were given."""
    values: dict[str, Any] = {}
    if args.backbone is not None:
        values.setdefault("backbone", {})["name"] = args.backbone
    if args.pretrained is not None:
        values.setdefault("backbone", {})["pretrained"] = None if args.pretrained.lower() == "none" else args.pretrained
    if args.data_root is not None:
        values.setdefault("data", {})["root"] = os.path.expanduser(args.data_root)
    if args.targets is not None:
        values.setdefault("eval", {})["targets"] = args.targets
    for key in ("output", "device", "precision", "tag"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.quiet:
        values["progress"] = False
    return values


class _TqdmHandler(logging.Handler):
    """Writes log lines above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextlib.contextmanager
def console_logging(quiet: bool) -> Iterator[None]:
    """Log lines on stderr while a command runs (warnings only with --quiet; errors only on the ranks > 0 of a
    ``torchrun`` launch, which repeat rank 0's lines)."""
    from vlprompt.engine.distributed import launched

    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.ERROR if not launched().main else logging.WARNING if quiet else logging.INFO)
    log.addHandler(handler)
    previous = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler set up by another library must not print every line twice
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(previous[0])
        log.propagate = previous[1]


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Treat SIGTERM (a scheduler pre-empting the job) like Ctrl-C: stop cleanly; re-running resumes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary_line(results: dict[str, Any]) -> str:
    numbers = ", ".join(f"{key} {'n/a' if value is None else f'{value:.2f}'}"  # None: not available
                        for key, value in results["metrics"].items())
    return (f"{results['protocol']} {results['dataset']} {results['method']} shots {results['shots']} "
            f"seed {results['seed']}: {numbers}")
