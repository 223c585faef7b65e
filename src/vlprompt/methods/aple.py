"""APLe (Cao et al., arXiv 2401.06827): sequential two-stage multi-modal prompts with an FFT/Gaussian image adapter.

Only the abstract of APLe is public; this is the configurable reconstruction described in docs/methods.md ('APLe'). Every default
below is an assumption and docs/methods.md lists them:

* prompts: IVLP-style independent deep prompts, text n_ctx 2 ("a photo of a") and vision n_ctx 2, depth 9;
* stage I ("language"): only the text prompts train; the image is encoded without visual prompts and adapter;
  loss = CE + ``kl_weight`` · KL(p_zs ‖ p), p_zs the frozen zero-shot CLIP distribution of the image with the
  dataset's hand-written template (computed without gradient, cached per class set);
* stage II ("vision"): the visual prompts and the adapter train with CE only; the stage-I text prompts stay
  frozen unless ``stage2_train_text``;
* image adapter (:class:`GaussianLowPassAdapter`): X' = (1 − α)·X + α·Re(F⁻¹(G_σ ⊙ F(X))) on the patch-token grid
  (default) or on the pixels; σ = 0.25 of the Nyquist band, α = 0.2, optionally learnable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.align import Align, AlignConfig
from vlprompt.methods.base import Stage
from vlprompt.methods.presets import preset_config
from vlprompt.methods.teacher import ZeroShotTeacher

PROMPT_PRESET = dict(n_text_prompts=1, text_n_ctx=2, text_ctx_init="a photo of a", text_depth=9,
                     n_visual_prompts=1, visual_n_ctx=2, visual_depth=9, coupling="independent",
                     matching="cosine")


class GaussianLowPassAdapter(nn.Module):
    """Blend a signal with its Gaussian low-pass version, filtered in the 2-D frequency domain.

    ``X' = (1 − α)·X + α·Re(F⁻¹(G_σ ⊙ F(X)))`` with ``G_σ(u, v) = exp(−(u² + v²) / (2σ²))`` over frequencies
    normalised so that ±1 is the Nyquist frequency of each axis; σ → ∞ passes everything, a constant is always
    kept (G(0, 0) = 1).

    Args:
        sigma: width of the Gaussian in units of the Nyquist frequency.
        alpha: blend weight in [0, 1].
        learnable_alpha: learn α (kept in (0, 1) through a sigmoid).
        dims: the two spatial dimensions of the input (``(1, 2)`` for a ``(B, gh, gw, W)`` token grid,
            ``(-2, -1)`` for ``(B, 3, H, W)`` pixels).
    """

    def __init__(self, sigma: float = 0.25, alpha: float = 0.2, learnable_alpha: bool = False,
                 dims: tuple[int, int] = (1, 2)):
        super().__init__()
        if sigma <= 0 or not 0 <= alpha <= 1:
            raise ConfigError(f"adapter needs sigma > 0 and 0 <= alpha <= 1, got sigma={sigma}, alpha={alpha}")
        self.sigma, self.dims = sigma, dims
        if learnable_alpha:
            clipped = min(max(alpha, 1e-4), 1 - 1e-4)
            self.alpha_logit = nn.Parameter(torch.tensor(math.log(clipped / (1 - clipped))))
        else:
            self.register_buffer("fixed_alpha", torch.tensor(float(alpha)), persistent=False)

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit) if hasattr(self, "alpha_logit") else self.fixed_alpha

    def gaussian(self, height: int, width: int, device) -> torch.Tensor:
        """``(height, width)`` mask in ``torch.fft.fft2``'s frequency layout."""
        u = torch.fft.fftfreq(height, device=device) / 0.5
        v = torch.fft.fftfreq(width, device=device) / 0.5
        radius2 = u.view(-1, 1) ** 2 + v.view(1, -1) ** 2
        return torch.exp(-radius2 / (2 * self.sigma ** 2))

    def low_pass(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(d % x.dim() for d in self.dims)
        # FFTs in at least fp32: half-precision FFTs are limited to power-of-two sizes and lose the small bands.
        spectrum = torch.fft.fft2(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=dims)
        mask = self.gaussian(x.shape[dims[0]], x.shape[dims[1]], x.device)
        shape = [1] * x.dim()
        shape[dims[0]], shape[dims[1]] = mask.shape
        return torch.fft.ifft2(spectrum * mask.view(shape), dim=dims).real.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.to(x.dtype)
        return (1 - alpha) * x + alpha * self.low_pass(x)


@dataclass
class ApleOptions:
    """APLe's own options (all ASSUMED placeholders; docs/methods.md, "APLe")."""

    adapter_on: str = "patch_tokens"  # or "pixels"
    adapter_sigma: float = 0.25
    adapter_alpha: float = 0.2
    adapter_learnable_alpha: bool = False
    kl_weight: float = 1.0
    stage2_train_text: bool = False


class Aple(Align):
    """The APLe reconstruction: an IVLP-style :class:`Align` with two stages and the image adapter."""

    name = "aple"

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str, config: AlignConfig,
                 options: ApleOptions):
        super().__init__(clip, classnames, template, config=config, name="aple")
        if options.adapter_on not in ("patch_tokens", "pixels"):
            raise ConfigError(f"aple: adapter_on must be 'patch_tokens' or 'pixels', got {options.adapter_on!r}")
        self.aple = options
        self.options = {**self.config.as_dict(), **vars(options)}
        dims = (1, 2) if options.adapter_on == "patch_tokens" else (-2, -1)
        self.adapter = GaussianLowPassAdapter(options.adapter_sigma, options.adapter_alpha,
                                              options.adapter_learnable_alpha, dims)
        self.teacher = ZeroShotTeacher(clip)

    def stages(self) -> list[Stage]:
        vision = ("visual.", "adapter.") + (("text.",) if self.aple.stage2_train_text else ())
        return [Stage("language", ("text.",), {"kl_zero_shot": self.aple.kl_weight}),
                Stage("vision", vision, {})]

    @property
    def uses_vision_side(self) -> bool:
        """Visual prompts and adapter are off while the language stage trains."""
        return self.stage.name != "language"

    def encode_views(self, images, patch_transform=None):
        if not self.uses_vision_side:
            return self.clip.encode_image(images)
        if self.aple.adapter_on == "pixels":
            return super().encode_views(self.adapter(images))
        return super().encode_views(images, patch_transform=self.adapter)

    # ------------------------------------------------------------------ zero-shot guidance
    def zero_shot_text(self) -> torch.Tensor:
        """Normalised frozen CLIP features ``(K, D)`` of the dataset template; cached per class set."""
        return self.teacher.text_features(self.classnames, [self.template])

    def zero_shot_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.logits(self.teacher.image_features(images), self.zero_shot_text())

    def training_loss(self, images, labels):
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels)
        weight = self.stage.losses.get("kl_zero_shot", 0.0)
        if weight:
            target = F.softmax(self.zero_shot_logits(images), dim=-1)
            loss = loss + weight * F.kl_div(F.log_softmax(logits.float(), dim=-1), target, reduction="batchmean")
        return loss, logits


def build_aple(clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
               **overrides) -> Aple:
    own = {f.name for f in fields(ApleOptions)}
    options = ApleOptions(**{k: v for k, v in overrides.items() if k in own})
    prompt_overrides = {k: v for k, v in overrides.items() if k not in own}
    config = preset_config("aple", PROMPT_PRESET, clip, **prompt_overrides)
    return Aple(clip, classnames, template, config, options)
