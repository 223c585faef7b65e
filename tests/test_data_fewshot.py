"""Few-shot sampling identical to Dassl, its cache, and base-to-new class selection."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from vlprompt.data import Datum, DatasetSplits, build_dataset, sample_few_shot, subsample_classes
from vlprompt.data import fewshot
from vlprompt.errors import ConfigError


def dassl_generate_fewshot_dataset(*data_sources, num_shots):
    """Dassl ``DatasetBase.generate_fewshot_dataset`` (repeat=False), written out as the original does."""
    output = []
    for data_source in data_sources:
        tracker = defaultdict(list)
        for item in data_source:
            tracker[item.label].append(item)
        dataset = []
        for label, items in tracker.items():
            if len(items) >= num_shots:
                sampled_items = random.sample(items, num_shots)
            else:
                sampled_items = items
            dataset.extend(sampled_items)
        output.append(dataset)
    return output[0] if len(output) == 1 else output


def dassl_subsample_classes(*args, subsample):
    """CoOp ``OxfordPets.subsample_classes``."""
    labels = sorted({item.label for item in args[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return [[Datum(i.path, relabeler[i.label], i.classname) for i in d if i.label in selected] for d in args]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Dataset folders without images: the splits are read with check_files=False."""
    root = tmp_path_factory.mktemp("fewshot")
    for folder in ("oxford_flowers/jpg", "eurosat/2750", "oxford_pets/images"):
        (root / folder).mkdir(parents=True)
    return root


def load(root, name):
    return build_dataset(name, root, check_files=False)


@pytest.mark.parametrize("name", ["oxford_flowers", "eurosat"])
@pytest.mark.parametrize("shots, seed", [(1, 1), (4, 2), (16, 3), (2000, 1)])
def test_matches_dassl(root, tmp_path, name, shots, seed):
    splits = load(root, name)
    # What CoOp does: set_random_seed(seed), then train with k shots, then val with min(k, 4).
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    expected_train = dassl_generate_fewshot_dataset(splits.train, num_shots=shots)
    expected_val = dassl_generate_fewshot_dataset(splits.val, num_shots=min(shots, 4))
    expected_state = random.getstate()

    subset = sample_few_shot(splits, shots, seed, cache_dir=tmp_path)
    assert subset.train == expected_train and subset.val == expected_val
    assert random.getstate() == expected_state
    assert subset.test == splits.test and subset.classnames == splits.classnames
    per_class = min(shots, min(sum(d.label == c for d in splits.train) for c in range(splits.num_classes)))
    assert len(subset.train) >= per_class * splits.num_classes
    # The cached subset is the same and is really read back.
    subset_again = sample_few_shot(splits, shots, seed, cache_dir=tmp_path)
    assert subset_again == subset


def test_flowers_groups_in_first_appearance_order(root, tmp_path):
    splits = load(root, "oxford_flowers")
    subset = sample_few_shot(splits, 2, 1, use_cache=False)
    assert subset.train[0].label == 76  # the first item of the file has label 76, not 0
    assert [d.label for d in subset.train[::2]] == list(dict.fromkeys(d.label for d in splits.train))


def test_imagenet_family_samples_train_only(tmp_path):
    items = [Datum(f"/x/{i}.jpg", i % 5, f"c{i % 5}") for i in range(100)]
    splits = DatasetSplits("imagenet", items, items[:10], items[:10], [f"c{i}" for i in range(5)], "{}",
                           sample_val=False)
    random.seed(3)
    expected = dassl_generate_fewshot_dataset(items, num_shots=4)
    subset = sample_few_shot(splits, 4, 3, cache_dir=tmp_path)
    assert subset.train == expected and subset.val == items[:10]


def test_zero_shots_keeps_everything_and_seeds(root):
    splits = load(root, "eurosat")
    assert sample_few_shot(splits, 0, 5, use_cache=False) is splits
    assert torch.rand(1).item() == (torch.manual_seed(5), torch.rand(1).item())[1]
    with pytest.raises(ConfigError, match="shots"):
        sample_few_shot(splits, 1.5, 1)


def test_same_images_in_another_process(root, tmp_path):
    script = (
        "import json, sys; from vlprompt.data import build_dataset, sample_few_shot;"
        f"s = build_dataset('oxford_pets', {str(root)!r}, check_files=False);"
        "f = sample_few_shot(s, 8, 2, use_cache=False);"
        "print(json.dumps([[d.path, d.label] for d in f.train + f.val]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    subset = sample_few_shot(load(root, "oxford_pets"), 8, 2, use_cache=False)
    assert json.loads(out.stdout) == [[d.path, d.label] for d in subset.train + subset.val]
    assert len(subset.train) == 37 * 8 and len(subset.val) == 37 * 4


def test_cache_file_contents_and_location(root, tmp_path, monkeypatch):
    splits = load(root, "eurosat")
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    subset = sample_few_shot(splits, 2, 1)
    files = list((tmp_path / "cache" / "fewshot" / "eurosat").iterdir())
    assert len(files) == 1 and files[0].name.startswith("shot_2-seed_1-")
    data = json.loads(files[0].read_text())
    assert [e["path"] for e in data["train"]] == [d.path for d in subset.train]
    assert {"label", "classname", "index"} <= set(data["val"][0])
    monkeypatch.delenv("VLPROMPT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fewshot.default_cache_dir() == str(tmp_path / "home" / ".cache" / "vlprompt" / "fewshot")


def test_cache_hit_does_not_resample(root, tmp_path, monkeypatch):
    splits = load(root, "eurosat")
    first = sample_few_shot(splits, 4, 1, cache_dir=tmp_path)
    monkeypatch.setattr(fewshot, "fewshot_indices", lambda *a: pytest.fail("resampled despite a valid cache"))
    assert sample_few_shot(splits, 4, 1, cache_dir=tmp_path) == first


def test_cache_invalidated_by_split_k_and_seed(root, tmp_path):
    splits = load(root, "eurosat")
    path = fewshot.cache_file(splits, 4, 1, tmp_path)
    assert fewshot.cache_file(splits, 8, 1, tmp_path) != path
    assert fewshot.cache_file(splits, 4, 2, tmp_path) != path
    edited_train = list(splits.train)
    edited_train[0] = dataclasses.replace(edited_train[0], label=1)
    edited = dataclasses.replace(splits, train=edited_train)
    assert fewshot.cache_file(edited, 4, 1, tmp_path) != path
    edited_val = dataclasses.replace(splits, val=splits.val[1:])
    assert fewshot.cache_file(edited_val, 4, 1, tmp_path) != path
    sample_few_shot(splits, 4, 1, cache_dir=tmp_path)
    sample_few_shot(edited, 4, 1, cache_dir=tmp_path)
    sample_few_shot(splits, 8, 1, cache_dir=tmp_path)
    assert len(list((tmp_path / "eurosat").iterdir())) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tampered"])
def test_corrupted_cache_ignored_and_rewritten(root, tmp_path, damage):
    splits = load(root, "eurosat")
    fresh = sample_few_shot(splits, 4, 1, use_cache=False)
    path = fewshot.cache_file(splits, 4, 1, tmp_path)
    sample_few_shot(splits, 4, 1, cache_dir=tmp_path)
    data = json.loads(open(path).read())
    if damage == "garbage":
        text = "{not json"
    elif damage == "truncated":
        data["train"] = data["train"][:-1]
        text = json.dumps(data)
    else:
        data["train"][0]["index"] += 1
        text = json.dumps(data)
    with open(path, "w") as file:
        file.write(text)
    with pytest.warns(UserWarning, match="ignoring corrupted few-shot cache"):
        subset = sample_few_shot(splits, 4, 1, cache_dir=tmp_path)
    assert subset == fresh
    assert json.loads(open(path).read())["checksum"]  # rewritten as a valid file


def test_unwritable_cache_warns(root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the few-shot cache"):
        subset = sample_few_shot(load(root, "eurosat"), 1, 1, cache_dir=blocker)
    assert len(subset.train) == 10


# --- base-to-new -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "new"])
def test_subsample_classes_matches_coop(root, which):
    splits = sample_few_shot(load(root, "oxford_pets"), 16, 1, use_cache=False)
    result = subsample_classes(splits, which)
    train, val, test = dassl_subsample_classes(splits.train, splits.val, splits.test, subsample=which)
    assert (result.train, result.val, result.test) == (train, val, test)
    m = math.ceil(37 / 2)
    selected = list(range(m)) if which == "base" else list(range(m, 37))
    assert result.classnames == [splits.classnames[i] for i in selected]
    assert result.num_classes == (19 if which == "base" else 18)
    for items in (result.train, result.val, result.test):
        assert {d.label for d in items} == set(range(result.num_classes))
        assert all(result.classnames[d.label] == d.classname for d in items)
    assert subsample_classes(splits, "all") is splits


def test_subsample_uses_labels_present_in_train():
    names = [f"c{i}" for i in range(6)]
    items = [Datum(f"/{i}.jpg", i, names[i]) for i in range(6)]
    splits = DatasetSplits("x", [items[i] for i in (5, 1, 3)], [], items, names, "{}")  # train has 1, 3, 5
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert base.classnames == ["c1", "c3"] and [d.label for d in base.test] == [0, 1]
    assert new.classnames == ["c5"] and [d.path for d in new.test] == ["/5.jpg"]
    with pytest.raises(ConfigError, match="'base' or 'new'"):
        subsample_classes(splits, "novel")
