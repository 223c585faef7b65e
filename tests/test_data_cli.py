"""`vlprompt datasets`, `vlprompt data verify` and `vlprompt data sample` through vlprompt.cli.main."""

from __future__ import annotations

import json

import pytest
from conftest_data import make_class_folders, make_split_tree

from vlprompt.cli import main
from vlprompt.data import available_datasets, build_dataset, sample_few_shot
from vlprompt.data.standard import packaged


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_split_tree(root, "dtd")
    return root


def test_datasets_lists_names_and_counts(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in available_datasets():
        assert name in out
    assert any(line.split()[:5] == ["ucf101", "7639", "1898", "3783", "101"] for line in out.splitlines())
    assert any(line.split()[:5] == ["imagenet_a", "0", "0", "7500", "200"] for line in out.splitlines())


def test_verify_ok(root, capsys):
    assert main(["data", "verify", "--dataset", "dtd", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train      2820 images (expected 2820) ok" in out and "8dd197a94b598fa44ee3c9e35c486dd017ab00a7 ok" in out
    assert "all 5640 images present" in out and out.strip().endswith("OK")


def test_verify_reports_missing_files(tmp_path, capsys):
    make_split_tree(tmp_path, "dtd")
    victim = tmp_path / "dtd" / "images" / "banded" / "banded_0133.jpg"
    victim.unlink()
    assert main(["data", "verify", "--dataset", "dtd", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "1 of 5640 images are missing" in out and str(victim) in out and out.strip().endswith("FAILED")


def test_verify_wrong_count_fails(tmp_path, capsys):
    wnids = packaged("imagenet_r_synsets.txt").decode().split()
    make_class_folders(tmp_path / "imagenet-rendition" / "imagenet-r", wnids)
    assert main(["data", "verify", "--dataset", "imagenet_r", "--root", str(tmp_path)]) == 1
    assert "test        200 images (expected 30000) MISMATCH" in capsys.readouterr().out


def test_verify_errors_exit_2(tmp_path, capsys):
    assert main(["data", "verify", "--dataset", "oxford_pets", "--root", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "food-101" / "images").mkdir(parents=True)
    (tmp_path / "food-101" / "split_zhou_Food101.json").write_text('{"train": [], "val": [], "test": []}')
    assert main(["data", "verify", "--dataset", "food101", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not the official file" in err and "39557040ee6501bd32aa8b5dfd75f7941a32f0a7" in err
    assert main(["data", "verify", "--dataset", "nope", "--root", str(tmp_path)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err


def test_verify_custom_with_options(tmp_path, capsys):
    make_class_folders(tmp_path / "data", ["a", "b"], per_class=4)
    args = ["data", "verify", "--dataset", "custom_folder", "--root", str(tmp_path / "data")]
    assert main(args + ["--option", "split_fractions=[0.5, 0.25]"]) == 0
    assert "all 8 images present" in capsys.readouterr().out
    assert main(args + ["--option", "bogus"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_sample_writes_the_subset(root, tmp_path, capsys):
    out = tmp_path / "subset.json"
    args = ["data", "sample", "--dataset", "dtd", "--root", str(root), "--shots", "2", "--seed", "3",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    data = json.loads(out.read_text())
    expected = sample_few_shot(build_dataset("dtd", root), 2, 3, use_cache=False)
    assert data["train"] == [{"path": d.path, "label": d.label, "classname": d.classname} for d in expected.train]
    assert len(data["val"]) == 47 * 2 and (data["shots"], data["seed"]) == (2, 3)
    assert "wrote 94 train + 94 val items" in capsys.readouterr().err
    assert (tmp_path / "cache" / "dtd").is_dir()
    assert main(args[:-4] + args[-2:]) == 0  # no --out: JSON on standard output
    assert json.loads(capsys.readouterr().out) == data


def test_data_without_subcommand(capsys):
    assert main(["data"]) == 1
    assert "verify" in capsys.readouterr().out


def test_status_table_of_all_standard_datasets(root, capsys):
    assert main(["data", "status", "--root", str(root)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["dtd"].split()[1] == "present" and "2820/1128/1692 images, 47 classes" in lines["dtd"]
    assert lines["imagenet"].split()[1] == "missing"
    assert not any(name.startswith(("toy_", "custom")) for name in lines)
