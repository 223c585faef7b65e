"""Training engine: config, optimiser and schedule, the training loop, evaluation, checkpoints and run folders.

Typical use from Python (the CLI does the same through :mod:`vlprompt.experiments.protocols`)::

    from vlprompt.engine import build_config
    from vlprompt.experiments.protocols import run_experiment

    config = build_config(method="coop", protocol="base2new", dataset="dtd", seed=1,
                          overrides=["data.root=~/data"])
    results = run_experiment(config)      # -> runs/base2new/dtd/coop/shots_16/seed_1/results.json

or, with your own data pipeline, :func:`fit` and :func:`evaluate` on any ``PromptMethod`` and torch dataset.
"""

from vlprompt.lazy import lazy_exports

# Imported on first use (see vlprompt.lazy), so that importing the package does not import torch.
lazy_exports(__name__, {
    "load_checkpoint": "checkpoint",
    "load_prompts": "checkpoint",
    "save_prompts": "checkpoint",
    "seed_everything": "checkpoint",
    "BackboneConfig": "config",
    "DataConfig": "config",
    "EvalConfig": "config",
    "MethodConfig": "config",
    "OptimConfig": "config",
    "RunConfig": "config",
    "build_config": "config",
    "resolve_preset": "config",
    "validate": "config",
    "EvalResult": "evaluate",
    "evaluate": "evaluate",
    "EpochSchedule": "optim",
    "build_optimizer": "optim",
    "learning_rate": "optim",
    "RunFolder": "runs",
    "find_runs": "runs",
    "run_dir": "runs",
    "TrainSummary": "trainer",
    "fit": "trainer",
    "resolve_device": "trainer",
})

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
