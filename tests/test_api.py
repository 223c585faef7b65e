"""Using trained prompts: ``vlprompt.load`` / ``Predictor``, ``vlprompt predict``, ``export`` and ``import``.

A tiny ALIGN run is trained for one epoch through the engine CLI on a generated ``custom_folder`` tree; the
tests compare the predictor with the engine's own evaluation of that run.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vlprompt
from conftest_compat import dassl_importable
from conftest_data import COLOURS, colour_patch_tree
from vlprompt.inference.predictor import EmptyClassListError, Predictor, RunNotFoundError, UnreadableImageError
from vlprompt.cli import main
from vlprompt.errors import VlpromptError

CLASSES = list(COLOURS)
ALIGN_OPTIONS = ["--set", "method.options.n_text_prompts=2", "--set", "method.options.n_visual_prompts=2",
                 "--set", "method.options.text_depth=2"]


def make_tree(root: Path, train: int = 2, test: int = 2) -> Path:
    return colour_patch_tree(root, COLOURS, train, test, size=(36, 40))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def run(tree, tmp_path_factory):
    """A finished one-epoch ALIGN run (M = N = 2) on the tiny backbone."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--method", "align", "--dataset", "custom_folder", "--protocol", "few_shot", "--shots", "2",
                 "--seed", "1", "--data-root", str(tree), "--backbone", "tiny", "--pretrained", "none", "--output",
                 str(out), "--quiet", "--set", "data.num_workers=0", "--set", f"data.cache_dir={out / 'cache'}",
                 "--set", "optim.epochs=1", *ALIGN_OPTIONS]) == 0
    return next(out.rglob("results.json")).parent


def engine_method(run_dir: Path, tree: Path):
    """The run's method and test set, built the way ``vlprompt eval`` builds them."""
    from vlprompt.weights import load_clip
    from vlprompt.data import ImageDataset, build_dataset, build_transform
    from vlprompt.engine import load_prompts
    from vlprompt.engine.runs import RunFolder
    from vlprompt.methods import build_method

    config = RunFolder(str(run_dir)).config()
    clip = load_clip(config.backbone.name, config.backbone.pretrained)
    splits = build_dataset("custom_folder", str(tree))
    method = build_method(config.method.name, clip, splits.classnames, splits.template, **config.method.options)
    method.load_prompt_state_dict(load_prompts(str(run_dir / "prompts.safetensors"))[0])
    transform = build_transform(False, clip.image_size, clip.image_mean, clip.image_std)
    return method.eval(), splits, ImageDataset(splits.test, transform)


def test_vlprompt_load_is_exported_lazily():
    import vlprompt.inference.predictor

    assert vlprompt.load is vlprompt.inference.predictor.load and vlprompt.Predictor is Predictor
    code = "import sys, vlprompt; assert 'torch' not in sys.modules and 'load' in dir(vlprompt)"
    subprocess.run([sys.executable, "-c", code], check=True)  # `import vlprompt` stays cheap


# ------------------------------------------------------------------------------------ export → load → predict
def test_export_load_predict_gives_the_logits_of_the_runs_evaluation(run, tree, tmp_path, capsys):
    from vlprompt.engine import evaluate

    exported = tmp_path / "shared" / "align_colours.safetensors"
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    assert "align prompts for backbone tiny" in capsys.readouterr().out

    # the file: learned tensors only, a JSON header, no pickles
    with safe_open(str(exported), framework="pt") as handle:
        header = json.loads(handle.metadata()["vlprompt"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    method, splits, test_set = engine_method(run, tree)
    assert sorted(tensors) == sorted(name for name, _ in method.prompt_parameters())
    assert header["format"] == "vlprompt.prompts/1" and header["vlprompt"] == vlprompt.__version__
    assert header["method"] == "align" and header["options"]["n_text_prompts"] == 2
    assert header["backbone"] == "tiny" and header["config"]["backbone"]["name"] == "tiny"
    assert header["classnames"] == CLASSES and header["template"] == splits.template
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert exported.stat().st_size < payload + 16 * 1024  # small: the tensors plus a JSON header

    predictor = vlprompt.load(exported)
    assert isinstance(predictor, Predictor) and predictor.method.name == "align"
    paths = [item.path for item in splits.test]
    result = predictor.predict(paths, splits.classnames, batch_size=3)
    assert result.probs.shape == (len(paths), 4) and result.sources == paths
    assert torch.allclose(result.probs.sum(-1), torch.ones(len(paths)))

    # the same logits as the run's method on the engine's test batches
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    with torch.no_grad():
        expected = method(images, method.encode_classes())
    torch.testing.assert_close(result.logits, expected, rtol=0, atol=1e-5)
    assert result.labels == [splits.classnames[i] for i in expected.argmax(-1).tolist()]

    # and the same accuracy as the engine's evaluation and the run's own results.json
    evaluation = evaluate(method, test_set, batch_size=100, progress=False)
    labels = torch.tensor([item.label for item in splits.test])
    assert int((result.indices == labels).sum()) == evaluation.correct
    stored = json.loads((run / "results.json").read_text())["evaluations"]["test"]
    assert stored["correct"] == evaluation.correct
    assert stored["per_class_accuracy"] == evaluation.per_class_accuracy

    # the run folder itself loads to the same predictor
    again = vlprompt.load(run).predict(paths, splits.classnames)
    torch.testing.assert_close(again.logits, result.logits, rtol=0, atol=1e-5)


def test_predict_accepts_paths_pil_images_and_tensors_and_caches_the_class_side(run, tree, monkeypatch):
    predictor = vlprompt.load(run)
    path = tree / "test" / "red" / "0.png"
    pil = Image.open(path).convert("RGB")
    tensor = predictor.load_image(pil)
    pixels = np.asarray(pil)
    calls = {"n": 0}
    encode = predictor.method.encode_classes

    def counting():
        calls["n"] += 1
        return encode()

    monkeypatch.setattr(predictor.method, "encode_classes", counting)
    names = ["fire truck", "tomato", "sky"]
    result = predictor.predict([path, str(path), pil, tensor, pixels], names)
    assert result.labels == [result.labels[0]] * 5 and result.sources[:3] == [str(path), str(path), None]
    assert torch.allclose(result.logits, result.logits[:1].expand(5, -1), atol=1e-6)
    predictor.predict(tensor.unsqueeze(0), names)  # a pre-processed batch
    assert calls["n"] == 1  # the class side of a class list is computed once
    default = predictor.predict(path)  # default classes: those the prompts were trained on
    assert default.classnames == CLASSES and calls["n"] == 2
    assert predictor.classify_folder(tree / "test").sources == sorted(str(p) for p in (tree / "test").rglob("*.png"))


# ------------------------------------------------------------------------------------ predict CLI
def test_predict_cli_on_a_folder_with_a_class_list(run, tree, tmp_path, capsys):
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("# colours\nblue\ngreen\n\nred\nyellow\n")
    out_csv = tmp_path / "out" / "predictions.csv"
    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--images", str(tree / "test"), "--classes", str(classes_file),
                 "--top-k", "2", "--csv", str(out_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "prediction", "probability", "next"] and len(lines) == 1 + 8

    expected = vlprompt.load(run).classify_folder(tree / "test", CLASSES)
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image"] for row in rows] == expected.sources
    assert [row["label_1"] for row in rows] == expected.labels
    for row, ranked in zip(rows, expected.top_k(2)):
        assert (row["label_2"], float(row["probability_2"])) == (ranked[1][0], pytest.approx(ranked[1][1], abs=1e-6))
        assert float(row["probability_1"]) == pytest.approx(ranked[0][1], abs=1e-6)
    for line, path, label in zip(lines[1:], expected.sources, expected.labels):
        assert line.split()[:2] == [path, label]

    assert main(["predict", "--run", str(run), "--images", str(tree / "test" / "red" / "0.png"), "--classes",
                 "red, green"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] in ("red", "green")


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"vlprompt {command}: error: ") and "Traceback" not in err, err
    return lines[0]


def test_predict_errors_are_one_clear_line(run, tree, tmp_path, capsys):
    images = ["--images", str(tree / "test")]
    capsys.readouterr()
    # a missing run, a folder that is not a run, a run that has not finished training
    assert main(["predict", "--run", str(tmp_path / "no_such_run"), *images]) == 2
    line = one_error_line(capsys, "predict")
    assert "not found" in line and "no_such_run" in line
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text((run / "config.json").read_text())
    assert main(["predict", "--run", str(tmp_path / "unfinished"), *images]) == 2
    assert "no trained prompts" in one_error_line(capsys, "predict")

    # empty class lists
    assert main(["predict", "--run", str(run), *images, "--classes", " , "]) == 2
    assert "class list is empty" in one_error_line(capsys, "predict")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    assert main(["predict", "--run", str(run), *images, "--classes", str(tmp_path / "empty.txt")]) == 2
    assert "class list is empty" in one_error_line(capsys, "predict")

    # an unreadable image: reported and skipped by default, an error with --strict
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes((tree / "test" / "red" / "0.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", "--run", str(run), "--images", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "skipped unreadable image" in captured.err and "broken.jpg" in captured.err
    assert "good.png" in captured.out and "broken.jpg" not in captured.out
    assert main(["predict", "--run", str(run), "--images", str(folder), "--strict"]) == 2
    line = one_error_line(capsys, "predict")
    assert "cannot read image" in line and "broken.jpg" in line
    assert main(["predict", "--run", str(run), "--images", str(folder / "broken.jpg")]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), "--images", str(tmp_path / "nowhere.png")]) == 2
    assert "image path not found" in one_error_line(capsys, "predict")

    # the same errors from Python, as VlpromptError subclasses
    with pytest.raises(RunNotFoundError, match="not found"):
        vlprompt.load(tmp_path / "no_such_run")
    predictor = vlprompt.load(run)
    with pytest.raises(UnreadableImageError, match="broken.jpg") as caught:
        predictor.predict([folder / "good.png", folder / "broken.jpg"], CLASSES)
    assert caught.value.path.endswith("broken.jpg") and isinstance(caught.value, VlpromptError)
    skipped = predictor.predict([folder / "good.png", folder / "broken.jpg"], CLASSES, skip_unreadable=True)
    assert len(skipped) == 1 and skipped.skipped == [str(folder / "broken.jpg")]
    with pytest.raises(EmptyClassListError):
        predictor.predict(folder / "good.png", [])


# ------------------------------------------------------------------------------------ import (issue 14)
def save_maple_checkpoint(path: Path, method) -> Path:
    """``prompt_learner/model.pth.tar-5`` as the original MaPLe trainer writes it (names by hand)."""
    p = method.prompt_state_dict()
    state = {"prompt_learner.ctx": p["text.ctx"][0], "prompt_learner.proj.weight": p["coupling.proj.weight"],
             "prompt_learner.proj.bias": p["coupling.proj.bias"],
             "prompt_learner.token_prefix": torch.randn(4, 1, 64),
             "prompt_learner.token_suffix": torch.randn(4, 72, 64)}
    for i in range(method.config.text_depth - 1):
        state[f"prompt_learner.compound_prompts_text.{i}"] = p[f"text.deep.{i}"][0]
        for kind in ("weight", "bias"):
            state[f"prompt_learner.compound_prompt_projections.{i}.{kind}"] = p[f"coupling.deep_proj.{i}.{kind}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with dassl_importable() as scheduler:
        torch.save({"state_dict": state, "epoch": 5, "optimizer": {"lr": 0.0035}, "scheduler": scheduler(),
                    "val_result": None}, path)
    return path


def test_import_writes_a_run_folder_that_eval_predict_and_export_accept(tree, tmp_path, capsys):
    from vlprompt.weights import load_clip
    from vlprompt.compat import import_original
    from vlprompt.data import ImageDataset, build_dataset, build_transform
    from vlprompt.engine import evaluate
    from vlprompt.methods import build_method

    clip = load_clip("tiny")
    torch.manual_seed(3)
    trained = build_method("maple", clip, CLASSES, text_depth=2)
    with torch.no_grad():
        for _, parameter in trained.prompt_parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    checkpoint = save_maple_checkpoint(tmp_path / "maple" / "prompt_learner" / "model.pth.tar-5", trained)
    out = tmp_path / "imported" / "maple_colours"
    argv = ["import", "--from", "maple", "--checkpoint", str(checkpoint), "--dataset", "custom_folder", "--data-root",
            str(tree), "--backbone", "tiny", "--pretrained", "none", "--out", str(out), "--set", "data.num_workers=0"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "maple run imported from maple epoch 5" in capsys.readouterr().out
    assert {"config.json", "prompts.safetensors", "log.txt"} == set(os.listdir(out))  # no results: not trained here
    config = json.loads((out / "config.json").read_text())
    assert config["method"]["name"] == "maple" and config["backbone"] == {"name": "tiny", "pretrained": None,
                                                                         "grad_checkpointing": False}
    assert config["data"]["dataset"] == "custom_folder" and config["data"]["root"] == str(tree)

    # vlprompt eval on the imported run = our evaluation of the imported parameters
    assert main(["eval", str(out), "--quiet", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    splits = build_dataset("custom_folder", str(tree))
    method = import_original("maple", checkpoint, clip, splits.classnames, splits.template)
    transform = build_transform(False, clip.image_size, clip.image_mean, clip.image_std)
    expected = evaluate(method, ImageDataset(splits.test, transform), progress=False)
    assert f"accuracy {expected.accuracy:.2f}%" in printed
    record = json.loads((out / "eval" / "custom_folder-all.json").read_text())
    assert record["correct"] == expected.correct and record["per_class_accuracy"] == expected.per_class_accuracy

    # predict and export accept it too, with the logits of the trained parameters
    predictor = vlprompt.load(out)
    images = [item.path for item in splits.test]
    with torch.no_grad():
        reference = trained(torch.stack([transform(Image.open(p).convert("RGB")) for p in images]))
    torch.testing.assert_close(predictor.predict(images).logits, reference, rtol=0, atol=1e-5)
    assert main(["predict", "--run", str(out), "--images", str(tree / "test")]) == 0
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "maple.safetensors")]) == 0
    assert vlprompt.load(tmp_path / "maple.safetensors").predict(images).labels == predictor.predict(images).labels

    # an existing run is not replaced silently; class names alone are enough without a dataset
    capsys.readouterr()
    assert main(argv) == 2
    assert "--overwrite" in one_error_line(capsys, "import")
    bare = tmp_path / "imported" / "bare"
    assert main(["import", "--from", "maple", "--checkpoint", str(checkpoint), "--classes", "tomato,sky",
                 "--backbone", "tiny", "--pretrained", "none", "--out", str(bare)]) == 0
    assert vlprompt.load(bare).predict(images[:1]).classnames == ["tomato", "sky"]
