"""Files and options a user hands vlprompt: no file runs code, bad input is one clear line before anything is
written, and every command rebuilds prompts on the backbone their header names."""

import argparse
import json
import os
import pickle
import subprocess
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from conftest_data import colour_patch_tree
from vlprompt.weights import TINY_CONFIGS, load_clip, load_state_dict_file
from vlprompt.cli import main, parse_key_values
from vlprompt.errors import CheckpointError, ConfigError

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"vlprompt_torchscript_marker_{os.getpid()}"


def jit_save(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def jit_load_state_dict(path: Path) -> dict:
    """The reference reader, used on archives this file made itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


# --------------------------------------------------------------------------------------------- TorchScript archives


class SelfRestoring(torch.nn.Module):
    """A scripted module whose ``__setstate__`` writes MARKER when ``torch.jit.load`` restores it."""

    __constants__ = ["marker"]  # compiled into the archive's code

    def __init__(self):
        super().__init__()
        self.marker = str(MARKER)
        self.weight = torch.nn.Parameter(torch.arange(6.0).view(2, 3))

    def forward(self, x):
        return x @ self.weight.t()

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0]
        written = torch.from_file(self.marker, True, 4, dtype=torch.uint8)  # creates and writes the file
        written.fill_(65)
        self.training = state[1] and bool(written[0] == 65)  # keeps the write from being optimised away


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.not_state = torch.ones(1)  # a plain tensor attribute: not a parameter or buffer

    def forward(self, x):
        return self.linear(x) * self.scale


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.norm = torch.nn.LayerNorm(3)
        self.gain = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x) * self.gain


@pytest.fixture
def no_marker():
    MARKER.unlink(missing_ok=True)
    yield MARKER
    MARKER.unlink(missing_ok=True)


def test_reference_torch_jit_load_does_run_the_archive_code(tmp_path, no_marker):
    """The threat is real: torch.jit.load of this archive writes the marker (so the tests below mean something)."""
    path = jit_save(SelfRestoring(), tmp_path / "evil.pt")
    jit_load_state_dict(path)
    assert no_marker.exists()


def test_torchscript_setstate_never_runs_and_is_refused_in_one_line(tmp_path, no_marker):
    path = jit_save(SelfRestoring(), tmp_path / "evil.pt")
    for load in (lambda: load_state_dict_file(path), lambda: load_clip("tiny", pretrained=path)):
        with pytest.raises(CheckpointError, match=r"refusing .*evil\.pt: its TorchScript class .*SelfRestoring "
                                                  r"restores itself with its own code \(__setstate__\)") as caught:
            load()
        assert "\n" not in str(caught.value)
    assert not no_marker.exists()


def test_torchscript_weights_are_read_as_torch_jit_load_names_them(tmp_path):
    path = jit_save(Nested(), tmp_path / "nested.pt")
    weights = load_state_dict_file(path)
    reference = jit_load_state_dict(path)
    assert sorted(weights) == sorted(reference)  # parameters and buffers; not the plain attribute
    assert "blocks.1.not_state" not in weights
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name


def test_traced_open_clip_archive_loads_into_the_same_model(tmp_path, images):
    """The shape of OpenAI's released .pt files: a traced CLIP saved with torch.jit.save."""
    torch.manual_seed(3)
    source = open_clip.CLIP(**TINY_CONFIGS["tiny"]).eval()  # weights differ from load_clip("tiny")'s
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a cat", "a dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(source, {"encode_image": (images,), "encode_text": (tokens,)})
        torch.jit.save(traced, str(tmp_path / "traced.pt"))
    weights = load_state_dict_file(tmp_path / "traced.pt")
    expected = source.state_dict()
    assert set(weights) - set(expected) == {"attn_mask"}  # TorchScript keeps the non-persistent causal mask
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())
    loaded = load_clip("tiny", pretrained=tmp_path / "traced.pt")
    assert all(torch.equal(loaded.model.state_dict()[name], tensor) for name, tensor in expected.items())
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images).features, source.encode_image(images))
        # vlprompt's text pass stops after the last end-of-text token: equal up to rounding
        assert torch.allclose(loaded.encode_text(tokens).features, source.encode_text(tokens), atol=1e-5)


class Popen:
    def __reduce__(self):
        return subprocess.Popen, (["touch", str(MARKER)],)


def test_torchscript_archive_with_a_pickled_call_names_it(tmp_path, no_marker):
    clean = jit_save(Nested(), tmp_path / "clean.pt")
    tampered = tmp_path / "tampered.pt"
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"payload": Popen()}, protocol=2)
            target.writestr(item, data)
    with pytest.raises(CheckpointError, match=r"refusing .*tampered\.pt: it contains pickled code "
                                              r"\(subprocess\.Popen\) \(a call that runs commands"):
        load_state_dict_file(tampered)
    assert not no_marker.exists()


def test_every_pickled_callable_is_named_in_the_refusal(tmp_path, no_marker):
    from vlprompt.engine.checkpoint import load_checkpoint

    path = tmp_path / "payload.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "run": Popen(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match=r"refusing .*payload\.pt: it contains pickled code "
                                              r"\(subprocess\.Popen, argparse\.Namespace\)"):
        load_state_dict_file(path)
    with pytest.raises(CheckpointError, match=r"refusing .*payload\.pt: it contains pickled code "
                                              r"\(subprocess\.Popen, argparse\.Namespace\)"):
        load_checkpoint(str(path))
    assert not no_marker.exists()


# --------------------------------------------------------------------------------------------- bad input


def common(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(tree), "--backbone", "tiny", "--pretrained", "none", "--output", str(out), "--quiet",
            "--set", "data.num_workers=0", "--set", f"data.cache_dir={out / 'cache'}", *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return colour_patch_tree(tmp_path_factory.mktemp("data"), train=2, test=1)


def one_error_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"vlprompt {command}: error: ")
    return lines[0]


@pytest.mark.parametrize("option, words", [
    ("text_n_ctx=abc", ["method.options.text_n_ctx", "an integer", "'abc'"]),
    ("text_ctx_init=123", ["method.options.text_ctx_init", "text", "123"]),
    ("beta=xyz", ["method.options.beta", "a number", "'xyz'"]),
    ("eps=abc", ["method.options.eps", "a number", "'abc'"]),
    ("sinkhorn_iters=abc", ["method.options.sinkhorn_iters", "an integer", "'abc'"]),
    ("class_position=left", ["method.options.class_position", "end, middle, front", "'left'"]),
    ("betta=1", ["unknown option", "betta", "beta"]),
])
@pytest.mark.parametrize("print_config", [False, True])
def test_method_options_of_the_wrong_type_are_one_line_before_any_run_folder(tree, tmp_path, capsys, option, words,
                                                                             print_config):
    argv = ["train", "--method", "align", "--dataset", "custom_folder", "--shots", "1",
            *common(tree, tmp_path / "runs", "--set", f"method.options.{option}")]
    assert main(argv + (["--print-config"] if print_config else [])) == 2
    line = one_error_line(capsys)
    for word in words:
        assert word in line
    assert not (tmp_path / "runs" / "few_shot").exists()


def test_every_method_declares_its_option_types():
    from vlprompt.methods import OPTIONS, available
    from vlprompt.methods.options import option_types

    assert set(available()) <= set(OPTIONS)
    for name in available():
        assert option_types(*OPTIONS[name]), name


def test_options_are_read_as_their_types_by_build_method(tiny_clip):
    from vlprompt.methods import build_method

    method = build_method("align", tiny_clip, ["cat", "dog"], beta=2, sinkhorn_iters=7, text_ctx_init=None)
    assert method.options["beta"] == 2.0 and isinstance(method.options["beta"], float)
    with pytest.raises(ConfigError, match=r"align: option beta must be a number, got 'xyz'"):
        build_method("align", tiny_clip, ["cat", "dog"], beta="xyz")


def test_unknown_pretrained_tag_lists_the_architecture_tags(capsys):
    assert main(["train", "--method", "coop", "--dataset", "dtd", "--backbone", "ViT-B-32-quickgelu",
                 "--pretrained", "openaii", "--print-config"]) == 2
    line = one_error_line(capsys)
    for word in ("'openaii'", "ViT-B-32-quickgelu", "openai", "laion400m_e32"):
        assert word in line


def test_config_pointing_at_a_folder_is_one_line(tmp_path, capsys):
    assert main(["train", "--method", "coop", "--dataset", "dtd", "--config", str(tmp_path), "--print-config"]) == 2
    assert "is a folder" in one_error_line(capsys)


def test_print_config_validates_method_options(capsys):
    assert main(["train", "--method", "coop", "--dataset", "dtd", "--set", "method.options.no_such=1",
                 "--print-config"]) == 2
    assert "no_such" in one_error_line(capsys)


def test_exponent_numbers_are_numbers(capsys):
    assert parse_key_values(["lr=2e-3", "n=3", "name=abc", "l=[1e-3, 2]"]) == {
        "lr": 0.002, "n": 3, "name": "abc", "l": [0.001, 2]}
    assert main(["train", "--method", "coop", "--dataset", "dtd", "--set", "optim.lr=2e-3",
                 "--set", "optim.warmup_lr=1E-5", "--print-config"]) == 0
    import yaml

    config = yaml.safe_load(capsys.readouterr().out)
    assert config["optim"]["lr"] == 0.002 and config["optim"]["warmup_lr"] == 1e-5


def write_prompts(path: Path, header) -> Path:
    save_file({"text.ctx": torch.zeros(1, 2, 64)}, str(path),
              metadata={"vlprompt": header if isinstance(header, str) else json.dumps(header)})
    return path


@pytest.mark.parametrize("header, words", [
    ({"method": "coop", "options": "abc", "backbone": "tiny"}, ["'options'", "object"]),
    ({"method": "coop", "classnames": "cat", "backbone": "tiny"}, ["'classnames'", "array"]),
    ({"method": 5, "backbone": "tiny"}, ["'method'", "string"]),
    ({"method": "coop", "config": {"backbone": "tiny"}}, ["config.backbone"]),
    ("[1, 2]", ["not a JSON object"]),
    ("{not json", ["prompts.safetensors"]),
])
def test_malformed_prompts_header_is_one_line(tree, tmp_path, capsys, header, words):
    import vlprompt

    path = write_prompts(tmp_path / "prompts.safetensors", header)
    with pytest.raises(CheckpointError) as caught:
        vlprompt.load(path)
    for word in words:
        assert word in str(caught.value)
    assert main(["eval", str(path), "--dataset", "custom_folder", "--data-root", str(tmp_path)]) == 2
    one_error_line(capsys, "eval")
    assert main(["predict", "--run", str(path), "--images", str(next(tree.rglob("*.png")))]) == 2
    one_error_line(capsys, "predict")


# --------------------------------------------------------------------------------------------- weights


def test_load_clip_accepts_none_for_random_weights(monkeypatch):
    requested = []

    def create_model(name, pretrained=None, **kwargs):
        requested.append(pretrained)
        return open_clip.CLIP(**TINY_CONFIGS["tiny"])

    monkeypatch.setattr(open_clip, "create_model", create_model)
    for spelling in ("none", "None", None):
        assert load_clip("ViT-B-32", pretrained=spelling).name == "ViT-B-32"
    assert requested == [None, None, None]


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """The Hugging Face hub cannot be reached and its cache is empty."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def test_unreachable_weights_are_one_line_with_the_ways_out_and_leave_no_run_folder(tree, tmp_path, capsys,
                                                                                    hub_offline):
    argv = ["train", "--method", "coop", "--dataset", "custom_folder", "--shots", "1", "--data-root", str(tree),
            "--backbone", "ViT-B-32-quickgelu", "--output", str(tmp_path / "runs"), "--quiet"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    for word in ("ViT-B-32-quickgelu/openai", "--pretrained PATH", "--backbone toy", "HF_HUB_OFFLINE=1"):
        assert word in line
    assert not (tmp_path / "runs").exists()


def test_missing_data_root_is_reported_before_weights_are_fetched(tmp_path, capsys, hub_offline):
    missing = tmp_path / "no_such_data"
    argv = ["train", "--method", "coop", "--dataset", "custom_folder", "--shots", "1", "--data-root", str(missing),
            "--backbone", "ViT-B-32-quickgelu", "--output", str(tmp_path / "runs"), "--quiet"]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert str(missing) in line and "weights" not in line
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------- one backbone rule


@pytest.fixture
def tiny_prompts(tree, tmp_path):
    """A prompts file of a one-epoch CoOp run on the tiny backbone, exported like `vlprompt export` does."""
    out = tmp_path / "runs"
    assert main(["train", "--method", "coop", "--dataset", "custom_folder", "--shots", "1",
                 *common(tree, out, "--set", "optim.epochs=1")]) == 0
    run = next(out.rglob("prompts.safetensors")).parent
    exported = tmp_path / "coop.safetensors"
    assert main(["export", "--run", str(run), "--out", str(exported)]) == 0
    return exported


def test_eval_predict_and_load_rebuild_on_the_header_backbone(tiny_prompts, tree, tmp_path, monkeypatch, capsys):
    import vlprompt
    import vlprompt.weights

    real_load_clip, requested = vlprompt.weights.load_clip, []

    def recording_load_clip(name, pretrained=None, **kwargs):
        requested.append((name, pretrained))
        return real_load_clip(name, pretrained, **kwargs)

    monkeypatch.setattr(vlprompt.weights, "load_clip", recording_load_clip)
    image = next(tree.rglob("*.png"))
    assert main(["eval", str(tiny_prompts), "--dataset", "custom_folder", "--data-root", str(tree), "--quiet"]) == 0
    assert main(["predict", "--run", str(tiny_prompts), "--images", str(image)]) == 0
    vlprompt.load(tiny_prompts)
    assert requested == [("tiny", None)] * 3
    assert main(["eval", str(tiny_prompts), "--dataset", "custom_folder", "--data-root", str(tree), "--quiet",
                 "--pretrained", "none", "--backbone", "tiny-quickgelu"]) == 0
    assert requested[-1] == ("tiny-quickgelu", None)
