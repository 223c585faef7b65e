"""Linear-probe CLIP, CoOp's protocol (``lpclip/linear_probe.py``): multinomial logistic regression with an L2
penalty on the L2-normalised frozen image features, its strength chosen on the validation split.

The classifier minimises sklearn's ``LogisticRegression(penalty="l2", C=c)`` objective
``½‖W‖² + c · Σᵢ CE(W fᵢ + b, yᵢ)`` (bias not penalised), here divided by ``c · N`` for conditioning (same
minimiser), by full-batch L-BFGS in float64 on the cached features. The search over ``c`` is CoOp's: each value of
``c_grid`` is fitted and scored on the validation features; around the best one, ``c_left = best / 10`` and
``c_right = best · 10`` are refined by ``search_steps`` bisections in log10 space, each moving the end with the
lower validation accuracy to the midpoint (the left one on a tie); the final ``c`` is the better end (the right one
on a tie), and the classifier is fitted with it on the training features.

A probe has one row per training class: it cannot score a class it was not trained on. Class sets made of
training classes (ImageNet → ImageNet-A/R's 200 classes) use those rows; any other is reported as not available.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods.base import FeatureNeeds
from vlprompt.methods.on_features import FeatureMethod, resolve_options

DEFAULTS = dict(c_grid=[1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6], search_steps=8, c=None, max_iter=1000)
UNSEEN = "linear probe cannot classify unseen classes"


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, c: float,
                 max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W (K, D), b (K,))`` minimising ``mean CE(W x + b, y) + ‖W‖² / (2 c N)`` over ``features (N, D)``, on
    their device (float64; float32 on MPS, which has no float64)."""
    x = features.to(torch.float32 if features.device.type == "mps" else torch.float64)
    labels = labels.to(x.device)
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + (weight ** 2).sum() / (2 * c * len(x))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


def search_c(val_accuracy: Callable[[float], float], grid: Sequence[float], steps: int) -> tuple[float, list]:
    """CoOp's search of the regularisation strength: ``(chosen c, [(c, val accuracy), ...] in the order tried)``."""
    trace = []

    def score(c: float) -> float:
        trace.append((c, val_accuracy(c)))
        return trace[-1][1]

    scores = [score(c) for c in grid]
    peak = grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]  # the first of the best
    left, right = peak / 10, peak * 10
    accuracy_left, accuracy_right = score(left), score(right)
    for _ in range(steps):
        middle = 10 ** (0.5 * (math.log10(left) + math.log10(right)))
        if accuracy_left < accuracy_right:
            left, accuracy_left = middle, score(middle)
        else:
            right, accuracy_right = middle, score(middle)
    return (left if accuracy_left > accuracy_right else right), trace


class LinearProbe(FeatureMethod):
    name = "linear_probe"
    feature_needs = FeatureNeeds(views=1, augment=False)

    def __init__(self, clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                 **options):
        options = resolve_options(self.name, DEFAULTS, options)
        if options["c"] is not None and not options["c"] > 0 or not options["c_grid"] or \
                any(not c > 0 for c in options["c_grid"]) or options["search_steps"] < 0:
            raise ConfigError(f"linear_probe: c and every c_grid value must be > 0, search_steps >= 0; got {options}")
        super().__init__(clip, classnames, template, options)
        self.weight = nn.Parameter(torch.zeros(len(classnames), clip.embed_dim))
        self.bias = nn.Parameter(torch.zeros(len(classnames)))

    def encode_classes(self) -> None:
        """Nothing: the probe does not use the text tower."""
        return None

    def unavailable_reason(self, classnames: list[str]) -> str | None:
        known = set(self.trained_classnames)
        return None if all(name in known for name in classnames) else UNSEEN

    def logits_from_features(self, image: torch.Tensor, text=None) -> torch.Tensor:
        rows = self.trained_index()
        if (rows < 0).any():
            raise ConfigError(f"{UNSEEN}: {[n for n, r in zip(self.classnames, rows.tolist()) if r < 0][:5]}")
        rows = rows.to(self.weight.device)
        return F.normalize(image, dim=-1) @ self.weight[rows].T + self.bias[rows]

    def forward(self, inputs: torch.Tensor, class_side=None) -> torch.Tensor:
        return self.logits_from_features(self.image_features(inputs))

    def fit_features(self, features) -> dict:
        """Choose ``c`` on the validation features (unless the option ``c`` fixes it), then fit on the training
        features."""
        device = self.weight.device  # the fits run where the method runs (a GPU makes ImageNet's fast)
        train = F.normalize(features.train[0].to(device), dim=-1)
        labels = features.train_labels.to(device)
        classes, max_iter = len(self.trained_classnames), self.options["max_iter"]
        trace: list = []
        c = self.options["c"]
        if c is None:
            if not len(features.val):
                raise ConfigError("linear_probe: the regularisation search needs a validation split, and this "
                                  "dataset has none; set method.options.c")
            val, val_labels = F.normalize(features.val.to(device), dim=-1), features.val_labels.to(device)

            def val_accuracy(c_value: float) -> float:
                weight, bias = fit_logistic(train, labels, classes, c_value, max_iter)
                return 100.0 * int(((val @ weight.T + bias).argmax(-1) == val_labels).sum()) / len(val)

            c, trace = search_c(val_accuracy, self.options["c_grid"], self.options["search_steps"])
        weight, bias = fit_logistic(train, labels, classes, c, max_iter)
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
        return {"c": c, "search": [{"c": value, "val_accuracy": accuracy} for value, accuracy in trace]}
