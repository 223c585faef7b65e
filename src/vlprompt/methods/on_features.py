"""The common part of the methods that work on frozen CLIP image features (linear probe, CLIP-Adapter,
Tip-Adapter(-F)).

Such a method leaves both CLIP towers untouched: its input is an image feature. :meth:`FeatureMethod.forward`
therefore takes either images ``(B, 3, H, W)`` (evaluation; they are encoded by the frozen tower) or cached
features ``(B, D)`` (training on :mod:`vlprompt.engine.features`), and the subclass maps features to logits.
Learned state that belongs to the training classes (a probe's rows, a cache's label columns) is mapped to another
class set by class name (:meth:`FeatureMethod.trained_index`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.base import PromptMethod


def resolve_options(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``overrides``; an unknown key is a :class:`ConfigError` naming the allowed ones."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **overrides}


class FeatureMethod(PromptMethod):
    """A method on frozen image features. Subclasses implement :meth:`logits_from_features`."""

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str, options: dict[str, Any]):
        super().__init__(clip, list(classnames), template)
        self.options = options
        self.trained_classnames = list(classnames)  # the classes of the training set (fixed)
        self._text_cache: tuple | None = None

    # ------------------------------------------------------------------ inputs
    def image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` float32 image features (not normalised) of images ``(B, 3, H, W)`` or of cached features."""
        if inputs.dim() == 2:
            return inputs.float()
        with torch.no_grad():
            return self.clip.encode_image(inputs).features.float()

    def text_features(self) -> torch.Tensor:
        """Normalised frozen text features ``(K, D)`` of the current class names in the hand-written template;
        cached per (class set, template)."""
        key = (tuple(self.classnames), self.template)
        if self._text_cache is None or self._text_cache[0] != key:
            prompts = [self.template.format(name.replace("_", " ")) for name in self.classnames]
            with torch.no_grad():
                features = self.clip.encode_text(self.clip.tokenize(prompts)).features
            self._text_cache = (key, F.normalize(features.float(), dim=-1))
        return self._text_cache[1]

    def trained_index(self) -> torch.Tensor:
        """``(K,)`` long: for each current class, its index among the training classes (the first one of that
        name), or -1 for a class the method was not trained on."""
        if self.classnames == self.trained_classnames:
            return torch.arange(len(self.classnames))
        first: dict[str, int] = {}
        for index, name in enumerate(self.trained_classnames):
            first.setdefault(name, index)
        return torch.tensor([first.get(name, -1) for name in self.classnames], dtype=torch.long)

    # ------------------------------------------------------------------ PromptMethod interface
    def encode_classes(self) -> torch.Tensor:
        return self.text_features()

    def forward(self, inputs: torch.Tensor, class_side: Any = None) -> torch.Tensor:
        """Logits ``(B, K)`` of images ``(B, 3, H, W)`` or cached features ``(B, D)``."""
        text = self.text_features() if class_side is None else class_side
        return self.logits_from_features(self.image_features(inputs), text)

    def logits_from_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` from raw image features ``(B, D)`` and normalised text features ``(K, D)``."""
        raise NotImplementedError
