"""CLIP-Adapter (Gao et al., IJCV 2023): a residual bottleneck MLP on the frozen image feature.

``x = ReLU(W₂ ReLU(W₁ f))`` with ``W₁: D → D/reduction`` and ``W₂: D/reduction → D`` (no biases), mixed with the
feature as ``f' = ratio · x + (1 − ratio) · f``; logits ``= logit_scale · norm(f') · norm(T)ᵀ`` with T the frozen
text features of the dataset's hand-written template. Only the adapter trains (cross-entropy). The original
code's defaults: reduction 4, ratio 0.2.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.base import FeatureNeeds
from vlprompt.methods.on_features import FeatureMethod, resolve_options

DEFAULTS = dict(reduction=4, ratio=0.2, views=10)


class ClipAdapter(FeatureMethod):
    name = "clip_adapter"

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                 **options):
        options = resolve_options(self.name, DEFAULTS, options)
        if not 0 <= options["ratio"] <= 1 or options["reduction"] < 1 or options["views"] < 1:
            raise ConfigError(f"clip_adapter: needs 0 <= ratio <= 1, reduction >= 1 and views >= 1, got {options}")
        super().__init__(clip, classnames, template, options)
        self.feature_needs = FeatureNeeds(views=options["views"], augment=True)
        dim = clip.embed_dim
        hidden = max(dim // options["reduction"], 1)
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, dim, bias=False), nn.ReLU())

    def adapt(self, image: torch.Tensor) -> torch.Tensor:
        """The residual mix ``ratio · adapter(f) + (1 − ratio) · f`` of raw features ``(B, D)``."""
        ratio = self.options["ratio"]
        return ratio * self.adapter(image) + (1 - ratio) * image

    def logits_from_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        adapted = F.normalize(self.adapt(image), dim=-1)
        return self.clip.logit_scale.float() * adapted @ text.T
