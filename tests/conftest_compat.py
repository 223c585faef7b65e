"""Helpers for the tests that write checkpoints the way the original Dassl-based code bases do."""

import sys
import types
from contextlib import contextmanager


@contextmanager
def dassl_importable():
    """Make ``dassl.optim.lr_scheduler.ConstantWarmupScheduler`` importable while saving, gone afterwards: the
    original checkpoints pickle a scheduler object of that class, which our reader must not need to import."""
    names = ["dassl", "dassl.optim", "dassl.optim.lr_scheduler"]
    modules = {name: types.ModuleType(name) for name in names}

    class ConstantWarmupScheduler:
        def __init__(self, successor=None):
            self.successor, self.warmup_epoch, self.cons_lr, self.last_epoch = successor, 1, 1e-5, 4

    ConstantWarmupScheduler.__module__ = "dassl.optim.lr_scheduler"
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    modules["dassl.optim.lr_scheduler"].ConstantWarmupScheduler = ConstantWarmupScheduler
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(modules)
    try:
        yield ConstantWarmupScheduler
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
