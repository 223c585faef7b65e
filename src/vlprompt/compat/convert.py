"""Import checkpoints of the original code bases into our methods, and export ours in their layout."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from vlprompt.backbone import PromptableCLIP
from vlprompt.compat.mappings import Layout, layout_for
from vlprompt.weights.unpickler import load_pickled, runs_code
from vlprompt.errors import CheckpointError, ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.base import PromptMethod


@dataclass
class OriginalCheckpoint:
    """An original checkpoint translated to our names, before any model is built.

    Attributes:
        source: the source layout (``"maple"``, ``"align"``, …).
        method: our method that computes what the original computes (``"maple"``, ``"ivlp_text"``, …).
        options: the method options read off the tensor shapes (n_ctx, N, depths, word init, csc).
        tensors: the learned tensors in our names and layout.
        ignored: original names that were not imported (class-specific buffers, frozen CLIP weights).
        epoch: the checkpoint's ``epoch`` entry, if any.
        not_loaded: qualified names of pickled objects that were replaced by inert placeholders.
    """

    source: str
    method: str
    options: dict
    tensors: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)
    epoch: int | None = None
    not_loaded: list[str] = field(default_factory=list)

    def build(self, clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
              **overrides) -> PromptMethod:
        """Our method with these parameters (arguments as for :func:`import_original`)."""
        options = {**self.options, **overrides}
        try:
            method = build_method(self.method, clip, classnames, template, **options)
        except ConfigError as error:
            raise CheckpointError(f"{self.source} checkpoint: cannot build {self.method} with the options read "
                                  f"from it ({options}): {error}") from error
        _check_fits(layout_for(self.source), self.tensors, method)
        method.load_prompt_state_dict(self.tensors)
        return method


def _state_dict_of(loaded: Any, label: str) -> tuple[Mapping, int | None]:
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{label}: expected a dict with a 'state_dict' entry, found {type(loaded).__name__}")
    epoch = loaded.get("epoch")
    epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
    if "state_dict" in loaded:
        state = loaded["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{label}: its 'state_dict' entry is not a mapping of names to tensors")
        return state, epoch
    if all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return loaded, epoch  # already a state dict
    raise CheckpointError(f"{label}: no 'state_dict' entry (keys: {sorted(map(str, loaded))[:8]})")


def read_original(source: str, checkpoint: str | os.PathLike | Mapping) -> OriginalCheckpoint:
    """Read an original checkpoint (a file or a loaded mapping) and translate it to our names and options.

    Unknown tensor names and a missing layer-0 context are errors here; tensors missing for the inferred
    architecture and shape mismatches are reported by :func:`import_original`, which knows the backbone.
    """
    layout = layout_for(source)
    not_loaded: list[str] = []
    if isinstance(checkpoint, Mapping):
        loaded, label = checkpoint, f"{source} checkpoint"
    else:
        label = os.fspath(checkpoint)
        loaded, not_loaded = load_pickled(label)
        payloads = [name for name in not_loaded if runs_code(name)]
        if payloads:
            warnings.warn(f"{label}: the checkpoint contains pickled calls to {payloads}; they were NOT executed "
                          f"(only tensors were read), but the file may have been tampered with", stacklevel=3)
    state, epoch = _state_dict_of(loaded, label)
    tensors, ignored = layout.to_ours(state)
    method, options = layout.infer(tensors)
    return OriginalCheckpoint(source, method, options, tensors, ignored, epoch, not_loaded)


def _check_fits(layout: Layout, tensors: Mapping[str, torch.Tensor], method: PromptMethod) -> None:
    """One error naming every missing, unexpected or mis-shaped tensor, in the original's names."""
    expected = {name: tuple(p.shape) for name, p in method.prompt_parameters()}
    missing = [layout.describe_original(n) for n in expected if n not in tensors]
    unexpected = [layout.describe_original(n) for n in tensors if n not in expected]
    mismatched = [
        f"{layout.describe_original(n)}: {layout.original_shape(n, tuple(t.shape))} in the checkpoint, "
        f"{layout.original_shape(n, expected[n])} expected"
        for n, t in tensors.items() if n in expected and tuple(t.shape) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if unexpected:
        problems.append(f"tensor(s) {unexpected} have no place in {method.name} with options {_short(method)}")
    if mismatched:
        problems.append("shape mismatch " + "; ".join(mismatched) + " (a different backbone width, or an "
                        "option overridden against the checkpoint?)")
    if problems:
        raise CheckpointError(f"{layout.source} checkpoint does not fit {method.name} on {method.clip.name}: "
                              + "; ".join(problems))


def _short(method: PromptMethod) -> dict:
    keys = ("n_text_prompts", "n_visual_prompts", "text_n_ctx", "visual_n_ctx", "text_depth", "visual_depth", "csc")
    return {k: method.options[k] for k in keys if k in method.options}


def import_original(source: str, checkpoint: str | os.PathLike | Mapping, clip: PromptableCLIP,
                    classnames: Sequence[str], template: str = "a photo of a {}.", **overrides) -> PromptMethod:
    """Build our method with the parameters of an original checkpoint.

    Args:
        source: the original code base: ``coop``, ``cocoop``, ``plot``, ``maple``, ``align`` (trainer ``MMP``),
            ``ivlp``, ``promptsrc`` or ``vpt`` (see :data:`vlprompt.compat.SOURCES`).
        checkpoint: a ``torch.save`` file of the original (``prompt_learner/model.pth.tar-<epoch>``; zip or legacy
            format, optionally gzip-compressed), read without executing anything from it; or an already
            loaded mapping (the whole checkpoint dict or its ``state_dict``) of names to tensors.
        clip: our backbone; its widths and depth must fit the checkpoint's (e.g. ViT-B/16 for the released ones).
        classnames: the classes to evaluate; class-specific buffers of the original are rebuilt from them.
        template: passed to :func:`~vlprompt.methods.build_method`. The imported methods learn their text
            prompts, except VPT, whose preset keeps the original's fixed ``"a photo of a {}."``.
        overrides: method options that replace those read off the checkpoint (e.g. ``text_ctx_init=None`` for a
            model trained without word initialisation, ``class_position="middle"`` for CoOp). Options the
            shapes cannot tell (word init, class position) default to the original's shipped configs.

    Raises:
        CheckpointError: unreadable file, unknown or missing tensor names, shape mismatches (one error naming
            every offending tensor).
    """
    return read_original(source, checkpoint).build(clip, classnames, template, **overrides)


def export_original(method: PromptMethod, source: str, path: str | os.PathLike, epoch: int = 0) -> None:
    """Write ``method``'s parameters as a checkpoint of the original code base ``source``.

    The file is a plain ``torch.save`` of ``{"state_dict": ..., "epoch": epoch}`` holding tensors only (so it
    also loads with ``torch.load(weights_only=True)``), with the original names and shapes; the original
    trainers' ``load_model`` (``strict=False``) accepts it. Class-specific buffers and frozen CLIP weights are
    not written.
    """
    layout = layout_for(source)
    state = layout.to_original(method.prompt_state_dict())
    layout.infer(layout.to_ours(state)[0])  # the file must import back as ``source`` (e.g. IVLP needs ctx)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    torch.save({"state_dict": state, "epoch": int(epoch)}, os.fspath(path))


__all__ = ["OriginalCheckpoint", "export_original", "import_original", "read_original"]
