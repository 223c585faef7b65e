"""The learning tier: CoOp, MaPLe and ALIGN must learn, end to end, on a fixed small toy task.

Task: 4-shot ``toy_signs`` with the shipped toy CLIP, through the same engine path as ``vlprompt train``
(:func:`vlprompt.experiments.protocols.run_experiment`). Its 36 classes are color × shape compositions whose shapes are named
with words the toy CLIP never read in pretraining ("red disc", "blue wedge", ...): zero-shot CLIP is near chance
(5.3 %, chance 2.8 %), and every point above that is learned from the shots. Each method, with each of three
seeds, must beat zero-shot by at least its :data:`MARGIN`: half the smallest gain measured for that method
(docs/toyworld.md, "The learning tier"), so a regression that loses half the learning fails, while seed noise does
not.
"""

from __future__ import annotations

import pytest

from vlprompt.cli.demo import DEMO_LR, DEMO_METHOD_OPTIONS
from vlprompt.engine.config import build_config
from vlprompt.experiments.protocols import run_experiment

DATASET = "toy_signs"
SHOTS = 4
EPOCHS = 8
SEEDS = (1, 2, 3)
METHODS = ("coop", "maple", "align")
# Gains over zero-shot (5.28 %) measured with the shipped weights, seeds 1 / 2 / 3 (docs/toyworld.md):
# CoOp +12.22 / +15.83 / +16.11, MaPLe +38.06 / +29.44 / +37.50, ALIGN +34.72 / +37.22 / +45.56.
# Each method's margin is its smallest measured gain times the safety factor.
MEASURED_MIN_GAIN = {"coop": 12.22, "maple": 29.44, "align": 34.72}
SAFETY_FACTOR = 0.5
MARGIN = {method: round(gain * SAFETY_FACTOR, 2) for method, gain in MEASURED_MIN_GAIN.items()}


def _config(method: str, seed: int, root):
    cli = {
        "backbone": {"name": "toy", "pretrained": None},
        "method": {"options": DEMO_METHOD_OPTIONS.get(method, {})},
        "data": {"root": str(root / "data"), "batch_size": 32, "num_workers": 0, "crop_scale": [0.85, 1.0],
                 "options": {"n_train_per_class": SHOTS, "n_val_per_class": 1, "n_test_per_class": 10},
                 "cache_dir": str(root / "cache")},
        "optim": {} if method == "zeroshot" else dict(lr=DEMO_LR[method], epochs=EPOCHS, warmup_epochs=0,
                                                        stop_epoch=None),
        "eval": {"batch_size": 120},
        "output": str(root / "runs"),
        "device": "cpu",
        "tag": "learning",
    }
    return build_config(method=method, protocol="few_shot", dataset=DATASET, shots=SHOTS, seed=seed, cli=cli)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(method, seed)`` → test accuracy (%), each run once per module (the data folder is shared)."""
    root = tmp_path_factory.mktemp("learning")
    done: dict[tuple[str, int], float] = {}

    def accuracy(method: str, seed: int) -> float:
        if (method, seed) not in done:
            done[method, seed] = run_experiment(_config(method, seed, root))["metrics"]["accuracy"]
        return done[method, seed]

    return accuracy


@pytest.mark.parametrize("method", METHODS)
def test_prompt_learning_beats_zero_shot_by_the_margin_with_every_seed(run, method):
    zero_shot = run("zeroshot", 1)  # no training: the same for every seed
    gains = {seed: round(run(method, seed) - zero_shot, 2) for seed in SEEDS}
    assert min(gains.values()) >= MARGIN[method], f"{method}: gains over zero-shot {zero_shot:.1f} % per seed: {gains}"
