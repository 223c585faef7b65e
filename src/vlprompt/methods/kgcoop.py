"""KgCoOp (Yao, Zhang, Xu, CVPR'23): CoOp whose learned class embeddings are kept near the hand-written prompt's.

Loss = CE + λ · L_kg with ``L_kg = 1/K Σ_k ‖ŵ_k − ŵ_k^clip‖²``: ŵ_k the normalised text feature of class k with
the learned context, ŵ_k^clip that of frozen CLIP with the dataset's hand-written template (no gradient). The
model is CoOp's (ALIGN with M = 0, N = 1, shallow text context): 4 context tokens initialised from
"a photo of a", all four learned. λ = ``kg_weight`` (the paper's 8). The official code computes
``λ · (1 − mean_k cos(ŵ_k, ŵ_k^clip))``, which is half of L_kg for unit vectors; its presets therefore set
``kg_weight: 4`` (the code) and the ``paper`` variant 8 (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.align import Align, AlignConfig
from vlprompt.methods.base import Stage
from vlprompt.methods.presets import preset_config
from vlprompt.methods.teacher import ZeroShotTeacher

PRESET = dict(n_text_prompts=1, text_n_ctx=4, text_ctx_init="a photo of a", text_depth=1,
              n_visual_prompts=0, matching="cosine")
DEFAULT_KG_WEIGHT = 8.0


def knowledge_distance(learned: torch.Tensor, hand_written: torch.Tensor) -> torch.Tensor:
    """Mean over classes of ``‖normalise(learned_k) − normalise(hand_written_k)‖²``; both ``(K, D)``."""
    difference = F.normalize(learned.float(), dim=-1) - F.normalize(hand_written.float(), dim=-1)
    return difference.pow(2).sum(dim=-1).mean()


class KgCoOp(Align):
    """CoOp plus the knowledge-guided distance to zero-shot CLIP's class embeddings (see the module docstring)."""

    name = "kgcoop"

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str, config: AlignConfig,
                 kg_weight: float = DEFAULT_KG_WEIGHT):
        if config.n_text_prompts != 1:
            raise ConfigError(f"kgcoop: one learned text prompt per class (n_text_prompts 1), "
                              f"got {config.n_text_prompts}")
        if kg_weight < 0:
            raise ConfigError(f"kgcoop: kg_weight must be >= 0, got {kg_weight}")
        super().__init__(clip, classnames, template, config=config, name="kgcoop")
        self.kg_weight = float(kg_weight)
        self.options = {**self.config.as_dict(), "kg_weight": self.kg_weight}
        self.teacher = ZeroShotTeacher(clip)
        self._stage = self.stages()[0]  # its loss weights apply also outside the trainer

    def stages(self) -> list[Stage]:
        return [Stage("main", (), {"knowledge_distance": self.kg_weight})]

    def knowledge_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        """L_kg of the learned class features ``(K, D)`` against the hand-written template's."""
        return knowledge_distance(text_features, self.teacher.text_features(self.classnames, [self.template]))

    def training_loss(self, images, labels):
        text = self.encode_classes()
        logits = self(images, text)
        loss = F.cross_entropy(logits.float(), labels)
        weight = self.stage.losses.get("knowledge_distance", 0.0)
        if weight:
            loss = loss + weight * self.knowledge_loss(text.features[:, 0])
        return loss, logits


def build_kgcoop(clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                 **overrides) -> KgCoOp:
    kg_weight = overrides.pop("kg_weight", DEFAULT_KG_WEIGHT)
    unknown_to_align = set(overrides) - {f.name for f in fields(AlignConfig)}
    if unknown_to_align:
        allowed = sorted({f.name for f in fields(AlignConfig)} | {"kg_weight"})
        raise ConfigError(f"kgcoop: unknown option(s) {sorted(unknown_to_align)}; allowed: {allowed}")
    config = preset_config("kgcoop", PRESET, clip, **overrides)
    return KgCoOp(clip, classnames, template, config, kg_weight)
