"""The interface every prompt-learning method implements.

A method is an ``nn.Module`` holding a frozen :class:`~vlprompt.backbone.PromptableCLIP` and its own prompt
modules. The engine only ever calls what is defined here, so it never needs to know which method it trains:

* :meth:`PromptMethod.encode_classes` — the class side (text features, token sets) for the current class names;
  computed once per class set at evaluation time and passed back into :meth:`PromptMethod.forward`.
* :meth:`PromptMethod.forward` — images ``(B, 3, H, W)`` → logits ``(B, K)``.
* :meth:`PromptMethod.training_loss` — the loss of a batch (cross-entropy unless a method or stage says otherwise).
* :meth:`PromptMethod.set_classnames` — switch to another class set (base → new, ImageNet → a target dataset)
  keeping every learned parameter.
* :meth:`PromptMethod.stages` / :meth:`PromptMethod.set_stage` — methods trained in several stages (APLe) list
  them; each stage says which parameters train. Single-stage methods have one stage, ``"main"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbone import PromptableCLIP


@dataclass
class Stage:
    """One training stage: which parameters train (name prefixes; empty = all of the method's prompt parameters)
    and which extra loss terms apply (method-defined names, e.g. ``{"kl_zero_shot": 1.0}``)."""

    name: str = "main"
    trainable: tuple[str, ...] = ()
    losses: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureNeeds:
    """What a method that trains on frozen image features asks the engine for (:mod:`vlprompt.engine.features`):
    ``views`` passes over the training images, with the training augmentation when ``augment`` (else one pass
    with the test transform), and the validation images once."""

    views: int = 1
    augment: bool = False


class PromptMethod(nn.Module):
    """Base class of all methods. Subclasses set ``name`` and implement ``encode_classes`` and ``forward``."""

    name: str = "base"

    def __init__(self, clip: PromptableCLIP, classnames: list[str], template: str = "a photo of a {}."):
        super().__init__()
        self.clip = clip
        self.classnames = list(classnames)
        self.template = template
        self.options: dict[str, Any] = {}
        self._stage = Stage()

    # ------------------------------------------------------------------ class side
    def set_classnames(self, classnames: list[str], template: str | None = None) -> None:
        """Use a new class set from now on; learned parameters are kept."""
        self.classnames = list(classnames)
        if template is not None:
            self.template = template

    def encode_classes(self) -> Any:
        """The class side for the current class names (differentiable; cache it under ``no_grad`` to evaluate)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward and loss
    def forward(self, images: torch.Tensor, class_side: Any = None) -> torch.Tensor:
        """Logits ``(B, K)`` for normalised images ``(B, 3, H, W)``; ``class_side`` from :meth:`encode_classes`
        (computed now if not given)."""
        raise NotImplementedError

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` of one training batch. Default: cross-entropy of :meth:`forward`."""
        logits = self(images)
        return F.cross_entropy(logits.float(), labels), logits

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Called by the trainer after epoch ``epoch`` (0-based) of the ``epochs`` the current stage trains, before
        the checkpoint is written. Default: nothing (PromptSRC aggregates its prompts over epochs here; what a
        method keeps between calls must be in :meth:`prompt_state_dict` so that a resumed run is identical)."""

    # ------------------------------------------------------------------ parameters and stages
    def stages(self) -> list[Stage]:
        return [Stage()]

    def set_stage(self, stage: Stage) -> None:
        """Make exactly the parameters of ``stage`` trainable."""
        self._stage = stage
        for name, parameter in self.prompt_parameters():
            parameter.requires_grad_(not stage.trainable or name.startswith(stage.trainable))

    @property
    def stage(self) -> Stage:
        return self._stage

    def prompt_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter of the method outside the frozen backbone (trainable in some stage)."""
        for name, parameter in self.named_parameters():
            if not name.startswith("clip."):
                yield name, parameter

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters the current stage trains."""
        return ((n, p) for n, p in self.prompt_parameters() if p.requires_grad)

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """All learned tensors (every stage), detached: what a checkpoint or an export stores."""
        return {name: parameter.detach().clone() for name, parameter in self.prompt_parameters()}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`prompt_state_dict`; names and shapes must match exactly."""
        own = dict(self.prompt_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                      for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            from vlprompt.errors import CheckpointError

            raise CheckpointError(f"{self.name}: prompt parameters do not match: missing {missing}, "
                                  f"unexpected {unexpected}, shape mismatch {mismatched}")
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state[name].to(parameter.dtype))

    # ------------------------------------------------------------------ methods on frozen image features
    # A method that sets ``feature_needs`` gets cached features: the engine calls ``prepare_features`` before it
    # trains or loads a trained state, gives ``training_loss`` batches of cached features ``(B, D)`` instead of
    # images, and calls ``fit_features`` after training (not when the trained state is loaded from a run folder).
    feature_needs: FeatureNeeds | None = None

    def prepare_features(self, features) -> None:
        """Set up what depends on the training features (e.g. a cache model's keys); ``features`` is a
        :class:`~vlprompt.engine.features.CachedFeatures`."""

    def fit_features(self, features) -> dict[str, Any]:
        """Fit what is chosen on the features after training (a closed-form fit, a search on the validation
        features); return a JSON-able record of what was chosen."""
        return {}

    def unavailable_reason(self, classnames: list[str]) -> str | None:
        """Why this method cannot classify ``classnames`` (e.g. a linear probe and unseen classes); None if it can.
        The protocols then report that evaluation as not available instead of a number."""
        return None

    def train(self, mode: bool = True) -> "PromptMethod":
        super().train(mode)
        self.clip.train(False)  # the backbone never leaves eval mode
        return self
