"""Checkpoints that are small, safe to load, and written so that a crash or a full disk damages nothing.

A training checkpoint (``checkpoint.pt``) holds only tensors and plain Python values, so it loads with
``torch.load(path, weights_only=True)``:

* ``prompts`` — :meth:`PromptMethod.prompt_state_dict` (the learned tensors only, never the frozen backbone);
* ``optimizer`` / ``schedule`` / ``scaler`` — the state of the current stage's SGD, schedule and grad scaler;
* ``stage`` / ``stage_names`` / ``epoch`` — the stage index, every stage's name, and the number of completed
  epochs in the current stage;
* ``rng`` — Python, NumPy, torch (CPU and CUDA) and sampler generator states as tensors, so a resumed run
  draws exactly the numbers an uninterrupted one would;
* ``counters`` — skipped steps and the like;
* ``history`` — the record of every epoch trained so far (the lines of ``metrics.jsonl``). The checkpoint is
  the truth about what was trained: ``metrics.jsonl`` is appended after each checkpoint and, on resume,
  rewritten from this list (:meth:`vlprompt.engine.runs.RunFolder.restore_metrics`), so a crash between the
  two writes, or in the middle of an append, can neither lose an epoch record nor keep one the checkpoint
  does not have. :func:`load_checkpoint` refuses a file that lacks any of these fields.

The final prompts are exported as ``prompts.safetensors`` with a JSON metadata header (method, options, class
names, backbone, library version) — the file ``vlprompt eval`` and other tools read.

Writing. Every file is first serialized in memory, then written to a temporary ``.<name>.<random>.tmp`` in the
same folder, flushed to the disk and renamed onto its name (:func:`atomic_write`): a reader sees the old file
or the new one, never a mix. A kill between the two steps leaves only the temporary file, which the next run
of the folder removes. Files are created with mode 0666 less the user's umask, like any other file the user
writes. A full disk or quota is one :class:`~vlprompt.errors.StorageError` ("no space left on device while
writing PATH"): the temporary file is removed and the file it was to replace is untouched. Appends
(:func:`append_text`) are whole lines or nothing: a failed append cuts the file back to its previous length.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import random
import secrets
from typing import Any, Iterator

import numpy as np
import torch

from vlprompt.errors import CheckpointError, StorageError

CHECKPOINT_FORMAT = "vlprompt.checkpoint/1"


@contextlib.contextmanager
def storage_errors(path: str) -> Iterator[None]:
    """Turn a full disk or quota while writing ``path`` into one :class:`StorageError` line."""
    try:
        yield
    except OSError as error:
        reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
        if error.errno not in reasons:
            raise
        raise StorageError(f"{reasons[error.errno]} while writing {path}; nothing already written was "
                           f"changed: free some space and run the same command again") from None


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def _create_temporary(path: str) -> tuple[int, str]:
    """A new, empty ``.<name>.<random>.tmp`` next to ``path`` (mode 0666 less the umask) and its descriptor."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), temporary
        except FileExistsError:
            continue


def atomic_write(path: str, data: bytes) -> None:
    """Put ``data`` into ``path`` all at once: readers see the old file or the new one, never a part."""
    with storage_errors(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        descriptor, temporary = _create_temporary(path)
        try:
            try:
                _write_all(descriptor, data)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
            raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def append_text(path: str, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing) whole or not at all: a failed write (full disk,
    interruption) cuts the file back to its length before."""
    with storage_errors(path):
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            length = os.fstat(descriptor).st_size
            try:
                _write_all(descriptor, text.encode("utf-8"))
                os.fsync(descriptor)
            except BaseException:
                os.ftruncate(descriptor, length)
                raise
        finally:
            os.close(descriptor)


# --------------------------------------------------------------------------------------------- RNG states


def capture_rng(sampler_generator: torch.Generator | None = None) -> dict[str, Any]:
    """All random states a training run draws from, as tensors."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
    }
    version, internal, gauss_next = random.getstate()
    state["python"] = torch.tensor(internal, dtype=torch.int64)
    state["python_meta"] = [int(version), gauss_next]
    numpy_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(numpy_state[1].astype(np.int64))
    state["numpy_meta"] = [int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if sampler_generator is not None:
        state["sampler"] = sampler_generator.get_state()
    return state


def restore_rng(state: dict[str, Any], sampler_generator: torch.Generator | None = None) -> None:
    version, gauss_next = state["python_meta"]
    random.setstate((version, tuple(state["python"].tolist()), gauss_next))
    torch.set_rng_state(state["torch"])
    position, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if sampler_generator is not None and "sampler" in state:
        sampler_generator.set_state(state["sampler"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (what the original engine does before building the dataset)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------- files


CHECKPOINT_FIELDS = {"stage": int, "stage_names": list, "epoch": int, "prompts": dict, "optimizer": dict,
                     "schedule": dict, "scaler": dict, "rng": dict, "counters": dict, "history": list}


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (``state`` must hold tensors and plain values only)."""
    buffer = io.BytesIO()
    torch.save(dict(state, format=CHECKPOINT_FORMAT), buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True`` (no code is executed) and check its fields."""
    fix = "delete it or use --overwrite to start the run again"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # it names classes or functions: say which (read as data, never imported)
        from vlprompt.weights.unpickler import pickled_code_refusal, pickled_names

        raise pickled_code_refusal(path, pickled_names(path) or ["unsupported objects"], fix) from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user-facing checkpoint error
        raise CheckpointError(f"{path}: not a readable vlprompt checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint; {fix}")
    missing = [name for name in CHECKPOINT_FIELDS if name not in state]
    wrong = [name for name, kind in CHECKPOINT_FIELDS.items() if name in state and not isinstance(state[name], kind)]
    if missing or wrong:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has the wrong type for {', '.join(wrong)}"] if wrong else [])
        raise CheckpointError(f"{path}: the checkpoint {' and '.join(problems)} (written by another vlprompt "
                              f"version, or damaged); {fix}")
    return state


def save_prompts(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Export learned tensors as safetensors; ``metadata`` (JSON-able) goes into the file header."""
    from safetensors.torch import save

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    header = {"vlprompt": json.dumps(metadata, sort_keys=True)}
    atomic_write(path, save(contiguous, metadata=header))


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def load_prompts(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a ``prompts.safetensors`` file; a tensor holding NaN or infinity is refused
    (every prediction made with it would be ``nan``)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; train the run first (vlprompt train/run)")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("vlprompt", "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    for name in non_finite_tensors(tensors):
        values = tensors[name]
        raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values ({int(values.isnan().sum())} NaN, "
                              f"{int(values.isinf().sum())} infinite of {values.numel()}); the prompts of a "
                              f"diverged training cannot be used — train again (e.g. with a lower optim.lr)")
    return tensors, metadata
