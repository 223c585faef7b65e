"""Protocols and run folders through the Python API (tiny CLIP, generated image folders)."""

import json
import os
import warnings

import pytest

from conftest_data import colour_patch_tree
from vlprompt.engine import build_config
from vlprompt.engine.checkpoint import load_prompts
from vlprompt.engine.runs import RunFolder, run_dir
from vlprompt.errors import ConfigError
from vlprompt.experiments.protocols import PROTOCOLS, harmonic_mean, plan, run_experiment


def make_tree(root, colours, train=3, test=2):
    return colour_patch_tree(root, colours, train, test, seed=1)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    source = make_tree(base / "source", {"blue": (30, 30, 220), "red": (220, 30, 30), "green": (30, 200, 30)})
    target = make_tree(base / "target", {"black": (10, 10, 10), "white": (245, 245, 245)}, train=1)
    return source, target


def config(tmp_path, trees, **kwargs):
    source, _ = trees
    overrides = ["backbone.name=tiny", "backbone.pretrained=null", "device=cpu", "progress=false",
                 f"data.root={source}", "data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}",
                 f"output={tmp_path / 'runs'}", "optim.epochs=1", "data.batch_size=3"] + kwargs.pop("overrides", [])
    return build_config(dataset="custom_folder", overrides=overrides, **kwargs)


def test_protocol_defaults():
    assert PROTOCOLS["few_shot"].shots == (1, 2, 4, 8, 16) and PROTOCOLS["base2new"].shots == (16,)
    assert len(PROTOCOLS["base2new"].datasets) == 11 and PROTOCOLS["cross_dataset"].datasets == ("imagenet",)
    assert len(PROTOCOLS["cross_dataset"].targets) == 10 and "imagenet" not in PROTOCOLS["cross_dataset"].targets
    assert PROTOCOLS["cross_domain"].targets == ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    configs = plan("cross-domain", methods=["maple", "coop"])
    assert [(c.method.name, c.data.dataset, c.data.shots, c.seed) for c in configs][:3] == [
        ("maple", "imagenet", 16, 1), ("maple", "imagenet", 16, 2), ("maple", "imagenet", 16, 3)]
    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.655, abs=1e-3)


def test_cross_dataset_evaluates_source_and_targets_with_their_class_names(tmp_path, trees):
    _, target = trees
    cfg = config(tmp_path, trees, method="coop", protocol="cross_dataset", shots=2,
                 overrides=[f"eval.targets=[custom_folder@{target}]"])
    results = run_experiment(cfg)
    label = f"custom_folder@{target}"
    assert set(results["evaluations"]) == {"source", label}
    assert results["evaluations"]["source"]["classnames"] == ["blue", "green", "red"]
    assert results["evaluations"][label]["classnames"] == ["black", "white"]
    assert results["evaluations"][label]["total"] == 4
    assert results["metrics"]["average"] == results["metrics"][label]
    assert results["train_classes"] == "all"

    # cross_domain evaluates the same source model: it reuses the prompts instead of training again
    domain_cfg = config(tmp_path, trees, method="coop", protocol="cross_domain", shots=2,
                        overrides=[f"eval.targets=[custom_folder@{target}]"])
    domain = run_experiment(domain_cfg)
    domain_folder, source_folder = RunFolder(run_dir(domain_cfg)), RunFolder(run_dir(cfg))
    assert "reusing the prompts trained by" in open(domain_folder.log_file).read()
    assert open(domain_folder.prompts_file, "rb").read() == open(source_folder.prompts_file, "rb").read()
    assert domain["metrics"] == results["metrics"] and domain["training"] == results["training"]


def test_zero_shot_run_trains_nothing_and_still_writes_a_complete_run(tmp_path, trees):
    cfg = config(tmp_path, trees, method="zeroshot", protocol="few_shot", shots=1)
    assert cfg.optim.epochs == 1  # our override; the zeroshot preset says 0, nothing is trainable anyway
    results = run_experiment(cfg)
    assert results["training"]["epochs"] == 0 and 0 <= results["metrics"]["accuracy"] <= 100
    tensors, metadata = load_prompts(RunFolder(run_dir(cfg)).prompts_file)
    assert tensors == {} and metadata["method"] == "zeroshot"


def test_finished_run_is_kept_unless_overwrite_and_corrupt_images_are_counted(tmp_path, trees):
    source, _ = trees
    cfg = config(tmp_path, trees, method="coop", protocol="few_shot", shots=3)
    folder = RunFolder(run_dir(cfg))
    first = run_experiment(cfg)
    assert folder.status() == "finished"
    again = run_experiment(cfg)
    assert again == first  # read back, not re-run

    # a corrupt training image: skipped and counted, never a crash
    corrupt_tree = tmp_path / "corrupt"
    make_tree(corrupt_tree, {"blue": (30, 30, 220), "red": (220, 30, 30)})
    (corrupt_tree / "train" / "red" / "0.png").write_bytes(b"broken")
    (corrupt_tree / "test" / "blue" / "0.png").write_bytes(b"broken")
    cfg2 = config(tmp_path, trees, method="coop", protocol="few_shot", shots=3,
                  overrides=[f"data.root={corrupt_tree}", "tag=corrupt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run_experiment(cfg2, overwrite=True)
    assert results["training"]["skipped_images"] == 1
    assert results["evaluations"]["test"]["skipped_images"] == 1 and results["evaluations"]["test"]["total"] == 3
    assert run_dir(cfg2).endswith("custom_folder-corrupt/coop-corrupt@tiny/shots_3/seed_1")


def test_unfinished_run_with_other_settings_is_not_mixed(tmp_path, trees):
    cfg = config(tmp_path, trees, method="coop", protocol="few_shot", shots=2)
    folder = RunFolder(run_dir(cfg))
    run_experiment(cfg)
    # make it look interrupted after training
    os.remove(folder.results_file)
    other = config(tmp_path, trees, method="coop", protocol="few_shot", shots=2, overrides=["optim.lr=0.5"])
    with pytest.raises(ConfigError, match=r"optim.lr: 0.002 -> 0.5.*--overwrite"):
        run_experiment(other)
    results = run_experiment(other, overwrite=True)
    assert json.loads(open(folder.config_file).read())["optim"]["lr"] == 0.5
    assert results["metrics"]["accuracy"] >= 0
