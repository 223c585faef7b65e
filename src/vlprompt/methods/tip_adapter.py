"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a cache model built from the few-shot features.

Keys ``K (N, D)``: the training features averaged over ``views`` augmented passes, then L2-normalised; values
``V (N, C)``: the one-hot labels. For a normalised test feature f and normalised text features T:

    logits = logit_scale · f Tᵀ + α · exp(−β (1 − f Kᵀ)) V

Tip-Adapter trains nothing; Tip-Adapter-F fine-tunes the keys (only them) with cross-entropy at the initial α, β.
Either way α and β are then chosen on the validation features by the original code's grid
(``β ∈ {0.1 + i (s_β − 0.1) / n_β}``, ``α ∈ {0.1 + j (s_α − 0.1) / n_α}``, i < n_β, j < n_α; the first best
accuracy in β-major order). Both names build this class; their presets differ (Tip-Adapter: 0 epochs).

The values have one column per training class. Another class set (base → new, a transfer target) takes the
columns of its classes that were trained on and zero for the others, so that an unseen class is scored by the
zero-shot term alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.base import FeatureNeeds, Stage
from vlprompt.methods.on_features import FeatureMethod, resolve_options

DEFAULTS = dict(alpha=1.0, beta=1.0, views=10, search=True, search_scale=[7.0, 3.0], search_steps=[200, 20])


def cache_logits(image: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta) -> torch.Tensor:
    """``exp(−β (1 − f Kᵀ)) V``: ``(B, C)`` from normalised features ``(B, D)``, keys ``(N, D)``, values ``(N, C)``."""
    return torch.exp(-beta * (1 - image @ keys.T)) @ values


def search_grid(scale: float, steps: int) -> list[float]:
    """The original code's grid: ``steps`` values from 0.1 up to (not including) ``scale``."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


class TipAdapter(FeatureMethod):
    name = "tip_adapter"

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                 name: str = "tip_adapter", **options):
        options = resolve_options(name, DEFAULTS, options)
        if options["views"] < 1 or len(options["search_scale"]) != 2 or len(options["search_steps"]) != 2:
            raise ConfigError(f"{name}: needs views >= 1 and two-element search_scale / search_steps, got {options}")
        super().__init__(clip, classnames, template, options)
        self.name = name
        self.feature_needs = FeatureNeeds(views=options["views"], augment=True)
        # α and β are chosen, not trained: saved with the learned state, never given to the optimizer.
        self.alpha = nn.Parameter(torch.tensor(float(options["alpha"])), requires_grad=False)
        self.beta = nn.Parameter(torch.tensor(float(options["beta"])), requires_grad=False)
        self.register_buffer("cache_values", torch.zeros(0, len(classnames)), persistent=False)
        self.set_stage(self.stages()[0])

    def stages(self) -> list[Stage]:
        return [Stage("main", trainable=("cache_keys",))]

    # ------------------------------------------------------------------ the cache
    def prepare_features(self, features) -> None:
        """Keys from the mean of the training views, values from the labels (one row per training image)."""
        self._set_cache(F.normalize(features.train.mean(dim=0), dim=-1), features.train_labels)

    def _set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Keys ``(N, D)`` (trained in Tip-Adapter-F) and labels ``(N,)`` (saved with them, never trained) of the
        cache; the values are the labels one-hot."""
        device = self.alpha.device
        self.cache_keys = nn.Parameter(keys.float().to(device))
        self.cache_labels = nn.Parameter(labels.float().to(device), requires_grad=False)
        self.cache_values = F.one_hot(labels.long().to(device), len(self.trained_classnames)).float()
        self.set_stage(self.stage)

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Also a cache saved by another process (``vlprompt eval``, ``vlprompt.load``): the state holds it whole."""
        if "cache_keys" in state and "cache_labels" in state:
            self._set_cache(state["cache_keys"], state["cache_labels"])
        super().load_prompt_state_dict(state)

    def current_values(self) -> torch.Tensor:
        """``(N, K)``: the value columns of the current classes (zero for a class not trained on)."""
        rows = self.trained_index().to(self.cache_values.device)
        padded = torch.cat([self.cache_values, torch.zeros_like(self.cache_values[:, :1])], dim=1)
        return padded[:, rows]  # index -1 takes the zero column

    def logits_from_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image = F.normalize(image, dim=-1)
        logits = self.clip.logit_scale.float() * image @ text.T
        if not hasattr(self, "cache_keys"):  # no cache built yet: zero-shot CLIP
            return logits
        return logits + self.alpha * cache_logits(image, self.cache_keys, self.current_values(), self.beta)

    def fit_features(self, features) -> dict:
        """Search α and β on the validation features (when the option ``search`` is on)."""
        if not self.options["search"]:
            return {"alpha": self.alpha.item(), "beta": self.beta.item(), "searched": False}
        if not len(features.val):
            raise ConfigError(f"{self.name}: the alpha/beta search needs a validation split, and this dataset has "
                              "none; set method.options.search=false")
        (beta_scale, alpha_scale), (beta_steps, alpha_steps) = self.options["search_scale"], \
            self.options["search_steps"]
        betas, alphas = search_grid(beta_scale, beta_steps), search_grid(alpha_scale, alpha_steps)
        correct = self._grid_correct(features.val, features.val_labels, betas, alphas)  # (n_β, n_α)
        best = int(torch.argmax(correct.flatten()))  # the first maximum, β-major
        beta, alpha = betas[best // len(alphas)], alphas[best % len(alphas)]
        with torch.no_grad():
            self.alpha.fill_(alpha)
            self.beta.fill_(beta)
        return {"alpha": alpha, "beta": beta, "searched": True,
                "val_accuracy": 100.0 * correct.flatten()[best].item() / len(features.val)}

    @torch.no_grad()
    def _grid_correct(self, val: torch.Tensor, labels: torch.Tensor, betas: list, alphas: list,
                      chunk: int = 1024) -> torch.Tensor:
        """``(len(betas), len(alphas))`` counts of correct validation predictions, in chunks of val images."""
        device = self.cache_keys.device
        keys, text = self.cache_keys.float(), self.text_features().to(device)
        key_labels = self.cache_values.argmax(dim=1)  # one-hot values: "@ V" is a sum per class (index_add)
        alpha = torch.tensor(alphas, device=device).view(-1, 1, 1)
        correct = torch.zeros(len(betas), len(alphas), dtype=torch.long)
        for start in range(0, len(val), chunk):
            image = F.normalize(val[start:start + chunk].to(device), dim=-1)
            target = labels[start:start + chunk].to(device)
            zero_shot = self.clip.logit_scale.float() * image @ text.T
            affinity = image @ keys.T
            for i, beta in enumerate(betas):
                cache = torch.zeros_like(zero_shot).index_add_(1, key_labels, torch.exp(-beta * (1 - affinity)))
                predictions = (zero_shot + alpha * cache).argmax(-1)  # (n_α, b)
                correct[i] += (predictions == target).sum(-1).cpu()
        return correct


def build_tip_adapter(clip, classnames, template="a photo of a {}.", **options) -> TipAdapter:
    return TipAdapter(clip, classnames, template, name="tip_adapter", **options)


def build_tip_adapter_f(clip, classnames, template="a photo of a {}.", **options) -> TipAdapter:
    return TipAdapter(clip, classnames, template, name="tip_adapter_f", **options)
