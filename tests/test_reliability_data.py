"""Data that would give a wrong number without a word: classes short of the requested shots, hostile archives in
``vlprompt data prepare``, split files whose paths leave the image folder."""

from __future__ import annotations

import json
import random
import warnings

import pytest
from conftest_data import colour_patch_tree

from vlprompt.data import Datum, DatasetSplits, sample_few_shot
from vlprompt.data.fewshot import FewShotWarning, fewshot_indices, short_classes
from vlprompt.engine import build_config
from vlprompt.engine.runs import RunFolder, run_dir
from vlprompt.protocols import run_experiment

# --- shots larger than a class ---------------------------------------------------------------------------


def toy_splits(per_class: dict[str, int]) -> DatasetSplits:
    names = list(per_class)
    train = [Datum(f"/x/{name}/{i}.jpg", label, name) for label, name in enumerate(names)
             for i in range(per_class[name])]
    return DatasetSplits("toy", train, train[:2], train[:2], names, "a photo of a {}.", sample_val=False)


def test_short_classes_warn_with_their_counts_and_the_draw_stays_dassl_s(tmp_path):
    splits = toy_splits({"cat": 20, "dog": 3, "owl": 16, "emu": 0})
    with pytest.warns(FewShotWarning) as caught:
        subset = sample_few_shot(splits, 16, seed=2, cache_dir=tmp_path)
    message = str(caught[0].message)
    assert "toy: 2 of 4 classes have fewer than 16 training images" in message
    assert "dog 3" in message and "emu 0" in message and "cat" not in message and "owl" not in message
    assert short_classes(subset, 16) == {"dog": 3, "emu": 0}

    random.seed(2)  # the draw itself is unchanged: Dassl's, all items of a short class
    expected = [splits.train[i] for i in fewshot_indices([d.label for d in splits.train], 16)]
    assert subset.train == expected and sum(d.classname == "dog" for d in subset.train) == 3

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when every class has k images, nor for k < 1
        sample_few_shot(splits, 0, seed=2, use_cache=False)
        sample_few_shot(toy_splits({"cat": 5, "dog": 4}), 4, seed=2, use_cache=False)


def test_shared_class_names_are_told_apart():
    splits = DatasetSplits("x", [Datum("/a", 0, "missile")], [], [], ["missile", "missile"], "{}")
    assert short_classes(splits, 1) == {"missile (label 1)": 0}


def test_run_with_more_shots_than_images_records_the_counts_used(tmp_path):
    root = colour_patch_tree(tmp_path / "data", {"blue": (30, 30, 220), "red": (220, 30, 30)}, train=3, test=1)
    (root / "train" / "red" / "2.png").unlink()
    overrides = ["backbone.name=tiny", "backbone.pretrained=null", "device=cpu", "progress=false",
                 f"data.root={root}", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output={tmp_path / 'runs'}", "optim.epochs=1", "data.batch_size=2"]
    config = build_config(method="coop", protocol="few_shot", dataset="custom_folder", shots=100, seed=1,
                          overrides=overrides)
    results = run_experiment(config)
    assert results["shots"] == 100 and results["short_classes"] == {"blue": 3, "red": 2}
    folder = RunFolder(run_dir(config))
    with open(folder.results_file, encoding="utf-8") as file:
        assert json.load(file)["short_classes"] == {"blue": 3, "red": 2}
    with open(folder.log_file, encoding="utf-8") as file:
        assert "2 of 2 classes have fewer than 100 training images and train on all they have (blue 3, red 2)" \
            in file.read()
