"""Training engine: config, optimiser and schedule, the training loop, evaluation, checkpoints and run folders.

Typical use from Python (the CLI does the same through :mod:`vlprompt.protocols`)::

    from vlprompt.engine import build_config
    from vlprompt.protocols import run_experiment

    config = build_config(method="coop", protocol="base2new", dataset="dtd", seed=1,
                          overrides=["data.root=~/data"])
    results = run_experiment(config)      # -> runs/base2new/dtd/coop/shots_16/seed_1/results.json

or, with your own data pipeline, :func:`fit` and :func:`evaluate` on any ``PromptMethod`` and torch dataset.
"""

from vlprompt.engine.checkpoint import load_checkpoint, load_prompts, save_prompts, seed_everything
from vlprompt.engine.config import (
    BackboneConfig,
    DataConfig,
    EvalConfig,
    MethodConfig,
    OptimConfig,
    RunConfig,
    build_config,
    resolve_preset,
    validate,
)
from vlprompt.engine.evaluate import EvalResult, evaluate
from vlprompt.engine.optim import EpochSchedule, build_optimizer, learning_rate
from vlprompt.engine.runs import RunFolder, find_runs, run_dir
from vlprompt.engine.trainer import TrainSummary, fit, resolve_device

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "EpochSchedule",
    "EvalConfig",
    "EvalResult",
    "MethodConfig",
    "OptimConfig",
    "RunConfig",
    "RunFolder",
    "TrainSummary",
    "build_config",
    "build_optimizer",
    "evaluate",
    "find_runs",
    "fit",
    "learning_rate",
    "load_checkpoint",
    "load_prompts",
    "resolve_device",
    "resolve_preset",
    "run_dir",
    "save_prompts",
    "seed_everything",
    "validate",
]
