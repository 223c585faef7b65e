"""End to end through ``vlprompt.cli.main`` on the tiny CLIP and a generated image-folder dataset."""

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest_data import COLOURS, colour_patch_tree
from vlprompt.cli import main



def make_tree(root: Path, train: int = 4, test: int = 2, colours=COLOURS) -> Path:
    return colour_patch_tree(root, colours, train, test)


def common(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(tree), "--backbone", "tiny", "--pretrained", "none", "--output", str(out), "--quiet",
            "--set", "data.num_workers=0", "--set", f"data.cache_dir={out / 'cache'}", "--set", "data.batch_size=4",
            *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def base2new_runs(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    argv = ["run", "base2new", "--methods", "coop,maple", "--datasets", "custom_folder", "--seeds", "1,2",
            *common(tree, out, "--set", "optim.epochs=2")]
    assert main(argv) == 0
    return out, argv


def results_of(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.rglob("results.json"))]


def test_run_base2new_then_report_shows_the_numbers_of_the_results_files(base2new_runs, capsys):
    out, argv = base2new_runs
    results = results_of(out)
    assert sorted((r["method"], r["seed"]) for r in results) == [("coop", 1), ("coop", 2), ("maple", 1),
                                                                 ("maple", 2)]
    for r in results:
        assert r["protocol"] == "base2new" and r["shots"] == 16 and r["train_classes"] == "base"
        assert r["evaluations"]["base"]["classnames"] == ["blue", "green"]
        assert r["evaluations"]["new"]["classnames"] == ["red", "yellow"]
        assert r["evaluations"]["base"]["total"] == 4 and len(r["evaluations"]["new"]["per_class_accuracy"]) == 2
        assert r["environment"]["torch"] == torch.__version__ and r["backbone"]["name"] == "tiny"
        assert r["training"]["epochs"] == 2 and r["wall_time_s"] > 0
    for folder in {p.parent for p in out.rglob("results.json")}:
        assert {"config.json", "metrics.jsonl", "results.json", "prompts.safetensors", "log.txt"} <= set(
            os.listdir(folder))
        assert not (folder / "checkpoint.pt").exists()  # resume state removed once finished

    capsys.readouterr()
    report_dir = out / "report"
    assert main(["report", str(out), "--out", str(report_dir)]) == 0
    table = capsys.readouterr().out
    for method in ("coop", "maple"):
        runs = [r for r in results if r["method"] == method]
        base = np.array([r["metrics"]["base"] for r in runs])
        new = np.array([r["metrics"]["new"] for r in runs])
        h = 2 * base.mean() * new.mean() / (base.mean() + new.mean())
        row = next(line for line in table.splitlines() if line.startswith(f"| custom_folder | {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "tiny"  # the backbone column
        assert cells[3] == f"{base.mean():.2f} ± {base.std():.2f}"
        assert cells[4] == f"{new.mean():.2f} ± {new.std():.2f}"
        assert cells[5] == f"{h:.2f}" and cells[6] == "2"
        average = next(line for line in table.splitlines() if "Average over 1 dataset" in line and f"| {method} |"
                       in line)
        assert f"| {h:.2f} |" in average
        with open(report_dir / "base2new.csv", newline="") as handle:
            row = next(r for r in csv.DictReader(handle) if r["dataset"] == "custom_folder" and r["method"] == method)
        assert float(row["base"]) == pytest.approx(base.mean()) and float(row["new_std"]) == pytest.approx(new.std())
    assert (report_dir / "report.md").read_text() == table
    assert (report_dir / "base2new_bars.png").stat().st_size > 0

    # the same command again skips every finished run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == stamps


def test_eval_command_reproduces_the_new_class_accuracy_of_the_run(base2new_runs, tree, tmp_path, capsys):
    out, _ = base2new_runs
    run = next(p.parent for p in out.rglob("results.json") if "maple" in str(p) and "seed_2" in str(p))
    stored = json.loads((run / "results.json").read_text())["evaluations"]["new"]
    capsys.readouterr()
    assert main(["eval", str(run), "--classes", "new", "--quiet"]) == 0
    assert f"accuracy {stored['accuracy']:.2f}%" in capsys.readouterr().out
    record = json.loads((run / "eval" / "custom_folder-new.json").read_text())
    assert record["per_class_accuracy"] == stored["per_class_accuracy"]

    # a bare prompts file (as `vlprompt import-original` writes) evaluates the same with the backbone given
    prompts = tmp_path / "maple.safetensors"
    shutil.copy(run / "prompts.safetensors", prompts)
    assert main(["eval", str(prompts), "--dataset", "custom_folder", "--data-root", str(tree), "--classes", "new",
                 "--backbone", "tiny", "--pretrained", "none", "--device", "cpu", "--quiet"]) == 0
    assert f"accuracy {stored['accuracy']:.2f}%" in capsys.readouterr().out
    assert json.loads((tmp_path / "maple.eval-custom_folder-new.json").read_text())["correct"] == stored["correct"]
    assert main(["eval", str(prompts), "--quiet"]) == 2
    assert "--dataset is required" in capsys.readouterr().err


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(tree, tmp_path, monkeypatch, capsys):
    import vlprompt.methods

    argv = ["train", "--method", "coop", "--dataset", "custom_folder", "--protocol", "few_shot", "--shots", "4",
            "--seed", "7"]
    options = ["--set", "optim.epochs=3", "--set", "optim.lr=0.01"]
    assert main(argv + common(tree, tmp_path / "full", *options)) == 0

    real_build = vlprompt.methods.build_method
    steps = {"n": 0}

    def build_with_interrupt(*args, **kwargs):
        method = real_build(*args, **kwargs)
        original = method.training_loss

        def training_loss(images, labels):
            steps["n"] += 1
            if steps["n"] == 6:  # 4 steps per epoch: second step of the second epoch
                raise KeyboardInterrupt
            return original(images, labels)

        method.training_loss = training_loss
        return method

    monkeypatch.setattr(vlprompt.methods, "build_method", build_with_interrupt)
    capsys.readouterr()
    assert main(argv + common(tree, tmp_path / "killed", *options)) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    run = next((tmp_path / "killed").rglob("config.json")).parent
    assert (run / "checkpoint.pt").exists() and not (run / "results.json").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    monkeypatch.setattr(vlprompt.methods, "build_method", real_build)
    torch.manual_seed(999)  # a new process would start from other random states
    assert main(argv + common(tree, tmp_path / "killed", *options)) == 0
    assert "resuming from" in (run / "log.txt").read_text()

    full_run = next((tmp_path / "full").rglob("results.json")).parent
    full, resumed = (json.loads((r / "results.json").read_text()) for r in (full_run, run))
    assert resumed["metrics"] == full["metrics"]
    assert resumed["evaluations"]["test"]["per_class_accuracy"] == full["evaluations"]["test"]["per_class_accuracy"]
    full_prompts, resumed_prompts = load_file(full_run / "prompts.safetensors"), load_file(run /
                                                                                          "prompts.safetensors")
    assert full_prompts.keys() == resumed_prompts.keys()
    assert all(torch.equal(full_prompts[k], resumed_prompts[k]) for k in full_prompts)

    def losses(folder):
        return [(r["epoch"], r["lr"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").open())]

    assert losses(run) == losses(full_run)


@pytest.mark.parametrize("extra, words", [
    (["--method", "nosuchmethod", "--dataset", "custom_folder"], ["method.name", "nosuchmethod", "coop"]),
    (["--method", "coop", "--dataset", "custom_folder", "--shots", "0"], ["data.shots", ">= 1", "0"]),
    (["--method", "coop", "--dataset", "imagenet1k"], ["data.dataset", "imagenet1k", "caltech101"]),
    (["--method", "align", "--dataset", "custom_folder", "--set", "method.options.n_visual_prompts=2"],
     ["n_visual_prompts", "M=2", "N=4"]),
    (["--method", "coop", "--dataset", "custom_folder", "--set", "optim.lrr=0.1"], ["optim.lrr", "lr"]),
    (["--method", "coop", "--dataset", "custom_folder", "--set", "optim.lr=fast"], ["optim.lr", "float", "fast"]),
    (["--method", "coop", "--dataset", "custom_folder", "--preset", "papr"], ["papr", "default"]),
    (["--method", "coop", "--dataset", "custom_folder", "--protocol", "zero_shot"], ["zero_shot", "base2new"]),
])
def test_bad_config_values_give_one_clear_line(tree, tmp_path, capsys, extra, words):
    capsys.readouterr()
    assert main(["train", *extra, *common(tree, tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vlprompt train: error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0]


def test_print_config_shows_preset_then_overrides(tmp_path, capsys):
    import yaml

    config_file = tmp_path / "my.yaml"
    config_file.write_text("optim:\n  epochs: 7\n  lr: 0.5\nprecision: bf16\n")
    assert main(["train", "--method", "align", "--dataset", "dtd", "--protocol", "base2new", "--config",
                 str(config_file), "--precision", "fp32", "--set", "optim.lr=0.001", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["optim"]["epochs"] == 7  # YAML file over preset
    assert config["optim"]["stop_epoch"] is None  # the preset's stop_epoch 15 belonged to its 20-epoch schedule
    assert config["precision"] == "fp32"  # command-line option over YAML file
    assert config["optim"]["lr"] == 0.001  # --set last
    assert main(["train", "--method", "align", "--dataset", "sun397", "--protocol", "base2new", "--preset", "paper",
                 "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["optim"]["lr"], config["optim"]["epochs"], config["optim"]["stop_epoch"]) == (0.0035, 8, None)
    assert config["method"]["options"] == {"n_text_prompts": 4, "n_visual_prompts": 4}
    assert main(["train", "--method", "align", "--dataset", "sun397", "--protocol", "base2new", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)  # the original code: 20-epoch schedule, epoch 15 tested
    assert (config["optim"]["lr"], config["optim"]["epochs"], config["optim"]["stop_epoch"]) == (0.002, 20, 15)
    assert config["method"]["options"] == {"n_text_prompts": 2, "n_visual_prompts": 2}


def test_dry_run_lists_the_protocol_grid(tmp_path, capsys):
    assert main(["run", "few_shot", "--methods", "coop", "--datasets", "dtd,eurosat", "--output", str(tmp_path),
                 "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 5 * 3 and all(line.startswith("new ") for line in lines)
    assert any(re.search(r"few_shot/eurosat/coop/shots_8/seed_3$", line) for line in lines)


def test_methods_command_lists_methods_and_presets(capsys):
    from vlprompt.methods import available

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in available():
        assert re.search(rf"^{name}\s", out, re.MULTILINE)
    assert re.search(r"^align\s+default, paper\s", out, re.MULTILINE)
