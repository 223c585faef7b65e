"""Run folders: the database the reports are built from.

One run = one experiment. Its folder
``<output>/<protocol>/<dataset>[-<data name>]/<method>[-<preset>][-<tag>][@<backbone>]/shots_<k>/seed_<s>/``
(:func:`run_dir`; ``<data name>`` only for custom datasets: the name of their folder or file; ``@<backbone>``
only for a backbone other than ViT-B-16-quickgelu with OpenAI weights) holds:

``config.json``        the full :class:`~vlprompt.engine.config.RunConfig` (plain JSON)
``identity.json``      everything the results depend on (:func:`run_identity`)
``metrics.jsonl``      one JSON record per trained epoch (stage, epoch, lr, loss, accuracy, skipped steps, time)
``checkpoint.pt``      the resume state while training is unfinished (removed once the run is finished)
``prompts.safetensors`` the trained prompts, with a JSON header (method, options, class names, backbone)
``results.json``       what the run measured (accuracies per evaluated class set, per-class accuracies,
                       versions, git commit, wall time) — its presence marks the run as finished
``log.txt``            the human-readable log
``features.safetensors``, ``features.json``  the frozen image features cached by a method that trains on them
                       (:mod:`vlprompt.engine.features`), and what they are
``.lock``              the lock of the process that works on the run (see below)

Identity. A folder is reused only by the same experiment. :func:`run_identity` is the config's
:meth:`~vlprompt.engine.config.RunConfig.identity` (method and its options, preset, tag, protocol, dataset and
its options, shots, seed, schedule, precision, crop scale, evaluation targets) with every path replaced by what
it points to, so that moving files changes nothing and changing them is noticed:

* weights: an open_clip tag stands for itself; a local weights file is its sha256 (renaming or moving it keeps
  the identity, other bytes change it); the bundled ``toy`` and ``tiny`` models are ``built-in``;
* data: a standard or toy dataset is its name — its split ships with vlprompt (or is checked against its git
  blob id) and the toy images are generated deterministically — so ``data.root`` is not part of it and the data
  may move; a custom dataset (``custom_folder``, ``custom_csv``, ``split_json``) is its content: for a folder,
  the sha256 of the list of its image files (relative path, size, modification time) and of ``classnames.txt``;
  for a file (CSV, split file, class-name file), the sha256 of its bytes.

:meth:`RunFolder.prepare` compares it with the stored ``identity.json``: the same identity resumes an unfinished
run or reports a finished one; another identity, in a folder that trained anything, is one
:class:`~vlprompt.errors.ConfigError` naming the keys that differ (``--overwrite`` discards the old run; another
``--output`` or ``--tag`` keeps both). A folder that failed before training takes the new identity.

Lock. One process at a time works on a run folder: :meth:`RunFolder.claim` holds an exclusive ``flock`` on
``.lock`` (which records pid, host and start time) from before the folder is read until the run ends; a second
process gets one :class:`~vlprompt.errors.RunInUseError` naming the holder. The kernel drops the lock when its
process dies, so a lock left by a killed process is taken over, with a warning naming it. ``vlprompt train``,
``run``, ``sweep`` (each job) and ``reproduce`` all run through :func:`vlprompt.experiments.protocols.run_experiment`, which
claims the folder; under ``torchrun`` rank 0 alone claims it and writes. Taking the lock also removes the
temporary files an interrupted write left (``.<file>.<random>.tmp``).

Kept as one module (~510 lines) on purpose: everything that reads or writes a run folder (its files, the lock,
the identity that decides whether a finished run is the same run) is here, so the folder's format has one owner.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
from contextlib import contextmanager
from typing import Any, Iterator

from vlprompt.engine.checkpoint import append_text, atomic_write_text
from vlprompt.engine.config import DEFAULT_PRESET, BackboneConfig, DataConfig, RunConfig
from vlprompt.errors import ConfigError, RunInUseError, VlpromptError

log = logging.getLogger("vlprompt")

RUN_FILES = ("config.json", "identity.json", "metrics.jsonl", "checkpoint.pt", "prompts.safetensors",
             "results.json", "log.txt", "features.safetensors", "features.json")
DEFAULT_BACKBONE = BackboneConfig()
BUILT_IN_BACKBONES = ("toy", "tiny")  # + the other tiny test configs (vlprompt.weights.TINY_CONFIGS)
FILE_OPTIONS = ("split_file", "classnames_file")  # custom-dataset options that name a file
IGNORED_DATA_OPTIONS = ("check_files",)  # options that do not change what is read


# --------------------------------------------------------------------------------------------- paths


def run_name(config: RunConfig) -> str:
    """``method[-preset][-tag][@backbone]`` — the folder name that tells runs of one dataset apart."""
    parts = [config.method.name]
    if config.preset != DEFAULT_PRESET:
        parts.append(config.preset)
    if config.tag:
        parts.append(config.tag)
    backbone = backbone_label(config.backbone)
    return "-".join(parts) + (f"@{backbone}" if backbone else "")


def dataset_label(data: DataConfig) -> str:
    """The dataset's folder name: its name, and for a custom dataset also its own (``custom_folder-flowers``)."""
    if not _is_custom(data.dataset):
        return data.dataset
    own = os.path.splitext(os.path.basename(os.path.abspath(os.path.expanduser(str(data.root)))))[0]
    return f"{data.dataset}-{_safe(own)}" if own.strip(".") else data.dataset


def backbone_label(backbone: BackboneConfig) -> str | None:
    """``name[.weights]`` for a backbone other than the default, None for the default (ViT-B-16-quickgelu,
    OpenAI weights) so that its run paths stay short."""
    if _is_built_in(backbone.name) and not _is_weights_file(backbone.pretrained):
        weights = None
    elif backbone.pretrained is None:
        weights = "random"
    elif _is_weights_file(backbone.pretrained):
        weights = os.path.splitext(os.path.basename(str(backbone.pretrained)))[0]
    else:
        weights = None if backbone.pretrained == DEFAULT_BACKBONE.pretrained else str(backbone.pretrained)
    if backbone.name == DEFAULT_BACKBONE.name and weights is None:
        return None
    return _safe(backbone.name + (f".{weights}" if weights else ""))


def run_dir(config: RunConfig) -> str:
    return os.path.join(config.output, config.protocol, dataset_label(config.data), run_name(config),
                        f"shots_{config.data.shots}", f"seed_{config.seed}")


def _safe(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text)


def _is_custom(dataset: str) -> bool:
    from vlprompt.data.custom import CUSTOM_DATASETS

    return dataset in {info.name for info in CUSTOM_DATASETS}


def _is_built_in(name: str) -> bool:
    from vlprompt.weights import TINY_CONFIGS

    return name in BUILT_IN_BACKBONES or name in TINY_CONFIGS


def _is_weights_file(pretrained: str | None) -> bool:
    from vlprompt.weights import _looks_like_path  # the rule load_clip uses to tell a file from a tag

    return pretrained is not None and _looks_like_path(pretrained)


def _weights_file(name: str, pretrained: str) -> str:
    """The file holding the weights ``pretrained`` names: itself, or for the toy backbone (which also takes the
    folder ``vlprompt toyworld pretrain`` wrote) the ``toyclip.safetensors`` in that folder."""
    if name == "toy":
        from vlprompt.weights import toy_weights_folder
        from vlprompt.toyworld.model import WEIGHTS_FILE

        return os.path.join(toy_weights_folder(pretrained), WEIGHTS_FILE)
    return str(pretrained)


# --------------------------------------------------------------------------------------------- identity


def run_identity(config: RunConfig) -> dict[str, Any]:
    """Everything the results of ``config`` depend on, with paths replaced by their content (module docstring)."""
    identity = config.identity()
    backbone, data = identity["backbone"], identity["data"]
    if _is_weights_file(config.backbone.pretrained):
        backbone["pretrained"] = content_identity(_weights_file(config.backbone.name, config.backbone.pretrained))
    elif _is_built_in(config.backbone.name):
        backbone["pretrained"] = "built-in"
    for name in IGNORED_DATA_OPTIONS:
        data["options"].pop(name, None)
    if _is_custom(config.data.dataset):
        data["root"] = content_identity(config.data.root)
        for name in FILE_OPTIONS:
            if data["options"].get(name) is not None:
                data["options"][name] = content_identity(str(data["options"][name]))
    return identity


_file_digests: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: a sweep hashes each weights file once


def content_identity(path: str) -> str:
    """``sha256:<hex>`` of a file's bytes, or ``listing-sha256:<hex>`` of a folder's image files (relative path,
    size, modification time) and its ``classnames.txt``; a missing path stands for itself (reading it fails
    later, with its own error)."""
    from vlprompt.data.base import IMAGE_EXTENSIONS

    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(path):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in _file_digests:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            _file_digests[key] = digest.hexdigest()
        return f"sha256:{_file_digests[key]}"
    if not os.path.isdir(path):
        return f"missing:{path}"
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(path, followlinks=True):
        subfolders.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) or (folder == path and name == "classnames.txt"):
                file = os.path.join(folder, name)
                stat = os.stat(file)
                digest.update(f"{os.path.relpath(file, path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    classnames = os.path.join(path, "classnames.txt")
    if os.path.isfile(classnames):
        digest.update(content_identity(classnames).encode())
    return f"listing-sha256:{digest.hexdigest()}"


def with_defaults(stored: Any, defaults: Any) -> Any:
    """``stored`` with the keys it lacks taken from ``defaults`` (nested dicts).

    A setting added to the config after a run was made did not exist for that run; the rule for adding one is that
    its default reproduces what the code did before, so the old run counts as made with the default. A missing key
    the defaults do not know (a method option) stays missing and still differs from any value given now.
    """
    if not (isinstance(stored, dict) and isinstance(defaults, dict)):
        return stored
    filled = {key: with_defaults(value, defaults.get(key)) for key, value in stored.items()}
    for key, value in defaults.items():
        filled.setdefault(key, value)
    return filled


def diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys where two nested dicts differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        result = []
        for key in sorted(set(old) | set(new), key=str):
            result += diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return result
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:28] + "…" + text[-8:]


# --------------------------------------------------------------------------------------------- the folder


class RunFolder:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.config_file = os.path.join(path, "config.json")
        self.identity_file = os.path.join(path, "identity.json")
        self.metrics_file = os.path.join(path, "metrics.jsonl")
        self.checkpoint_file = os.path.join(path, "checkpoint.pt")
        self.prompts_file = os.path.join(path, "prompts.safetensors")
        self.results_file = os.path.join(path, "results.json")
        self.log_file = os.path.join(path, "log.txt")
        self.lock_file = os.path.join(path, ".lock")

    @property
    def finished(self) -> bool:
        return os.path.isfile(self.results_file)

    @property
    def started(self) -> bool:
        return any(os.path.exists(os.path.join(self.path, name)) for name in RUN_FILES)

    @property
    def trained(self) -> bool:
        """Whether the folder holds anything trained (a checkpoint, prompts or results)."""
        return any(os.path.isfile(f) for f in (self.checkpoint_file, self.prompts_file, self.results_file))

    def status(self) -> str:
        """``"finished"``, ``"partial"`` (started, resumable) or ``"new"``."""
        return "finished" if self.finished else "partial" if self.started else "new"

    # ------------------------------------------------------------------ claiming
    @contextmanager
    def claim(self, config: RunConfig, overwrite: bool = False) -> Iterator[str]:
        """Lock the folder, get it ready for ``config`` (:meth:`prepare`) and yield its status before; the lock
        is held until the block ends."""
        with self.locked():
            yield self.prepare(config, overwrite=overwrite)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's exclusive lock while the block runs (module docstring); :class:`RunInUseError`
        if another process holds it. A finished run in a folder this user may not write is read without it."""
        try:
            os.makedirs(self.path, exist_ok=True)
            descriptor = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if not self.finished:
                raise VlpromptError(f"cannot write in run folder {self.path} ({error.strerror}); use another "
                                    f"--output") from None
            descriptor = None
        if descriptor is None:  # nothing can be written here, by this process at least: only read
            yield
            return
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise VlpromptError(f"cannot lock run folder {self.path} ({error.strerror}); this filesystem "
                                        f"does not support file locks: use an --output on a local disk") from None
                raise RunInUseError(f"{self.path} is in use by {_holder(_read_lock(descriptor))}; wait for it "
                                    f"to finish, or use another --output (or --tag) for a separate run") from None
            stale = _read_lock(descriptor)
            if stale:
                log.warning("%s: taking over the lock left by %s, which is no longer running", self.path,
                            _holder(stale))
            mine = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (json.dumps(mine) + "\n").encode(), 0)
            try:
                self.remove_temporaries()
                yield
            finally:
                os.ftruncate(descriptor, 0)  # an empty lock file: released cleanly (never unlinked: see flock(2))
        finally:
            os.close(descriptor)  # releases the lock

    def remove_temporaries(self) -> None:
        """Delete the ``.<file>.<random>.tmp`` files an interrupted write left (call with the lock held: no
        other process writes here then)."""
        stale = [name for name in os.listdir(self.path)
                 if re.fullmatch(r"\..+\.\w+\.tmp", name) and os.path.isfile(os.path.join(self.path, name))]
        for name in stale:
            os.remove(os.path.join(self.path, name))
        if stale:
            log.warning("%s: removed %d temporary file(s) left by an interrupted write: %s", self.path, len(stale),
                        ", ".join(sorted(stale)))

    def prepare(self, config: RunConfig, overwrite: bool = False) -> str:
        """Get the folder ready for ``config``; return its status before (``new``/``partial``/``finished``).

        ``overwrite`` deletes the run's files first. A folder that trained anything under another identity is
        a :class:`ConfigError` naming the differing keys (module docstring); one that failed before training
        simply takes the new config.
        """
        status = self.status()
        if overwrite and status != "new":
            self.clear()
            status = "new"
        identity = run_identity(config)
        conflict = self.conflict(config, identity)
        if conflict:
            raise ConfigError(conflict)
        if status != "finished":
            os.makedirs(self.path, exist_ok=True)
            atomic_write_text(self.config_file, json.dumps(config.to_dict(), indent=2) + "\n")
            atomic_write_text(self.identity_file, json.dumps(identity, indent=2) + "\n")
        return status

    def conflict(self, config: RunConfig, identity: dict[str, Any] | None = None) -> str | None:
        """Why ``config`` cannot use this folder (it trained something under another identity), or None."""
        if not self.trained or not os.path.isfile(self.config_file):
            return None
        identity = run_identity(config) if identity is None else identity
        stored = self.stored_identity()
        if stored is None:  # written before identity.json existed: its config is all there is to compare
            stored, identity = self.config().identity(), config.identity()
        differences = diff(with_defaults(stored, RunConfig().identity()), identity)
        if not differences:
            return None
        shown = "; ".join(f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in differences[:4])
        more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
        kind = "a finished run" if self.finished else "an unfinished run"
        return (f"{self.path} holds {kind} with other settings ({shown}{more}); use --overwrite to replace it, "
                f"or another --output (or --tag) for a separate run")

    def matches(self, config: RunConfig) -> bool:
        """Whether this folder holds a run of ``config``'s identity."""
        return os.path.isfile(self.config_file) and self.conflict(config) is None

    def stored_identity(self) -> dict[str, Any] | None:
        return self.read_json(self.identity_file) if os.path.isfile(self.identity_file) else None

    def clear(self) -> None:
        for name in RUN_FILES:
            file = os.path.join(self.path, name)
            if os.path.exists(file):
                os.remove(file)

    # ------------------------------------------------------------------ files
    @staticmethod
    def read_json(path: str) -> Any:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except json.JSONDecodeError as error:
            raise VlpromptError(f"{path} is damaged (not JSON: {error}); delete the run folder or use "
                                f"--overwrite") from None

    def config(self) -> RunConfig:
        if not os.path.isfile(self.config_file):
            raise ConfigError(f"{self.path} is not a vlprompt run folder (no config.json)")
        return RunConfig.from_dict(self.read_json(self.config_file))

    def results(self) -> dict[str, Any]:
        return self.read_json(self.results_file)

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.results_file, json.dumps(results, indent=2, allow_nan=True) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_text(self.metrics_file, json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``. A last line cut short (a crash while appending) is left out; a
        damaged line before it is an error."""
        if not os.path.isfile(self.metrics_file):
            return []
        with open(self.metrics_file, encoding="utf-8", errors="replace") as handle:
            lines = [(number, line) for number, line in enumerate(handle, 1) if line.strip()]
        records = []
        for position, (number, line) in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if position == len(lines) - 1 and not line.endswith("\n"):
                    log.warning("%s: ignoring its last line, cut short by an interruption", self.metrics_file)
                    break
                raise VlpromptError(f"{self.metrics_file} line {number} is damaged (not JSON); delete the run "
                                    f"folder or use --overwrite") from None
        return records

    def restore_metrics(self, checkpoint: dict[str, Any] | None) -> None:
        """Make ``metrics.jsonl`` hold exactly the epochs of ``checkpoint`` (its ``history``; none without a
        checkpoint) before training resumes from it — whatever a crash between the checkpoint and the metrics
        append, or in the middle of the append, left."""
        history = checkpoint["history"] if checkpoint is not None else []
        if not os.path.exists(self.metrics_file) and not history:
            return
        try:
            unchanged = self.metrics() == history and _ends_cleanly(self.metrics_file)
        except VlpromptError:
            unchanged = False  # rewritten from the checkpoint below
        if not unchanged:
            atomic_write_text(self.metrics_file, "".join(json.dumps(record) + "\n" for record in history))

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


def _read_lock(descriptor: int) -> dict[str, Any] | None:
    """The record in a lock file (None when empty, i.e. released cleanly; ``{}`` when unreadable)."""
    text = os.pread(descriptor, 4096, 0).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process"
    return f"process {record.get('pid')} on {record.get('host')} (since {record.get('since')})"


def _ends_cleanly(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


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
