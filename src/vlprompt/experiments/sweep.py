"""Sweeps: many runs at once, on parallel local worker processes or as a job list for a cluster scheduler.

A sweep is a list of run configs, usually the grid protocols × methods × datasets × shots × seeds
(:func:`expand_grid`). :func:`run_sweep` runs it with N worker processes on this machine (one GPU each when there
are GPUs, through ``CUDA_VISIBLE_DEVICES``); :func:`write_slurm` writes the same jobs as a SLURM array instead.
Each job is one run folder, run by ``python -m vlprompt.cli.sweep_job JOBS_FILE INDEX`` in a fresh process: a finished
run is skipped and an interrupted one resumes from its last epoch (:func:`vlprompt.experiments.protocols.run_experiment`), so
running a sweep again after an interruption (Ctrl-C, a crash, a pre-empted cluster job) finishes exactly what is
missing. ``vlprompt report OUTPUT`` then builds the tables from the run folders.

Files, in ``<output>/sweep/``:

``jobs-<id>.jsonl``     the runs still to do when the sweep started, one JSON line each (run folder, full config);
                        ``<id>`` is a hash of the list, so a new sweep never changes the file of a running one
``slurm-<id>.sh``       the SLURM array script (:func:`write_slurm`)
``events.jsonl``        when each local job started and ended, its device and exit status
``logs/<id>-<n>.log``   each local job's output (SLURM tasks: ``logs/slurm-<id>-<n>.out``)

A grid file (YAML)::

    protocols: [few_shot]          # or protocol: few_shot
    methods: [coop, align]
    datasets: [dtd, eurosat]       # default: the protocol's datasets
    shots: [1, 2, 4, 8, 16]        # default: the protocol's shot counts
    seeds: [1, 2, 3]               # default: 1, 2, 3
    preset: default
    config:                        # config values for every run, as in a --config file
      output: runs
      data: {root: ~/data}
    set: [optim.epochs=2]          # KEY=VALUE overrides for every run, as --set
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import IO, Any, Mapping, Sequence

from vlprompt.engine.checkpoint import atomic_write_text
from vlprompt.engine.config import RunConfig, load_yaml, merge, validate
from vlprompt.engine.runs import RunFolder, run_dir
from vlprompt.errors import ConfigError

log = logging.getLogger("vlprompt")

GRID_KEYS = ("protocols", "protocol", "methods", "datasets", "shots", "seeds", "preset", "config", "set")
JOB_FORMAT = "vlprompt.sweep/1"
STOP_GRACE_SECONDS = 60  # how long interrupted jobs get to exit before they are killed


@dataclass
class JobOutcome:
    """What a sweep did with one run.

    ``status``: ``finished_before`` (skipped), ``done``, ``failed`` (the job exited with ``returncode`` ≠ 0; its
    output is in ``log_file``), ``interrupted`` (stopped with the sweep; it resumes next time) or ``not_run``.
    """

    config: RunConfig
    run_dir: str
    status: str
    returncode: int | None = None
    seconds: float = 0.0
    log_file: str | None = None
    device: str | None = None


# --------------------------------------------------------------------------------------------- the grid


def expand_grid(grid: Mapping[str, Any] | str, *, config_file: str | None = None, overrides: Sequence[str] = (),
                cli: Mapping[str, Any] | None = None) -> list[RunConfig]:
    """The validated configs of a grid (a mapping, or the path of a YAML grid file; keys in the module docstring).

    Args:
        grid: protocols × methods × datasets × shots × seeds, plus ``preset``, ``config`` and ``set`` for every run.
        config_file, cli, overrides: as in :func:`vlprompt.engine.config.build_config`; ``cli`` wins over the
            grid's ``config``, ``overrides`` come after the grid's ``set``.
    """
    from vlprompt.experiments.protocols import plan

    if isinstance(grid, (str, os.PathLike)):
        grid = load_yaml(os.fspath(grid))
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep grid key(s) {', '.join(unknown)}; allowed: {', '.join(GRID_KEYS)}")
    protocols = _names(grid.get("protocols", grid.get("protocol")), "protocols")
    methods = _names(grid.get("methods"), "methods")
    if not protocols or not methods:
        raise ConfigError("a sweep needs protocols and methods (grid keys protocols:, methods:, or the options "
                          "--protocols, --methods)")
    shared = grid.get("config") or {}
    if not isinstance(shared, Mapping):
        raise ConfigError("the sweep grid's config: must be a mapping of config values")
    grid_overrides = grid.get("set") or []
    grid_overrides = [grid_overrides] if isinstance(grid_overrides, str) else _names(grid_overrides, "set")
    configs = []
    for protocol in protocols:
        configs += plan(protocol, methods=methods, datasets=_names(grid.get("datasets"), "datasets") or None,
                        shots=_integers(grid.get("shots"), "shots") or None,
                        seeds=_integers(grid.get("seeds"), "seeds") or None,
                        preset=str(grid.get("preset") or "default"), config_file=config_file,
                        overrides=[*grid_overrides, *overrides], cli=merge(dict(shared), cli or {}))
    _check_distinct(configs)
    return configs


def _names(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    raise ConfigError(f"sweep grid key {key} must be a list or a comma-separated string, got {value!r}")


def _integers(value: Any, key: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    try:
        return [int(item) for item in _names(value, key)]
    except ValueError:
        raise ConfigError(f"sweep grid key {key} must hold integers, got {value!r}") from None


def _check_distinct(configs: Sequence[RunConfig]) -> None:
    counts = collections.Counter(run_dir(config) for config in configs)
    twice = [folder for folder, count in counts.items() if count > 1]
    if twice:
        raise ConfigError(f"{len(twice)} run folder(s) appear more than once in the sweep, e.g. {twice[0]}; runs "
                          f"that differ only in other settings need a tag (--tag or tag: in the config)")


# --------------------------------------------------------------------------------------------- jobs


def default_sweep_dir(configs: Sequence[RunConfig]) -> str:
    return os.path.join(configs[0].output, "sweep")


def default_devices() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [entry.strip() for entry in visible.split(",") if entry.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def write_jobs(configs: Sequence[RunConfig], *, overwrite: bool = False,
               sweep_dir: str | None = None) -> tuple[str, list[int]]:
    """Write the jobs file of the runs still to do; return its path and their positions in ``configs``.

    ``overwrite`` clears the run folders first (then every run is to do, and a job interrupted later resumes
    rather than starting again); a folder another process works on is an error. A folder holding a run with
    other settings (finished or not) is an error before anything runs.
    """
    _check_distinct(configs)
    folders = [RunFolder(run_dir(config)) for config in configs]
    if overwrite:
        for folder in folders:
            if folder.started:
                with folder.locked():
                    folder.clear()
    for folder, config in zip(folders, configs):
        conflict = folder.conflict(config)
        if conflict:
            raise ConfigError(conflict)
    todo = [position for position, folder in enumerate(folders) if not folder.finished]
    lines = [json.dumps({"format": JOB_FORMAT, "index": index, "run_dir": folders[position].path,
                         "config": configs[position].to_dict()}, sort_keys=True)
             for index, position in enumerate(todo)]
    text = "".join(line + "\n" for line in lines)
    jobs_id = hashlib.sha256(text.encode()).hexdigest()[:10]
    path = os.path.join(sweep_dir or default_sweep_dir(configs), f"jobs-{jobs_id}.jsonl")
    atomic_write_text(path, text)
    return path, todo


def read_job(jobs_file: str, index: int) -> dict[str, Any]:
    """Job ``index`` (0-based line) of a jobs file."""
    try:
        with open(jobs_file, encoding="utf-8") as handle:
            lines = [line for line in handle if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"jobs file {jobs_file} does not exist") from None
    if not 0 <= index < len(lines):
        raise ConfigError(f"{jobs_file} holds jobs 0..{len(lines) - 1}, not {index}")
    job = json.loads(lines[index])
    if job.get("format") != JOB_FORMAT or job.get("index") != index:
        raise ConfigError(f"{jobs_file} line {index + 1} is not job {index} of a {JOB_FORMAT} jobs file")
    return job


def run_job(jobs_file: str, index: int) -> dict[str, Any]:
    """Run (resume, or skip if finished) job ``index`` of a jobs file in this process; return its results.

    Under ``torchrun`` every rank calls this and the run is data-parallel.
    """
    from vlprompt.experiments.protocols import run_experiment

    config = RunConfig.from_dict(read_job(jobs_file, index)["config"])
    validate(config)
    config.progress = False  # job output goes to a log file
    return run_experiment(config)


def _jobs_id(jobs_file: str) -> str:
    return os.path.basename(jobs_file)[len("jobs-"):-len(".jsonl")]


# --------------------------------------------------------------------------------------------- local workers


def run_sweep(configs: Sequence[RunConfig], *, workers: int | None = None, devices: Sequence[str] | None = None,
              launcher: Sequence[str] | None = None, overwrite: bool = False, sweep_dir: str | None = None,
              poll_seconds: float = 0.2) -> list[JobOutcome]:
    """Run every config as its own job process, ``workers`` at a time; return one outcome per config, in order.

    Args:
        configs: run configs (from :func:`expand_grid`, :func:`vlprompt.experiments.protocols.plan`…), one run folder each.
        workers: parallel jobs (default: one per device, else 1).
        devices: ``CUDA_VISIBLE_DEVICES`` values handed to the workers in turn (``"0"``, ``"1"``…; ``"0,1"`` for
            jobs that use two GPUs with a ``torchrun`` launcher); default: one per visible GPU, none without CUDA.
            Several workers may share a device when ``workers`` > ``len(devices)``.
        launcher: the command that starts a job's Python, followed by ``-m vlprompt.cli.sweep_job JOBS_FILE INDEX``
            (default: this interpreter); e.g. ``["torchrun", "--standalone", "--nproc-per-node", "2"]`` for
            data-parallel jobs.
        overwrite: clear the runs' folders first, so every run starts again.
        sweep_dir: jobs file, events and logs (default ``<output of the first config>/sweep``).

    Finished runs are not started. A job that fails does not stop the others (see its ``log_file``).
    Interrupting the sweep (Ctrl-C; SIGTERM under the CLI) stops the running jobs — each keeps its last
    per-epoch checkpoint — and raises ``KeyboardInterrupt``; running the sweep again finishes what is missing.
    """
    configs = list(configs)
    if not configs:
        return []
    sweep_dir = sweep_dir or default_sweep_dir(configs)
    devices = default_devices() if devices is None else list(devices)
    workers = workers or max(len(devices), 1)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    jobs_file, todo = write_jobs(configs, overwrite=overwrite, sweep_dir=sweep_dir)
    jobs_id = _jobs_id(jobs_file)
    command = [*(launcher or [sys.executable]), "-m", "vlprompt.cli.sweep_job", os.path.abspath(jobs_file)]
    outcomes = [JobOutcome(config, run_dir(config), "finished_before") for config in configs]
    for position in todo:
        outcomes[position].status = "not_run"
    log.info("sweep: %d run(s), %d finished before, %d to do on %d worker(s)%s; jobs: %s", len(configs),
             len(configs) - len(todo), len(todo), min(workers, max(len(todo), 1)),
             f" (devices {', '.join(devices)})" if devices else "", jobs_file)
    events = _EventLog(os.path.join(sweep_dir, "events.jsonl"), jobs_id)
    pending = collections.deque(enumerate(todo))
    running: dict[int, _Job] = {}  # worker slot -> its job
    try:
        while pending or running:
            for slot in range(workers):
                if slot not in running and pending:
                    index, position = pending.popleft()
                    device = devices[slot % len(devices)] if devices else None
                    running[slot] = _Job.start(command, index, outcomes[position], device, sweep_dir, jobs_id)
                    events.write("start", running[slot])
            ended = [slot for slot, job in running.items() if job.process.poll() is not None]
            for slot in ended:
                job = running.pop(slot)
                job.finish("done" if job.process.returncode == 0 else "failed")
                events.write("end", job)
                log.info("[%d/%d] %s %s (%.1f s)%s", len(todo) - len(pending) - len(running), len(todo),
                         job.outcome.status, job.outcome.run_dir, job.outcome.seconds,
                         f"; exit status {job.outcome.returncode}, log {job.outcome.log_file}"
                         if job.outcome.status == "failed" else "")
            if not ended:
                time.sleep(poll_seconds)
    except BaseException:
        _stop(list(running.values()), events)
        raise
    return outcomes


@dataclass
class _Job:
    process: subprocess.Popen
    index: int
    outcome: JobOutcome
    started: float
    output: IO[bytes]

    @classmethod
    def start(cls, command: list[str], index: int, outcome: JobOutcome, device: str | None, sweep_dir: str,
              jobs_id: str) -> "_Job":
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        outcome.log_file = os.path.join(sweep_dir, "logs", f"{jobs_id}-{index:04d}.log")
        outcome.device = device
        os.makedirs(os.path.dirname(outcome.log_file), exist_ok=True)
        output = open(outcome.log_file, "ab")  # noqa: SIM115 - closed in finish()
        process = subprocess.Popen([*command, str(index)], stdout=output, stderr=subprocess.STDOUT, env=env)
        return cls(process, index, outcome, time.monotonic(), output)

    def finish(self, status: str) -> None:
        self.output.close()
        self.outcome.status = status
        self.outcome.returncode = self.process.returncode
        self.outcome.seconds = round(time.monotonic() - self.started, 3)


def _stop(jobs: list[_Job], events: "_EventLog") -> None:
    """Ask running jobs to stop (SIGTERM: they stop like Ctrl-C), kill those still running after a grace time."""
    for job in jobs:
        if job.process.poll() is None:
            job.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for job in jobs:
        try:
            job.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
        job.finish("interrupted")
        events.write("interrupted", job)
    if jobs:
        log.warning("sweep interrupted: %d running job(s) stopped; run the sweep again to finish it", len(jobs))


class _EventLog:
    """``events.jsonl``: one line per job start and end (what ran, where, when, how it ended)."""

    def __init__(self, path: str, jobs_id: str):
        self.path, self.jobs_id = path, jobs_id
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, event: str, job: _Job) -> None:
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                  "sweep": self.jobs_id, "event": event, "job": job.index, "run_dir": job.outcome.run_dir,
                  "device": job.outcome.device, "pid": job.process.pid}
        if event != "start":
            record.update(status=job.outcome.status, returncode=job.outcome.returncode,
                          seconds=job.outcome.seconds)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def read_events(sweep_dir: str) -> list[dict[str, Any]]:
    """The records of ``<sweep_dir>/events.jsonl`` (empty if no local job ran yet)."""
    path = os.path.join(sweep_dir, "events.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --------------------------------------------------------------------------------------------- SLURM


def write_slurm(configs: Sequence[RunConfig], *, overwrite: bool = False, gpus_per_job: int = 1,
                max_parallel: int | None = None, options: Sequence[str] = (), launcher: Sequence[str] | None = None,
                sweep_dir: str | None = None) -> tuple[str | None, str, int]:
    """Write the jobs file and a SLURM array script with one task per run still to do.

    Args:
        gpus_per_job: GPUs per task (``--gres=gpu:N``); with more than one, each task is a data-parallel
            ``torchrun --standalone`` job over its GPUs.
        max_parallel: at most this many tasks at once (``--array=0-N%max``).
        options: extra ``#SBATCH`` options, e.g. ``["--partition=gpu", "--time=04:00:00"]``.
        launcher: the command that starts each task's Python (default: this interpreter, or torchrun).

    Returns:
        ``(script path or None when every run is finished, jobs file, number of tasks)``. The script runs
        ``srun LAUNCHER -m vlprompt.cli.sweep_job JOBS_FILE $SLURM_ARRAY_TASK_ID`` in the current directory; submitting it
        again (after failures or pre-emption) skips finished runs and resumes interrupted ones.
    """
    configs = list(configs)
    if not configs:
        raise ConfigError("the sweep has no runs")
    for option in options:
        if not option.startswith("-"):
            raise ConfigError(f"a SLURM option looks like --partition=gpu, got {option!r}")
    sweep_dir = sweep_dir or default_sweep_dir(configs)
    jobs_file, todo = write_jobs(configs, overwrite=overwrite, sweep_dir=sweep_dir)
    if not todo:
        return None, jobs_file, 0
    jobs_id = _jobs_id(jobs_file)
    if launcher is None:
        launcher = [sys.executable]
        if gpus_per_job > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus_per_job}"]
    cpus = (max(config.data.num_workers for config in configs) + 1) * max(gpus_per_job, 1)
    logs = os.path.abspath(os.path.join(sweep_dir, "logs"))
    os.makedirs(logs, exist_ok=True)
    script = os.path.join(sweep_dir, f"slurm-{jobs_id}.sh")
    lines = [
        "#!/bin/bash",
        f"# vlprompt sweep: {len(todo)} run(s) to do ({len(configs) - len(todo)} of {len(configs)} finished before), "
        "one array task each.",
        f"# Submit with: sbatch {script}",
        "# Submitting again after failures or pre-emption skips finished runs and resumes interrupted ones.",
        f"# Then: vlprompt report {configs[0].output}",
        "#SBATCH --job-name=vlprompt-sweep",
        f"#SBATCH --array=0-{len(todo) - 1}" + (f"%{max_parallel}" if max_parallel else ""),
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        *([f"#SBATCH --gres=gpu:{gpus_per_job}"] if gpus_per_job > 0 else []),
        f"#SBATCH --output={logs}/slurm-{jobs_id}-%a.out",
        *(f"#SBATCH {option}" for option in options),
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f"srun {shlex.join([*launcher, '-m', 'vlprompt.cli.sweep_job', os.path.abspath(jobs_file)])} "
        '"$SLURM_ARRAY_TASK_ID"',
        "",
    ]
    atomic_write_text(script, "\n".join(lines))
    os.chmod(script, 0o755)
    return script, jobs_file, len(todo)


__all__ = ["JobOutcome", "expand_grid", "read_events", "read_job", "run_job", "run_sweep", "write_jobs",
           "write_slurm"]
