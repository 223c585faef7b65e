"""``python -m vlprompt.cli.sweep_job JOBS_FILE INDEX``: run one job of a sweep in this process.

This is what :func:`vlprompt.experiments.sweep.run_sweep`'s local workers and the SLURM array tasks of
:func:`vlprompt.experiments.sweep.write_slurm` execute (also under ``torchrun``); the job itself is
:func:`vlprompt.experiments.sweep.run_job`.
"""

from __future__ import annotations

import argparse
import sys

from vlprompt.errors import VlpromptError
from vlprompt.experiments.sweep import run_job


def main(argv: list[str] | None = None) -> int:
    """``python -m vlprompt.cli.sweep_job JOBS_FILE INDEX``: run one job of a sweep (what local workers and SLURM array
    tasks execute; also under ``torchrun``)."""
    from vlprompt.engine import distributed
    from vlprompt.cli.run_options import console_logging, sigterm_interrupts, summary_line

    parser = argparse.ArgumentParser(prog="python -m vlprompt.cli.sweep_job",
                                     description="Run job INDEX of a sweep's jobs file (see `vlprompt sweep`).")
    parser.add_argument("jobs_file")
    parser.add_argument("index", type=int)
    args = parser.parse_args(argv)
    try:
        with console_logging(quiet=False), sigterm_interrupts(), distributed.session():
            results = run_job(args.jobs_file, args.index)
    except VlpromptError as error:
        print(f"vlprompt sweep job {args.index}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlprompt sweep job {args.index}: interrupted; it resumes when the sweep runs again", file=sys.stderr)
        return 130
    if distributed.launched().main:
        print(summary_line(results))
    return 0


if __name__ == "__main__":  # pragma: no cover - the job entry point
    sys.exit(main())
