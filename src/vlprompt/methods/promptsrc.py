"""PromptSRC (Khattak, Wasim et al., ICCV'23): IVLP prompts regulated towards frozen CLIP.

The model is IVLP (ALIGN with M = N = 1, independent deep text and visual prompts; 4 + 4 context tokens, text
initialised from "a photo of a", depth 9). Training adds three self-regulating terms to the cross-entropy
(official ``trainers/promptsrc.py``):

* ``l1_text``  · mean |ŵ − ŵ_zs|: the normalised prompted class features ``(K, D)`` against frozen CLIP's, whose
  class feature is the mean of its raw features over a template set (the code's 60 ImageNet templates), then
  normalised (:class:`~vlprompt.methods.teacher.ZeroShotTeacher`);
* ``l1_image`` · mean |ẑ − ẑ_zs|: the normalised prompted image features ``(B, D)`` against frozen CLIP's;
* ``kl``       · Σ KL(p_zs ‖ p) / (B·K) at temperature T (times T²): p the prompted predictions, p_zs those of
  frozen CLIP's image features against the template-averaged text features (the code divides by the number of
  logits, not the batch).

Gaussian prompt aggregation (GPA): after epoch e (1-based) of E the prompts are added to a running sum with
weight ``g(e) / Σ_a g(a)``, ``g`` the Gaussian of mean ``gpa_mean`` and std ``gpa_std``; after the last epoch the
sum replaces the prompts. The sum is part of :meth:`prompt_state_dict` while training (``gpa.<name>``), so a
resumed run ends with the same prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.align import Align, AlignConfig
from vlprompt.methods.base import Stage
from vlprompt.methods.presets import preset_config
from vlprompt.methods.teacher import ZeroShotTeacher

PRESET = dict(n_text_prompts=1, text_n_ctx=4, text_ctx_init="a photo of a", text_depth=9,
              n_visual_prompts=1, visual_n_ctx=4, visual_depth=9, coupling="independent", matching="cosine")
GPA_PREFIX = "gpa."

# The ``IMAGENET_TEMPLATES`` of PromptSRC's trainers/imagenet_templates.py (60 of CLIP's 80 ImageNet templates).
TEACHER_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)


@dataclass
class PromptSRCOptions:
    """PromptSRC's own options (defaults: the official base-to-new config)."""

    l1_text_weight: float = 25.0
    l1_image_weight: float = 10.0
    kl_weight: float = 1.0
    kl_temperature: float = 1.0
    gpa: bool = True
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    teacher_templates: list[str] | None = None  # None: TEACHER_TEMPLATES; ["dataset"]: the dataset's template

    def validate(self) -> None:
        for key in ("l1_text_weight", "l1_image_weight", "kl_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"promptsrc: {key} must be >= 0, got {getattr(self, key)}")
        if self.kl_temperature <= 0 or self.gpa_std <= 0:
            raise ConfigError(f"promptsrc: kl_temperature and gpa_std must be > 0, got {self.kl_temperature} "
                              f"and {self.gpa_std}")
        if self.teacher_templates is not None and not self.teacher_templates:
            raise ConfigError("promptsrc: teacher_templates is empty")


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA weights of epochs 1..``epochs``: ``g(e) / Σ_a g(a)`` with ``g`` the N(mean, std²) density.

    Computed as a softmax of the log-densities, which is the same quotient but cannot underflow to 0 / 0 when
    every epoch lies far from ``mean``.
    """
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    exps = [math.exp(value - top) for value in logs]
    total = sum(exps)
    return [value / total for value in exps]


def self_regulation_terms(logits: torch.Tensor, zero_shot_logits: torch.Tensor, image: torch.Tensor,
                          zero_shot_image: torch.Tensor, text: torch.Tensor, zero_shot_text: torch.Tensor,
                          temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The unweighted regulating terms: ``l1_text`` (normalised ``(K, D)`` features), ``l1_image`` (normalised
    ``(B, D)``) and ``kl`` = T² · Σ KL(softmax(zs/T) ‖ softmax(logits/T)) / (B·K) from logits ``(B, K)``."""
    t = temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(zero_shot_logits.float() / t, dim=-1),
                  reduction="sum", log_target=True) * (t * t) / logits.numel()
    return {"l1_text": F.l1_loss(text, zero_shot_text), "l1_image": F.l1_loss(image, zero_shot_image), "kl": kl}


class PromptSRC(Align):
    """IVLP with self-regulation and Gaussian prompt aggregation (see the module docstring)."""

    name = "promptsrc"

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str, config: AlignConfig,
                 options: PromptSRCOptions):
        options.validate()
        if (config.n_text_prompts, config.n_visual_prompts) != (1, 1):
            raise ConfigError("promptsrc: one text and one visual prompt set (n_text_prompts = n_visual_prompts "
                              f"= 1), got N={config.n_text_prompts}, M={config.n_visual_prompts}")
        super().__init__(clip, classnames, template, config=config, name="promptsrc")
        self.src = options
        self.options = {**self.config.as_dict(), **vars(options)}
        self.teacher = ZeroShotTeacher(clip)
        self.gpa_sum: dict[str, torch.Tensor] = {}
        self._stage = self.stages()[0]  # its loss weights apply also outside the trainer

    def stages(self) -> list[Stage]:
        o = self.src
        return [Stage("main", (), {"l1_text": o.l1_text_weight, "l1_image": o.l1_image_weight, "kl": o.kl_weight})]

    def teacher_templates(self) -> list[str]:
        templates = self.src.teacher_templates
        if templates is None:
            return list(TEACHER_TEMPLATES)
        return [self.template if t == "dataset" else t for t in templates]

    # ------------------------------------------------------------------ loss
    def training_loss(self, images, labels):
        text = self.encode_classes()
        views = self.encode_views(images)
        logits = self.match(views, text, images.shape[0])
        loss = F.cross_entropy(logits.float(), labels)
        weights = self.stage.losses
        if any(weights.values()):
            teacher_text = self.teacher.text_features(self.classnames, self.teacher_templates())
            teacher_image = self.teacher.image_features(images)
            terms = self_regulation_terms(
                logits, self.teacher.logits(teacher_image, teacher_text),
                F.normalize(views.features.float(), dim=-1), teacher_image,
                F.normalize(text.features[:, 0].float(), dim=-1), teacher_text, self.src.kl_temperature)
            loss = loss + sum(weights.get(name, 0.0) * value for name, value in terms.items())
        return loss, logits

    # ------------------------------------------------------------------ Gaussian prompt aggregation
    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """Add the prompts after epoch ``epoch`` (0-based) of ``epochs`` to the weighted sum; after the last epoch
        the sum becomes the prompts."""
        if not self.src.gpa:
            return
        weight = gaussian_epoch_weights(epochs, self.src.gpa_mean, self.src.gpa_std)[epoch]
        with torch.no_grad():
            for name, parameter in self.prompt_parameters():
                weighted = parameter.detach() * weight
                self.gpa_sum[name] = weighted if name not in self.gpa_sum else self.gpa_sum[name] + weighted
            if epoch == epochs - 1:
                for name, parameter in self.prompt_parameters():
                    parameter.copy_(self.gpa_sum[name])
                self.gpa_sum = {}

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().prompt_state_dict()
        state.update({GPA_PREFIX + name: value.clone() for name, value in self.gpa_sum.items()})
        return state

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Prompts, plus the running GPA sum of an interrupted training when the state has one."""
        super().load_prompt_state_dict({k: v for k, v in state.items() if not k.startswith(GPA_PREFIX)})
        own = dict(self.prompt_parameters())
        sums = {k[len(GPA_PREFIX):]: v for k, v in state.items() if k.startswith(GPA_PREFIX)}
        unknown = sorted(set(sums) - set(own))
        if unknown:
            from vlprompt.errors import CheckpointError

            raise CheckpointError(f"promptsrc: aggregation sums of unknown prompts {unknown}")
        self.gpa_sum = {k: v.to(own[k].device, own[k].dtype).clone() for k, v in sums.items()}


def build_promptsrc(clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                    **overrides) -> PromptSRC:
    own = {f.name for f in fields(PromptSRCOptions)}
    options = PromptSRCOptions(**{k: v for k, v in overrides.items() if k in own})
    config = preset_config("promptsrc", PRESET, clip, **{k: v for k, v in overrides.items() if k not in own})
    return PromptSRC(clip, classnames, template, config, options)
