"""Run folders: the database the reports are built from.

One run = one (protocol, dataset, method, preset, tag, shots, seed). Its folder
``<output>/<protocol>/<dataset>/<method>[-<preset>][-<tag>]/shots_<k>/seed_<s>/`` holds:

``config.json``        the full :class:`~vlprompt.engine.config.RunConfig` (plain JSON)
``metrics.jsonl``      one JSON record per trained epoch (stage, epoch, lr, loss, accuracy, skipped steps, time)
``checkpoint.pt``      the resume state while training is unfinished (removed once the run is finished)
``prompts.safetensors`` the trained prompts, with a JSON header (method, options, class names, backbone)
``results.json``       what the run measured (accuracies per evaluated class set, per-class accuracies,
                       versions, git commit, wall time) — its presence marks the run as finished
``log.txt``            the human-readable log

A finished run is left alone unless ``overwrite``; an unfinished one resumes if its stored config matches.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from contextlib import contextmanager
from typing import Any, Iterator

from vlprompt.engine.checkpoint import atomic_write_text
from vlprompt.engine.config import DEFAULT_PRESET, RunConfig
from vlprompt.errors import ConfigError

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "prompts.safetensors", "results.json", "log.txt")


def run_name(config: RunConfig) -> str:
    """``method[-preset][-tag]`` — the folder name that tells runs of one dataset apart."""
    parts = [config.method.name]
    if config.preset != DEFAULT_PRESET:
        parts.append(config.preset)
    if config.tag:
        parts.append(config.tag)
    return "-".join(parts)


def run_dir(config: RunConfig) -> str:
    return os.path.join(config.output, config.protocol, config.data.dataset, run_name(config),
                        f"shots_{config.data.shots}", f"seed_{config.seed}")


class RunFolder:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.config_file = os.path.join(path, "config.json")
        self.metrics_file = os.path.join(path, "metrics.jsonl")
        self.checkpoint_file = os.path.join(path, "checkpoint.pt")
        self.prompts_file = os.path.join(path, "prompts.safetensors")
        self.results_file = os.path.join(path, "results.json")
        self.log_file = os.path.join(path, "log.txt")

    @property
    def finished(self) -> bool:
        return os.path.isfile(self.results_file)

    @property
    def started(self) -> bool:
        return any(os.path.exists(os.path.join(self.path, name)) for name in RUN_FILES)

    def status(self) -> str:
        """``"finished"``, ``"partial"`` (started, resumable) or ``"new"``."""
        return "finished" if self.finished else "partial" if self.started else "new"

    def prepare(self, config: RunConfig, overwrite: bool = False) -> str:
        """Get the folder ready for ``config``; return its status before (``new``/``partial``/``finished``).

        ``overwrite`` deletes the run's files first. A partial run that has trained something and whose stored config
        differs in a setting that changes results is an error naming the differing keys (resuming it would mix two
        experiments); one that failed before training simply takes the new config.
        """
        status = self.status()
        if overwrite and status != "new":
            self.clear()
            status = "new"
        if status == "finished":
            return status
        conflict = self.conflict(config)
        if conflict:
            raise ConfigError(conflict)
        os.makedirs(self.path, exist_ok=True)
        atomic_write_text(self.config_file, json.dumps(config.to_dict(), indent=2) + "\n")
        return status

    def conflict(self, config: RunConfig) -> str | None:
        """Why ``config`` cannot resume this folder (an unfinished run that trained with settings that change
        results), or None."""
        trained = os.path.isfile(self.checkpoint_file) or os.path.isfile(self.prompts_file)
        if self.finished or not trained or not os.path.isfile(self.config_file):
            return None
        stored = RunConfig.from_dict(self.read_json(self.config_file))
        differences = diff(stored.identity(), config.identity())
        if not differences:
            return None
        shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences[:4])
        return (f"{self.path} holds an unfinished run with other settings ({shown}); use --overwrite to discard it "
                f"or --tag NAME for a separate run")

    def clear(self) -> None:
        for name in RUN_FILES:
            file = os.path.join(self.path, name)
            if os.path.exists(file):
                os.remove(file)

    # ------------------------------------------------------------------ files
    @staticmethod
    def read_json(path: str) -> Any:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def config(self) -> RunConfig:
        if not os.path.isfile(self.config_file):
            raise ConfigError(f"{self.path} is not a vlprompt run folder (no config.json)")
        return RunConfig.from_dict(self.read_json(self.config_file))

    def results(self) -> dict[str, Any]:
        return self.read_json(self.results_file)

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.results_file, json.dumps(results, indent=2, allow_nan=True) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self.metrics_file):
            return []
        with open(self.metrics_file, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def keep_metrics(self, epochs_done: dict[str, int]) -> None:
        """Drop epoch records past the checkpoint (written just before an interruption): ``epochs_done`` maps
        stage name → completed epochs of the checkpoint; stages not in it keep nothing."""
        records = self.metrics()
        kept = [r for r in records if "epoch" not in r or r["epoch"] < epochs_done.get(r.get("stage"), 0)]
        if len(kept) != len(records):
            atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    @contextmanager
    def logging_to_file(self, logger: logging.Logger) -> Iterator[None]:
        """Append ``logger``'s records to ``log.txt`` while the block runs."""
        os.makedirs(self.path, exist_ok=True)
        handler = logging.FileHandler(self.log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        logger.addHandler(handler)
        previous = logger.level
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            handler.close()
            logger.setLevel(previous)


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys where two nested dicts differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        result = []
        for key in sorted(set(old) | set(new), key=str):
            result += diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return result
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def find_runs(root: str) -> list[RunFolder]:
    """Every finished run folder under ``root`` (sorted by path)."""
    found = []
    for folder, _, files in os.walk(root):
        if "results.json" in files:
            found.append(RunFolder(folder))
    return sorted(found, key=lambda run: run.path)


def environment() -> dict[str, Any]:
    """Versions of the software that produced a result, and the git commit of the library if it has one."""
    import platform

    import open_clip
    import torch
    import torchvision

    from vlprompt import __version__

    info: dict[str, Any] = {
        "vlprompt": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "python": platform.python_version(),
        "git_commit": None,
    }
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the vlprompt package
    try:
        commit = subprocess.run(["git", "-C", source, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", source, "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info
