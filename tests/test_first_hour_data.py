"""Traps of a new user's first hour around data and the toy world: toy pretraining writing into the package,
``train`` without ``--shots`` taking the wrong schedule, toy datasets failing data commands or refused by
``train`` after ``toyworld materialize``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlprompt
from vlprompt.weights import load_clip
from vlprompt.cli import main
from vlprompt.data import build_dataset
from vlprompt.data.registry import REGISTRY
from vlprompt.engine.config import PROTOCOL_NAMES, build_config, preset_file
from vlprompt.errors import DataError
from vlprompt.methods import available
from vlprompt.toyworld import pretrain as pretrain_module
from vlprompt.toyworld.model import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE

PACKAGE = Path(vlprompt.__file__).resolve().parent

# --- toy pretraining never writes into the package; one's own toy weights load by path ---------------------


def test_pretrain_writes_into_the_working_directory_by_default(tmp_path, monkeypatch):
    given = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda config, log: given.append(config))
    monkeypatch.chdir(tmp_path)
    assert main(["toyworld", "pretrain", "--steps", "1"]) == 0
    (config,) = given
    for folder in (config.output_dir, config.work_dir):
        resolved = Path(folder).resolve()
        assert tmp_path in resolved.parents and PACKAGE not in resolved.parents
    assert PACKAGE not in Path(pretrain_module.PretrainConfig().output_dir).resolve().parents


@pytest.mark.parametrize("option", ["--output-dir", "--work-dir"])
def test_pretrain_refuses_a_folder_inside_the_package(tmp_path, monkeypatch, capsys, option):
    monkeypatch.setattr(pretrain_module, "pretrain", lambda config, log: pytest.fail("must not start"))
    before = {name: os.stat(WEIGHTS_DIR / name).st_mtime_ns for name in (WEIGHTS_FILE, CONFIG_FILE)}
    assert main(["toyworld", "pretrain", option, str(WEIGHTS_DIR)]) == 2
    err = capsys.readouterr().err
    assert f"{option} {WEIGHTS_DIR} is inside the installed vlprompt package" in err and err.count("\n") == 1
    assert {name: os.stat(WEIGHTS_DIR / name).st_mtime_ns for name in before} == before


def test_own_toy_weights_load_by_path(tmp_path):
    mine = tmp_path / "mine"
    shutil.copytree(WEIGHTS_DIR, mine)
    state = load_file(str(mine / WEIGHTS_FILE))
    state["logit_scale"] = torch.tensor(1.2345, dtype=state["logit_scale"].dtype)  # mark these weights
    save_file(state, str(mine / WEIGHTS_FILE))
    shipped = load_clip("toy", None)
    for given in (mine, mine / WEIGHTS_FILE, str(mine)):
        clip = load_clip("toy", given)
        assert clip.name == "toy/mine"
        assert clip.model.logit_scale.item() == pytest.approx(1.2345, abs=1e-3)
    assert shipped.model.logit_scale.item() != pytest.approx(1.2345, abs=1e-3)
    (mine / CONFIG_FILE).unlink()
    with pytest.raises(Exception, match="toyclip.json"):  # the architecture is read from beside the weights
        load_clip("toy", mine)


def test_own_toy_weights_are_part_of_the_run_identity(tmp_path):
    from vlprompt.engine.runs import run_identity

    def identity(folder):
        return run_identity(build_config(method="coop", protocol="few_shot", dataset="toy_shapes",
                                         overrides=["backbone.name=toy", f"backbone.pretrained={folder}"]))

    for name, scale in (("a", 1.0), ("b", 2.0)):
        shutil.copytree(WEIGHTS_DIR, tmp_path / name)
        state = load_file(str(tmp_path / name / WEIGHTS_FILE))
        state["logit_scale"] = torch.tensor(scale, dtype=state["logit_scale"].dtype)
        save_file(state, str(tmp_path / name / WEIGHTS_FILE))
    assert identity(tmp_path / "a") != identity(tmp_path / "b")  # other weights, other run
    assert identity(tmp_path / "a") == identity(tmp_path / "a" / WEIGHTS_FILE)  # the folder or its file


# --- the preset schedule follows the shots actually used -----------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_without_shots_the_schedule_is_that_of_the_default_shots(protocol):
    for method in available():
        implicit = build_config(method=method, protocol=protocol, dataset="dtd")
        explicit = build_config(method=method, protocol=protocol, dataset="dtd", shots=implicit.data.shots)
        assert implicit == explicit, (method, protocol)
    assert build_config(method="coop", protocol="few_shot", dataset="dtd").optim.epochs == 200
    assert build_config(method="align", protocol="few_shot", dataset="dtd").optim.epochs == 80
    # and the default dataset's by_dataset entries apply as well when no dataset is given
    implicit = build_config(method="coop", protocol=protocol)
    assert implicit == build_config(method="coop", protocol=protocol, dataset=implicit.data.dataset, shots=16)


def test_presets_never_choose_shots_or_dataset_themselves():
    """The rule above holds because a preset cannot change the shots or dataset it was looked up with."""
    for method in available():
        for protocol in PROTOCOL_NAMES:
            data = preset_file(method, protocol) or {}
            sections = [data.get("default") or {}, *((data.get("variants") or {}).values())]
            for section in list(sections):
                sections += list((section.get("by_shots") or {}).values())
                sections += list((section.get("by_dataset") or {}).values())
            for section in sections:
                assert not {"shots", "dataset"} & set((section or {}).get("data") or {}), (method, protocol)


# --- toy datasets work with every data command; materialize and train agree -------------------------------


def test_every_registered_dataset_takes_the_options_data_commands_pass():
    for info in REGISTRY.values():
        assert "check_files" in info.options(), info.name


def test_toy_dataset_with_verify_sample_and_prepare(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["data", "verify", "--dataset", "toy_shapes", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    out = tmp_path / "sample.json"
    assert main(["data", "sample", "--dataset", "toy_shapes", "--root", str(root), "--shots", "2", "--seed", "1",
                 "--out", str(out)]) == 0
    sample = json.loads(out.read_text())
    assert len(sample["train"]) == 2 * len(build_dataset("toy_shapes", str(root)).classnames)
    capsys.readouterr()
    assert main(["data", "prepare", "--dataset", "toy_shapes", "--root", str(tmp_path / "other")]) == 0
    printed = capsys.readouterr().out
    assert f"toy_shapes: generated in {tmp_path / 'other' / 'toy_shapes'}" in printed
    assert printed.strip().endswith("OK")
    assert main(["data", "status", "--data-root", str(root)]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[-1].startswith("toy datasets generated here: toy_shapes (")


def test_materialize_defaults_are_what_train_reads(tmp_path, capsys):
    root = tmp_path / "data"
    assert main(["toyworld", "materialize", "toy_shapes", "--root", str(root)]) == 0
    recipe = json.loads((root / "toy_shapes" / "toyworld.json").read_text())
    splits = build_dataset("toy_shapes", str(root))  # what train and run call, with no dataset options
    assert len(splits.test) == recipe["n_per_class"]["test"] * len(splits.classnames)

    assert main(["toyworld", "materialize", "toy_colors", "--root", str(root), "--n-test", "3"]) == 0
    with pytest.raises(DataError, match=r"made with different settings \(n_train_per_class=16, n_val_per_class=4, "
                                        r"n_test_per_class=3, seed=0\) than asked for .*n_test_per_class=20"):
        build_dataset("toy_colors", str(root))
    assert len(build_dataset("toy_colors", str(root), n_test_per_class=3).test) > 0
