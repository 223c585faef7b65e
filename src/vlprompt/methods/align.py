"""ALIGN: multi-mode token-level prompt alignment — the general model every prompt method here is a preset of.

An image is seen through M visual prompt sets (M views, one batched encoder pass), a class through N textual
prompts. Matching an image j with a class k (docs/methods.md, 'ALIGN'):

* prompt level: σ_mn = cos(z_j^m, h_k^n), ``(B, K, M, N)``;
* token level: for every (m, n) an entropic OT between the image's token features (patches + prompt outputs)
  and the prompt's word-token features gives the token similarity S_mn (distance d_mn = 1 − S_mn);
* an entropic OT over the M × N prompts with cost mixing both levels gives the plan T, and the logit.

``mode="reference"`` reproduces the original code: cost = (1 − σ) + β·S, logit = scale·Σ T ⊙ σ, OT without
gradient, the text token set sliced as the original does. ``mode="paper"``: cost = (1 − σ) + β·d (additive) or
(1 − β)(1 − σ) + β·d (convex), logit = scale·(1 − ⟨T, C⟩), token set = learnable + class-name tokens.

The same module also computes the special cases. With M = N = 1 the prompt-level plan is [[1]] and the reference
logit is scale·cos: MaPLe exactly (tested); their presets use ``matching="cosine"``, which skips the OT work
(CoOp, VPT, IVLP, MaPLe, UPT, zero-shot). ``matching="plot"`` is PLOT's OT between the image's patch tokens and the
N prompt features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from vlprompt import ot
from vlprompt.backbone import ImageOutput, PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.base import PromptMethod
from vlprompt.prompts import ClassText, LinearCoupling, SharedPromptGenerator, TextPrompts, VisualPrompts


@dataclass
class AlignConfig:
    """Every option of the general model. Presets for each method live in :mod:`vlprompt.methods.presets`."""

    # text side: N prompts (0 = the frozen hand-written template of the dataset, or the ``templates`` ensemble)
    n_text_prompts: int = 4
    templates: list[str] | None = None
    text_n_ctx: int = 2
    text_ctx_init: str | list[str] | None = "a photo of a"
    text_depth: int = 9
    csc: bool = False
    class_position: str = "end"
    # visual side: M prompt sets (0 = one plain view)
    n_visual_prompts: int = 4
    visual_n_ctx: int = 2
    visual_depth: int = 9
    visual_init: str = "normal"
    visual_position: str = "after_patches"
    # how the visual prompts are made: "linear" (MaPLe/ALIGN, from the text prompts; M = N), "independent"
    # (free parameters, VPT/IVLP), "shared_generator" (UPT)
    coupling: str = "linear"
    # how an image and a class are matched: "ot" (ALIGN's two levels), "cosine" (mean cosine over prompt pairs),
    # "plot" (PLOT: OT between patch tokens and the N prompt features)
    matching: str = "ot"
    mode: str = "reference"
    beta: float = 1.0
    cost_form: str = "additive"
    text_token_set: str | None = None  # default: "reference" in reference mode, "paper" in paper mode
    visual_token_set: str = "all"  # "all" (patches + prompt outputs, the original) or "patches"
    eps: float = 0.1
    sinkhorn_iters: int = 100
    sinkhorn_stop: str | None = None  # default: "reference" in reference mode, "per_problem" in paper mode
    plot_global: bool = False  # PLOT on ImageNet adds the global-feature logit

    CHOICES = {
        "class_position": ("end", "middle", "front"),
        "visual_init": ("normal", "uniform"),
        "visual_position": ("after_patches", "after_cls"),
        "coupling": ("linear", "independent", "shared_generator"),
        "matching": ("ot", "cosine", "plot"),
        "mode": ("reference", "paper"),
        "cost_form": ("additive", "convex"),
        "text_token_set": (None, "reference", "paper"),
        "visual_token_set": ("all", "patches"),
        "sinkhorn_stop": (None, "reference", "per_problem"),
    }

    @classmethod
    def from_options(cls, method: str, **options) -> "AlignConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"{method}: unknown option(s) {unknown}; allowed: {sorted(known)}")
        config = cls(**options)
        config.validate(method)
        return config

    def validate(self, method: str) -> None:
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{method}: {key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.n_text_prompts < 0 or self.n_visual_prompts < 0:
            raise ConfigError(f"{method}: n_text_prompts and n_visual_prompts must be >= 0")
        if self.coupling == "linear" and self.n_visual_prompts and self.n_visual_prompts != self.n_text_prompts:
            raise ConfigError(
                f"{method}: coupled prompts (coupling='linear') need n_visual_prompts == n_text_prompts, got "
                f"M={self.n_visual_prompts}, N={self.n_text_prompts}; use coupling='independent' for M != N")
        if self.coupling == "linear" and self.n_visual_prompts and self.text_n_ctx != self.visual_n_ctx:
            raise ConfigError(f"{method}: coupled prompts need visual_n_ctx == text_n_ctx")
        if self.coupling == "shared_generator" and (self.n_text_prompts, self.n_visual_prompts) != (1, 1):
            raise ConfigError(f"{method}: the shared generator (UPT) makes one text and one visual prompt")
        if self.matching == "plot" and self.n_visual_prompts > 1:
            raise ConfigError(f"{method}: PLOT matching uses one image view (n_visual_prompts <= 1)")
        if self.eps <= 0:
            raise ConfigError(f"{method}: eps must be > 0, got {self.eps}")

    def as_dict(self) -> dict:
        return asdict(self)


class Align(PromptMethod):
    """The general multi-modal prompt model (see the module docstring)."""

    name = "align"

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                 config: AlignConfig | None = None, name: str | None = None):
        super().__init__(clip, list(classnames), template)
        self.name = name or self.name
        self.config = config or AlignConfig()
        self.config.validate(self.name)
        self.options = self.config.as_dict()
        c = self.config
        if (c.n_visual_prompts or c.coupling == "shared_generator") and not clip.is_vit:
            raise ConfigError(f"{self.name}: {clip.visual_prompts_unsupported()}")
        if c.matching in ("ot", "plot") and not clip.has_image_tokens:
            raise ConfigError(f"{self.name}: {c.matching!r} matching needs local image features, which {clip.name} "
                              "does not give (ViTs and CLIP's ResNets do)")
        learned_text = c.n_text_prompts > 0
        self.text = TextPrompts(
            clip, self.classnames,
            n_prompts=max(c.n_text_prompts, 1),
            n_ctx=c.text_n_ctx if learned_text else 0,
            ctx_init=c.text_ctx_init if learned_text else None,
            template=template if learned_text or not c.templates else c.templates,
            depth=c.text_depth if learned_text else 1,
            csc=c.csc, class_position=c.class_position,
        )
        self.visual = None
        self.coupling = None
        self.generator = None
        if c.n_visual_prompts and c.coupling == "linear":
            self.coupling = LinearCoupling(clip, c.text_depth)
        elif c.n_visual_prompts and c.coupling == "independent":
            self.visual = VisualPrompts(clip, c.n_visual_prompts, c.visual_n_ctx, c.visual_depth, c.visual_init)
        elif c.coupling == "shared_generator":
            self.generator = SharedPromptGenerator(clip, n_ctx=c.text_n_ctx)
            self.text.ctx.requires_grad_(False)  # the generator provides the context
            self.text.ctx = None

    # ------------------------------------------------------------------ class side
    def set_classnames(self, classnames, template=None) -> None:
        super().set_classnames(classnames, template)
        if template is not None and not self.config.templates:
            self.text.set_template(template)
        self.text.set_classnames(self.classnames)

    def encode_classes(self) -> ClassText:
        """Text features ``(K, N, D)`` and token sets of the current classes."""
        if self.generator is not None:
            ctx, _ = self.generator()
            return self.text.encode(ctx=ctx)
        return self.text.encode()

    # ------------------------------------------------------------------ image side
    def visual_prompts(self) -> tuple[torch.Tensor | None, list | None]:
        """Layer-0 visual prompts ``(M, b, W_v)`` and the per-block deep prompts."""
        if self.coupling is not None:
            return self.coupling(self.text.ctx, self.text.deep_prompts())
        if self.visual is not None:
            return self.visual()
        if self.generator is not None:
            _, visual = self.generator()
            return visual, None
        return None, None

    def encode_views(self, images: torch.Tensor, patch_transform=None) -> ImageOutput:
        """All M prompted views of every image in one batched pass; rows image-major (``j * M + m``)."""
        prompts, deep = self.visual_prompts()
        if prompts is None:
            return self.clip.encode_image(images, patch_transform=patch_transform)
        views = prompts.shape[0]
        batch = images.shape[0]
        deep = None if deep is None else [None if p is None else p.repeat(batch, 1, 1) for p in deep]
        return self.clip.encode_image(
            images.repeat_interleave(views, dim=0),
            prompts=prompts.repeat(batch, 1, 1),
            deep_prompts=deep,
            prompt_position=self.config.visual_position,
            patch_transform=patch_transform,
        )

    # ------------------------------------------------------------------ matching
    def forward(self, images: torch.Tensor, class_side: ClassText | None = None) -> torch.Tensor:
        text = class_side if class_side is not None else self.encode_classes()
        return self.match(self.encode_views(images), text, images.shape[0])

    def match(self, views: ImageOutput, text: ClassText, batch: int) -> torch.Tensor:
        """Logits ``(B, K)`` from the image views and the class side."""
        c = self.config
        scale = self.clip.logit_scale.float()
        z = F.normalize(views.features.float(), dim=-1).view(batch, -1, views.features.shape[-1])  # (B, M, D)
        h = F.normalize(text.features.float(), dim=-1)  # (K, N, D)
        if c.matching == "plot":
            return scale * self._plot_similarity(views, h, batch) + (
                scale * z[:, 0] @ F.normalize(h.mean(1), dim=-1).T if c.plot_global else 0.0)
        sigma = torch.einsum("bmd,knd->bkmn", z, h)
        if c.matching == "cosine":
            # Prompt ensemble: mean of the normalised features, renormalised (CLIP's template ensembling);
            # with M = N = 1 this is the plain cosine.
            z_mean = F.normalize(z.mean(dim=1), dim=-1)
            h_mean = F.normalize(h.mean(dim=1), dim=-1)
            return scale * z_mean @ h_mean.T
        stop = c.sinkhorn_stop or ("reference" if c.mode == "reference" else "per_problem")
        token = self._token_similarity(views, text, batch, stop) if c.beta != 0 else torch.zeros_like(sigma)
        if c.mode == "reference":
            cost = (1 - sigma) + c.beta * token
            plan = ot.prompt_level_ot(cost, eps=c.eps, max_iter=c.sinkhorn_iters, stop=stop)
            return scale * (plan * sigma).sum(dim=(-2, -1))
        distance = 1 - token
        if c.cost_form == "convex":
            cost = (1 - c.beta) * (1 - sigma) + c.beta * distance
        else:
            cost = (1 - sigma) + c.beta * distance
        plan = ot.prompt_level_ot(cost, eps=c.eps, max_iter=c.sinkhorn_iters, stop=stop)
        return scale * (1 - (plan * cost).sum(dim=(-2, -1)))

    def _token_similarity(self, views: ImageOutput, text: ClassText, batch: int, stop: str) -> torch.Tensor:
        """Token-level OT similarity S ``(B, K, M, N)``.

        Classes are solved in groups whose token sets end at the same position, each group's text tokens cut
        there: the cut columns carry no mass, so the plans are those of the full padded problems, for a fraction
        of the work (token sets are short, ``L`` is set by the longest prompt of all classes).
        """
        c = self.config
        tokens = views.patch_tokens if c.visual_token_set == "patches" else views.tokens
        r = F.normalize(tokens.float(), dim=-1).view(batch, -1, tokens.shape[1], tokens.shape[2])
        s = F.normalize(text.tokens.float(), dim=-1)
        token_set = c.text_token_set or c.mode
        mask = text.reference_mask if token_set == "reference" else text.paper_mask
        if c.mode == "reference":
            r, s = r.detach(), s.detach()  # the original code gives token features no gradient at all
        positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
        ends = (mask * positions).amax(dim=(1, 2)).clamp_min(1)  # (K,) last real token + 1 of each class
        order = torch.argsort(ends, stable=True)
        parts = []
        for end in torch.unique(ends).tolist():
            group = order[ends[order] == end]
            result = ot.token_level_ot(r, s[group, :, :end], text_mask=mask[group, :, :end], eps=c.eps,
                                       max_iter=c.sinkhorn_iters, stop=stop)
            parts.append(result.similarity)
        return torch.cat(parts, dim=1)[:, torch.argsort(order)]

    def _plot_similarity(self, views: ImageOutput, h: torch.Tensor, batch: int) -> torch.Tensor:
        """PLOT: Σ T ⊙ cos between the image's patch tokens ``(B, P, D)`` and the N prompt features of each class.

        Solved as a token-level OT with a single "prompt" per side whose tokens are the patches and the N prompt
        features, so it shares the chunked batched solver. Returns ``(B, K)``.
        """
        c = self.config
        patches = F.normalize(views.patch_tokens.float(), dim=-1).unsqueeze(1)  # (B, 1, P, D)
        stop = c.sinkhorn_stop or "reference"
        result = ot.token_level_ot(patches, h.unsqueeze(1), eps=c.eps, max_iter=c.sinkhorn_iters, stop=stop)
        return result.similarity[:, :, 0, 0]
