"""``vlprompt reproduce``: run a published table's grid and compare every cell with the paper.

Examples::

    vlprompt reproduce --list
    vlprompt reproduce align-fewshot --data-root ~/data --workers 4
    vlprompt reproduce align-fewshot --preset paper --explain
    vlprompt reproduce maple-base2new --estimate
    vlprompt reproduce align-fewshot --methods align --datasets dtd,eurosat --shots 16 --seeds 1,2 --data-root ~/data
"""

from __future__ import annotations

import argparse
import sys

from vlprompt.cli.train import (
    _cli_values,
    _common_arguments,
    _ints,
    _names,
    console_logging,
    sigterm_interrupts,
)
from vlprompt.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="run a published table's grid and compare every cell with the paper",
        description="Run every (method, dataset, shots, seed) of a published table with the right presets, skipping "
        "finished runs and resuming unfinished ones, then write the report with our mean ± std beside the paper's "
        "value for every cell (OUTPUT/reproduce/TABLE/). --list shows the tables, --explain what the presets "
        "change, --estimate the expected time on one GPU.")
    parser.add_argument("table", nargs="?", help="table name or alias (see --list)")
    parser.add_argument("--list", action="store_true", help="list the tables, their grids and reference coverage")
    parser.add_argument("--explain", action="store_true",
                        help="list where the original code's and the paper's presets differ for this grid, run nothing")
    parser.add_argument("--estimate", action="store_true",
                        help="print the expected time on one GPU (assumed throughput), run nothing")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")
    parser.add_argument("--methods", type=_names, help="only these of the table's methods")
    parser.add_argument("--datasets", type=_names,
                        help="only these datasets (others, e.g. toy-world ones, run without a published number)")
    parser.add_argument("--shots", type=_ints, help="only these shot counts")
    parser.add_argument("--seeds", type=_ints, help="seeds (default: the table's, 1,2,3)")
    parser.add_argument("--workers", type=_workers, default=1,
                        help="parallel runs through the sweep runner: a number, or 'auto' (one per visible GPU); "
                        "default 1 (one after another in this process)")
    parser.add_argument("--report-out", help="report folder (default OUTPUT/reproduce/TABLE)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    _common_arguments(parser)
    parser.set_defaults(func=run_reproduce)


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--workers must be >= 1, got {value}")
    return value


def run_reproduce(args: argparse.Namespace) -> int:
    from vlprompt.experiments import reproduce
    from vlprompt.engine.config import to_yaml
    from vlprompt.engine.runs import RunFolder, run_dir

    if args.list:
        print(_listing(reproduce.tables()), end="")
        return 0
    if not args.table:
        raise ConfigError("name a table (see `vlprompt reproduce --list`)")
    options = dict(preset=args.preset, methods=args.methods, datasets=args.datasets, shots=args.shots,
                   seeds=args.seeds, config_file=args.config_file, overrides=args.overrides, cli=_cli_values(args))
    plan = reproduce.plan(args.table, **options)
    if args.explain or args.estimate:
        if args.explain:
            print(reproduce.explain(plan), end="")
        if args.estimate:
            print(reproduce.estimate(plan), end="")
        return 0
    if args.print_config:
        print("---\n".join(to_yaml(config) for config in plan.configs), end="")
        return 0
    if args.dry_run:
        for config in plan.configs:
            print(f"{RunFolder(run_dir(config)).status():9} {run_dir(config)}")
        return 0
    with console_logging(args.quiet), sigterm_interrupts():
        markdown, files, _ = reproduce.reproduce(args.table, workers=args.workers, overwrite=args.overwrite,
                                                 report_out=args.report_out, plots=not args.no_plots, **options)
    print(markdown, end="")
    for file in files:
        print(f"wrote {file}", file=sys.stderr)
    return 0


def _listing(tables) -> str:
    lines = []
    for table in tables:
        aliases = f" (alias {', '.join(table.aliases)})" if table.aliases else ""
        grid = table.grid
        runs = len(grid["methods"]) * len(table.datasets) * len(table.shots) * len(grid.get("seeds") or (1, 2, 3))
        seeds = ", ".join(map(str, grid.get("seeds") or (1, 2, 3)))
        lines += [f"{table.name}{aliases}: {table.title}",
                  f"    {table.protocol}; methods {', '.join(grid['methods'])}; {len(table.datasets)} dataset(s); "
                  f"shots {', '.join(map(str, table.shots))}; seeds {seeds} -> {runs} runs; "
                  f"reference: {table.describe_coverage()}"]
    return "\n".join(lines) + "\n"
