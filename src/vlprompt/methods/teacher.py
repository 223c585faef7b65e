"""Frozen zero-shot CLIP as a teacher for the methods that regularise towards it (APLe, KgCoOp, PromptSRC).

The teacher is the plain backbone without any prompt: its text features of hand-written templates and its image
features, always computed without gradient. Text features are cached per (class set, templates, device), so a
training step only pays for the frozen image pass.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbone import PromptableCLIP
from vlprompt.data.templates import format_prompt


class ZeroShotTeacher:
    """Zero-shot CLIP's normalised text ``(K, D)`` and image ``(B, D)`` features and its logits ``(B, K)``.

    With several templates the text feature of a class is the mean of its raw (unnormalised) template features,
    normalised afterwards — what PromptSRC's code does with its template set; with one template it is that
    template's feature.
    """

    def __init__(self, clip: PromptableCLIP):
        self.clip = clip
        self._cache: tuple | None = None

    def text_features(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """``(K, D)`` float32, normalised."""
        device = self.clip.logit_scale.device
        key = (tuple(classnames), tuple(templates), device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                per_template = [self.clip.encode_text(self.clip.tokenize(
                    [format_prompt(template, name) for name in classnames])).features.float()
                    for template in templates]
                mean = torch.stack(per_template).mean(dim=0)
            self._cache = (key, F.normalize(mean, dim=-1))
        return self._cache[1]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` float32, normalised."""
        with torch.no_grad():
            return F.normalize(self.clip.encode_image(images).features.float(), dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``scale · image @ text.T`` from the normalised features above."""
        return self.clip.logit_scale.float() * image_features @ text_features.T
