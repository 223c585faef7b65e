"""Checkpoints that are small, safe to load, and written atomically.

A training checkpoint (``checkpoint.pt``) holds only tensors and plain Python values, so it loads with
``torch.load(path, weights_only=True)``:

* ``prompts`` — :meth:`PromptMethod.prompt_state_dict` (the learned tensors only, never the frozen backbone);
* ``optimizer`` / ``schedule`` / ``scaler`` — the state of the current stage's SGD, schedule and grad scaler;
* ``stage`` / ``epoch`` — the stage index and the number of completed epochs in it;
* ``rng`` — Python, NumPy, torch (CPU and CUDA) and sampler generator states as tensors, so a resumed run
  draws exactly the numbers an uninterrupted one would;
* ``counters`` — skipped steps and the like.

The final prompts are exported as ``prompts.safetensors`` with a JSON metadata header (method, options, class
names, backbone, library version) — the file ``vlprompt eval`` and other tools read.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Callable

import numpy as np
import torch

from vlprompt.errors import CheckpointError

CHECKPOINT_FORMAT = "vlprompt.checkpoint/1"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` then move the result onto ``path`` (readers never see a partial file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


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


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (``state`` must hold tensors and plain values only)."""
    payload = dict(state, format=CHECKPOINT_FORMAT)
    atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True`` (no code is executed)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user-facing checkpoint error
        raise CheckpointError(f"{path}: not a readable vlprompt checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); delete it or use "
                              f"--overwrite") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def save_prompts(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Export learned tensors as safetensors; ``metadata`` (JSON-able) goes into the file header."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    header = {"vlprompt": json.dumps(metadata, sort_keys=True)}
    atomic_write(path, lambda temporary: save_file(contiguous, temporary, metadata=header))


def load_prompts(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a ``prompts.safetensors`` file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist; train the run first (vlprompt train/run)")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("vlprompt", "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    return tensors, metadata
