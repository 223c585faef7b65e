"""Command-line tools for experiments: ``vlprompt sweep`` (a grid of runs on parallel workers or as a SLURM array),
``vlprompt reproduce`` (a published table's grid, every cell compared with the paper) and ``vlprompt report``
(tables from run folders).

Examples::

    vlprompt sweep grid.yaml --workers 4        # or --slurm: write a SLURM array script instead
    vlprompt report runs --compare paper

    vlprompt reproduce --list
    vlprompt reproduce align-fewshot --data-root ~/data --workers 4
    vlprompt reproduce align-fewshot --preset paper --explain
    vlprompt reproduce maple-base2new --estimate
    vlprompt reproduce align-fewshot --methods align --datasets dtd,eurosat --shots 16 --seeds 1,2 --data-root ~/data
"""

from __future__ import annotations

import argparse
import os
import sys

from vlprompt.cli.run_options import (
    cli_values,
    common_arguments,
    console_logging,
    int_option,
    ints_option,
    names_option,
    sigterm_interrupts,
)
from vlprompt.engine.config import normalize_protocol, to_yaml
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
    parser.add_argument("--methods", type=names_option, help="only these of the table's methods")
    parser.add_argument("--datasets", type=names_option,
                        help="only these datasets (others, e.g. toy-world ones, run without a published number)")
    parser.add_argument("--shots", type=ints_option, help="only these shot counts")
    parser.add_argument("--seeds", type=ints_option, help="seeds (default: the table's, 1,2,3)")
    parser.add_argument("--workers", type=_workers, default=1,
                        help="parallel runs through the sweep runner: a number, or 'auto' (one per visible GPU); "
                        "default 1 (one after another in this process)")
    parser.add_argument("--report-out", help="report folder (default OUTPUT/reproduce/TABLE)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    common_arguments(parser)
    parser.set_defaults(func=run_reproduce)

    report = subparsers.add_parser("report", help="tables (Markdown, CSV) and plots from run folders",
                                   description="Aggregate the results.json files under RUNS_DIR: mean ± std over "
                                   "seeds, base/new/H with the papers' 11-dataset average, few-shot tables, "
                                   "transfer tables. Never reads logs.")
    report.add_argument("runs_dir", help="folder searched recursively for results.json files")
    report.add_argument("--protocol", help="only this protocol")
    report.add_argument("--out", help="where report.md, CSV files and plots go (default RUNS_DIR/report)")
    report.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    report.add_argument("--ablate", default="beta", help="method option the ablation plot varies (default beta)")
    report.add_argument("--compare", choices=("paper",),
                        help="put every cell beside the published number (vlprompt.experiments.reference): ours mean ± std, "
                        "paper, difference, flagged when the paper lies outside ours ± max(2·std, 1 point)")
    report.add_argument("--table", dest="reference_tables", type=names_option,
                        help="with --compare: reference table(s) to compare with (default: every table with "
                        "matching runs; see `vlprompt reproduce --list`)")
    report.set_defaults(func=run_report)

    sweep = subparsers.add_parser("sweep", help="run a grid of runs with parallel workers, or write a SLURM array",
                                  description="Expand a grid (protocols x methods x datasets x shots x seeds) from a "
                                  "YAML file and/or the options below (options win) and run it with parallel worker "
                                  "processes, one GPU each when there are GPUs. Finished runs are skipped and "
                                  "interrupted ones resume, so re-running the same command finishes what is missing. "
                                  "--slurm writes a jobs file and a SLURM array script instead. Then: vlprompt report "
                                  "OUTPUT. Grid file keys: protocols, methods, datasets, shots, seeds, preset, config "
                                  "(config values for every run), set (KEY=VALUE overrides for every run).")
    sweep.add_argument("grid", nargs="?", help="YAML grid file (see docs/reproduce.md, 'Multi-GPU and sweeps')")
    sweep.add_argument("--protocols", "--protocol", type=names_option, help="comma-separated protocols")
    sweep.add_argument("--methods", type=names_option, help="comma-separated method names")
    sweep.add_argument("--datasets", type=names_option, help="comma-separated datasets (default: the protocol's)")
    sweep.add_argument("--shots", type=ints_option, help="comma-separated shot counts (default: the protocol's)")
    sweep.add_argument("--seeds", type=ints_option, help="comma-separated seeds (default 1,2,3)")
    sweep.add_argument("--workers", type=int_option, help="parallel local jobs (default: one per visible GPU, else 1)")
    sweep.add_argument("--devices", help="GPU ids handed to the workers in turn through CUDA_VISIBLE_DEVICES, e.g. "
                       "0,1,2,3; 0+1,2+3 gives each job two GPUs (with a torchrun --launcher) (default: every "
                       "visible GPU)")
    sweep.add_argument("--launcher", help="command that starts each job, e.g. 'torchrun --standalone "
                       "--nproc-per-node 2' (default: this Python)")
    sweep.add_argument("--slurm", action="store_true", help="write a jobs file and a SLURM array script (in "
                       "OUTPUT/sweep/) instead of running; --workers caps the array's parallel tasks")
    sweep.add_argument("--gpus-per-job", type=int_option, default=1, help="--slurm: GPUs per array task (> 1: torchrun)")
    sweep.add_argument("--slurm-option", action="append", default=[], metavar="OPTION",
                       help="--slurm: an extra #SBATCH option, e.g. --slurm-option=--partition=gpu (repeatable)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")
    common_arguments(sweep)
    sweep.set_defaults(func=run_sweep_command, preset=None)


def run_sweep_command(args: argparse.Namespace) -> int:
    import shlex

    from vlprompt.engine.config import load_yaml
    from vlprompt.engine.runs import RunFolder, run_dir
    from vlprompt.experiments.sweep import expand_grid, run_sweep, write_slurm

    grid = load_yaml(args.grid) if args.grid else {}
    if args.protocols is not None:
        grid.pop("protocol", None)
    for key in ("protocols", "methods", "datasets", "shots", "seeds", "preset"):  # the options win
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    configs = expand_grid(grid, config_file=args.config_file, overrides=args.overrides, cli=cli_values(args))
    if args.print_config:
        print("---\n".join(to_yaml(config) for config in configs), end="")
        return 0
    if args.dry_run:
        for config in configs:
            print(f"{RunFolder(run_dir(config)).status():9} {run_dir(config)}")
        return 0
    devices = [group.replace("+", ",") for group in names_option(args.devices)] if args.devices else None
    launcher = shlex.split(args.launcher) if args.launcher else None
    if args.slurm:
        script, jobs, count = write_slurm(configs, overwrite=args.overwrite, gpus_per_job=args.gpus_per_job,
                                          max_parallel=args.workers, options=args.slurm_option, launcher=launcher)
        print(f"wrote {jobs} ({count} of {len(configs)} runs to do) and {script}")
        print(f"submit with: sbatch {script}   then: vlprompt report {configs[0].output}" if count else
              "every run is finished already")
        return 0
    with console_logging(args.quiet), sigterm_interrupts():
        outcomes = run_sweep(configs, workers=args.workers, devices=devices, launcher=launcher,
                             overwrite=args.overwrite)
    failed = [o for o in outcomes if o.status == "failed"]
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "finished_before", "failed")}
    print(f"{counts['done']} run(s) done, {counts['finished_before']} finished before, {counts['failed']} failed")
    for outcome in failed:
        print(f"failed (exit status {outcome.returncode}): {outcome.run_dir}; log: {outcome.log_file}")
    print(f"tables: vlprompt report {configs[0].output}")
    return 1 if failed else 0


def run_report(args: argparse.Namespace) -> int:
    from vlprompt.experiments.report import write_report

    if not os.path.isdir(args.runs_dir):
        raise ConfigError(f"{args.runs_dir} is not a folder")
    protocol = normalize_protocol(args.protocol) if args.protocol else None
    out = args.out or os.path.join(args.runs_dir, "report")
    if args.reference_tables and not args.compare:
        raise ConfigError("--table needs --compare paper")
    markdown, files = write_report(args.runs_dir, out, protocol=protocol, plots=not args.no_plots,
                                   ablate=args.ablate, compare=args.compare, reference_tables=args.reference_tables)
    print(markdown, end="")
    for file in files:
        print(f"wrote {file}", file=sys.stderr)
    return 0


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
                   seeds=args.seeds, config_file=args.config_file, overrides=args.overrides, cli=cli_values(args))
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
