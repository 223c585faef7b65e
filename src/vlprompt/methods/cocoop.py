"""CoCoOp (Zhou et al., CVPR'22): CoOp's context plus an image-conditioned bias from a small meta-net.

Context for image j: ctx + π(f_j), with π = Linear(D → D/16) → ReLU → Linear(→ W_text) applied to the normalised
CLIP image feature. The text side therefore depends on the image: every step encodes B·K prompts. Defaults from
``vit_b16_c4_ep10_batch1_ctxv1``: n_ctx 4, init "a photo of a". Not an ALIGN special case.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.base import PromptMethod
from vlprompt.prompts import MetaNet, TextPrompts

DEFAULTS = dict(text_n_ctx=4, text_ctx_init="a photo of a")


class CoCoOp(PromptMethod):
    name = "cocoop"

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                 **options):
        super().__init__(clip, list(classnames), template)
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"cocoop: unknown option(s) {unknown}; allowed: {sorted(DEFAULTS)}")
        self.options = {**DEFAULTS, **options}
        self.text = TextPrompts(clip, self.classnames, n_prompts=1, n_ctx=self.options["text_n_ctx"],
                                ctx_init=self.options["text_ctx_init"])
        self.meta_net = MetaNet(clip)

    def set_classnames(self, classnames, template=None) -> None:
        super().set_classnames(classnames, template)
        self.text.set_classnames(self.classnames)

    def encode_classes(self) -> None:
        """Nothing to cache: the class prompts depend on each image."""
        return None

    def forward(self, images: torch.Tensor, class_side=None) -> torch.Tensor:
        image = F.normalize(self.clip.encode_image(images).features.float(), dim=-1)  # (B, D)
        bias = self.meta_net(image)  # (B, W)
        ctx = self.text.ctx.unsqueeze(0) + bias[:, None, None, :]  # (B, 1, n_ctx, W)
        embeddings = self.text.input_embeddings(ctx)  # (B, K, L, W)
        batch, classes = embeddings.shape[:2]
        out = self.clip.encode_text(embeddings=embeddings.flatten(0, 1), eot_index=self.text.eot.repeat(batch))
        text = F.normalize(out.features.float(), dim=-1).view(batch, classes, -1)
        return self.clip.logit_scale.float() * torch.einsum("bd,bkd->bk", image, text)
