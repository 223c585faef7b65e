"""SGD (or AdamW) and the per-epoch warmup + cosine learning-rate schedule of the Dassl engine.

Dassl builds ``CosineAnnealingLR(T_max = MAX_EPOCH)`` wrapped in a ``ConstantWarmupScheduler`` and steps it once
per epoch. The rates that result are reproduced here as a closed formula rather than through stateful PyTorch
schedulers, so resuming is exact and the schedule can be read top to bottom:

* epochs ``e < W`` (warmup, W = 1 by default) run at the constant ``warmup_lr`` (1e-5);
* epochs ``e >= W`` run at ``lr · ½(1 + cos(π (e − W) / E))`` with E the total number of epochs.

The cosine therefore never reaches 0 inside training, exactly as in the original code.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from vlprompt.engine.config import OptimConfig


def learning_rate(epoch: int, optim: OptimConfig) -> float:
    """The learning rate of (0-based) ``epoch``."""
    if epoch < optim.warmup_epochs:
        return optim.warmup_lr
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - optim.warmup_epochs) / optim.epochs))


def build_optimizer(parameters: Iterable[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """Plain SGD (no Nesterov, no dampening) with momentum and weight decay, as Dassl's defaults; or AdamW
    (``optim.optimizer = "adamw"``, decoupled ``weight_decay``, ``adam_eps``) for the methods whose original code
    uses it. The learning rate is set by :class:`EpochSchedule` either way."""
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(list(parameters), lr=learning_rate(0, optim), eps=optim.adam_eps,
                                 weight_decay=optim.weight_decay)
    return torch.optim.SGD(list(parameters), lr=learning_rate(0, optim), momentum=optim.momentum,
                           weight_decay=optim.weight_decay)


class EpochSchedule:
    """Sets the learning rate of an optimizer at the start of each epoch (state: the epoch only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig):
        self.optimizer = optimizer
        self.optim = optim
        self.epoch = 0

    def start_epoch(self, epoch: int) -> float:
        self.epoch = epoch
        lr = learning_rate(epoch, self.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "kind": "warmup_cosine_per_epoch"}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
