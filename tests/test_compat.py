"""Importing checkpoints of the original code bases: safe reading, name/shape mapping, logits, round trips.

The tests write checkpoints the way the original Dassl trainers do (``torch.save`` of a dict with
``state_dict``, ``epoch``, ``optimizer`` and a scheduler *object* of a class living in ``dassl.optim``), with the
original parameter names written out by hand below from the original trainers' code, independently of
:mod:`vlprompt.compat.mappings`.
"""

import gzip
import json
import os
import re
import sys

import pytest
import torch

from conftest_compat import dassl_importable
from conftest_methods import perturb
from vlprompt.compat import (SOURCES, Placeholder, export_original, import_original, load_pickled,
                             read_original)
from vlprompt.errors import CheckpointError
from vlprompt.methods import build_method

CLASSES = ["dog", "sea lion", "golden retriever"]
NEW_CLASSES = ["fire truck", "tabby cat"]


# ------------------------------------------------------------------------------------ writing originals
class Payload:
    """Unpickling this with a plain ``torch.load`` would run ``touch <path>``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def save_original(path, state_dict, payload_path=None, legacy=False, compress=False):
    """A checkpoint as Dassl's ``save_checkpoint`` writes it, with a Dassl scheduler object inside."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.002, momentum=0.9)
    with dassl_importable() as scheduler_class:
        scheduler = scheduler_class(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 5))
        checkpoint = {"state_dict": state_dict, "epoch": 5, "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler, "val_result": None}
        if payload_path is not None:
            checkpoint["val_result"] = Payload(payload_path)
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    assert "dassl" not in sys.modules  # loading must not need the engine
    if compress:
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(gzip.compress(data))
    return path


def _frozen_clip_entries():
    """A few of the frozen CLIP weights the whole-model trainers also save (ignored on import)."""
    return {"image_encoder.conv1.weight": torch.randn(4, 3, 2, 2), "text_encoder.positional_embedding":
            torch.randn(5, 4), "logit_scale": torch.tensor(4.6)}


def original_state(source, method):
    """The state dict the original trainer of ``source`` saves for ``method``'s parameters (names by hand)."""
    p = {name: t.detach().clone() for name, t in method.prompt_state_dict().items()}
    buffers = {"token_prefix": torch.randn(3, 1, 64), "token_suffix": torch.randn(3, 70, 64)}
    if source in ("coop", "cocoop", "plot"):  # trainer registers only the prompt learner
        state = dict(buffers, ctx=p["text.ctx"] if source == "plot" else p["text.ctx"][0])
        if source == "cocoop":
            state.update({"meta_net.linear1.weight": p["meta_net.net.0.weight"],
                          "meta_net.linear1.bias": p["meta_net.net.0.bias"],
                          "meta_net.linear2.weight": p["meta_net.net.2.weight"],
                          "meta_net.linear2.bias": p["meta_net.net.2.bias"]})
        return state
    state = {f"prompt_learner.{k}": v for k, v in buffers.items()}
    state.update(_frozen_clip_entries())
    if source in ("maple", "align"):
        single = source == "maple"
        state["prompt_learner.ctx"] = p["text.ctx"][0] if single else p["text.ctx"]
        state["prompt_learner.proj.weight"] = p["coupling.proj.weight"]
        state["prompt_learner.proj.bias"] = p["coupling.proj.bias"]
        for i in range(method.config.text_depth - 1):
            state[f"prompt_learner.compound_prompts_text.{i}"] = p[f"text.deep.{i}"][0] if single else \
                p[f"text.deep.{i}"]
            for kind in ("weight", "bias"):
                state[f"prompt_learner.compound_prompt_projections.{i}.{kind}"] = p[f"coupling.deep_proj.{i}.{kind}"]
        return state
    # IVLP / PromptSRC / VPT: deep prompts live in the encoders' blocks 1.., layer-0 visual prompt in the ViT
    if source == "promptsrc":
        state["prompt_learner.ZS_image_encoder.conv1.weight"] = torch.randn(4, 3, 2, 2)
    if source != "vpt":
        state["prompt_learner.ctx"] = p["text.ctx"][0]
        for i in range(1, method.config.text_depth):
            state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = p[f"text.deep.{i - 1}"][0]
    if "visual.prompts" in p:
        state["image_encoder.VPT"] = p["visual.prompts"][0]
        for i in range(1, method.config.visual_depth):
            state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = p[f"visual.deep.{i - 1}"][0]
    return state


# source -> (our method, options of the hand-built model); small sizes keep the tiny model fast
CASES = {
    "coop": ("coop", "coop", dict(text_n_ctx=4)),
    "coop_csc": ("coop", "coop", dict(text_n_ctx=3, csc=True)),
    "cocoop": ("cocoop", "cocoop", dict()),
    "plot": ("plot", "plot", dict(n_text_prompts=2, text_n_ctx=4)),
    "maple": ("maple", "maple", dict(text_depth=3)),
    "align": ("align", "align", dict(n_text_prompts=2, n_visual_prompts=2, text_depth=2)),
    "ivlp": ("ivlp", "ivlp", dict(text_depth=3, visual_depth=2, visual_n_ctx=3)),
    "ivlp_text_only": ("ivlp", "ivlp_text", dict(text_depth=2)),
    "promptsrc": ("promptsrc", "promptsrc", dict(text_n_ctx=4, visual_n_ctx=4, text_depth=2, visual_depth=3)),
    "vpt": ("vpt", "vpt", dict(visual_n_ctx=4, visual_depth=2)),
}


def hand_built(tiny_clip, case, classes=CLASSES):
    source, name, options = CASES[case]
    return source, perturb(build_method(name, tiny_clip, classes, **options), scale=0.1)


def assert_same_prompts(a, b):
    sa, sb = a.prompt_state_dict(), b.prompt_state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ------------------------------------------------------------------------------------ every source
def test_every_source_is_covered():
    assert {source for source, _, _ in CASES.values()} == set(SOURCES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_gives_the_logits_of_the_same_parameters_placed_by_hand(tiny_clip, images, tmp_path, case):
    source, expected = hand_built(tiny_clip, case)
    path = save_original(tmp_path / "model.pth.tar-5", original_state(source, expected))
    imported = import_original(source, path, tiny_clip, CLASSES)
    assert imported.name == expected.name
    assert_same_prompts(imported, expected)
    with torch.no_grad():
        assert torch.allclose(imported(images), expected(images), atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_then_import_round_trip_is_exact(tiny_clip, tmp_path, case):
    source, method = hand_built(tiny_clip, case)
    path = tmp_path / "prompt_learner" / "model.pth.tar-5"
    export_original(method, source, path, epoch=5)
    saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    assert saved["epoch"] == 5
    by_hand = {k: v for k, v in original_state(source, method).items()
               if not k.endswith(("token_prefix", "token_suffix")) and "encoder.conv1" not in k
               and k not in ("logit_scale", "text_encoder.positional_embedding")}
    assert sorted(saved["state_dict"]) == sorted(by_hand)  # the original names, nothing else
    for name, tensor in by_hand.items():
        assert torch.equal(saved["state_dict"][name], tensor), name
    again = import_original(source, path, tiny_clip, CLASSES)
    assert_same_prompts(again, method)
    assert read_original(source, path).epoch == 5


def test_an_already_loaded_mapping_is_accepted(tiny_clip, images):
    source, expected = hand_built(tiny_clip, "maple")
    state = original_state(source, expected)
    for checkpoint in (state, {"state_dict": state, "epoch": 2}):
        imported = import_original(source, checkpoint, tiny_clip, CLASSES)
        assert_same_prompts(imported, expected)


def test_half_precision_checkpoints_are_cast(tiny_clip):
    """The originals run CLIP in fp16, so ctx and proj are often stored as half."""
    source, expected = hand_built(tiny_clip, "maple")
    half = {name: tensor.half() for name, tensor in original_state(source, expected).items()}
    imported = import_original(source, half, tiny_clip, CLASSES)
    for name, tensor in imported.prompt_state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected.prompt_state_dict()[name].half().float()), name


def test_two_names_for_one_tensor_are_refused(tiny_clip):
    source, expected = hand_built(tiny_clip, "maple")
    state = original_state(source, expected)
    state["ctx"] = state["prompt_learner.ctx"]  # the bare name also maps to prompt_learner.ctx
    with pytest.raises(CheckpointError, match="both hold 'prompt_learner.ctx'"):
        import_original(source, state, tiny_clip, CLASSES)


def test_imported_prompts_move_to_new_classes(tiny_clip, images, tmp_path):
    """token_prefix/token_suffix of the training classes are ignored: the class side is rebuilt."""
    source, trained = hand_built(tiny_clip, "maple")
    path = save_original(tmp_path / "model.pth.tar-5", original_state(source, trained))
    imported = import_original(source, path, tiny_clip, NEW_CLASSES)
    trained.set_classnames(NEW_CLASSES)
    with torch.no_grad():
        assert torch.allclose(imported(images), trained(images), atol=1e-5)


def test_align_reproduces_the_original_prompt_templates(tiny_clip, tmp_path):
    """Prompt 0 = "a photo of a <name>." ("of a" fixed), prompts 1.. = "X X <name>." (the original MMP)."""
    source, trained = hand_built(tiny_clip, "align")
    imported = import_original(source, original_state(source, trained), tiny_clip, CLASSES)
    assert imported.text.prefixes == ["a photo of a", "X X"]
    assert imported.options["mode"] == "reference"


def test_options_are_read_from_shapes_and_can_be_overridden(tiny_clip):
    source, trained = hand_built(tiny_clip, "ivlp")
    original = read_original(source, original_state(source, trained))
    assert original.method == "ivlp"
    assert original.options == dict(text_n_ctx=2, text_depth=3, text_ctx_init="a photo of a",
                                    visual_n_ctx=3, visual_depth=2)
    assert "prompt_learner.token_prefix" in original.ignored and "logit_scale" in original.ignored
    plain = import_original(source, original_state(source, trained), tiny_clip, CLASSES, text_ctx_init=None)
    assert plain.text.prefixes == ["X X"]


# ------------------------------------------------------------------------------------ safe reading
@pytest.mark.parametrize("fmt", ["zip", "legacy", "gzip"])
def test_dassl_checkpoint_loads_without_dassl_and_without_running_its_payload(tiny_clip, tmp_path, fmt):
    source, expected = hand_built(tiny_clip, "maple")
    marker = tmp_path / "PWNED"
    path = save_original(tmp_path / "model.pth.tar-5", original_state(source, expected), payload_path=marker,
                         legacy=fmt == "legacy", compress=fmt == "gzip")
    if fmt != "gzip":
        with pytest.raises(Exception):  # what users hit today: weights_only refuses these files
            torch.load(path, weights_only=True)
    with pytest.warns(UserWarning, match=r"posix\.system|nt\.system"):
        imported = import_original(source, path, tiny_clip, CLASSES)
    assert not marker.exists()
    assert_same_prompts(imported, expected)

    loaded, not_loaded = load_pickled(path)
    assert not marker.exists()
    scheduler = loaded["scheduler"]
    assert isinstance(scheduler, Placeholder)
    assert scheduler.qualified_name == "dassl.optim.lr_scheduler.ConstantWarmupScheduler"
    assert "dassl.optim.lr_scheduler.ConstantWarmupScheduler" in not_loaded
    payload = loaded["val_result"]
    assert isinstance(payload, Placeholder) and payload.args == (f"touch {marker}",)
    assert loaded["epoch"] == 5 and isinstance(loaded["optimizer"]["param_groups"], list)


class Reducer:
    """Pickles as a call of ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_code_in_any_position_is_never_called(tmp_path):
    import subprocess

    marker = tmp_path / "PWNED"
    command = f"touch {marker}"
    payloads = {
        "posix.system": Payload(marker),
        "builtins.eval": Reducer(eval, f"__import__('os').system({command!r})"),
        "builtins.exec": Reducer(exec, f"import os; os.system({command!r})"),
        "subprocess.call": Reducer(subprocess.call, ["touch", str(marker)]),
    }
    for expected, payload in payloads.items():
        path = tmp_path / "payload.pt"
        torch.save({"state_dict": {}, "nested": [{"deep": payload}]}, path)
        loaded, not_loaded = load_pickled(path)
        assert not marker.exists()
        placeholder = loaded["nested"][0]["deep"]
        assert isinstance(placeholder, Placeholder)
        assert placeholder.qualified_name.endswith(expected.split(".")[1]) and placeholder.qualified_name in not_loaded
    torch.save(Payload(marker), path)  # not even a dict
    with pytest.raises(CheckpointError, match="expected a dict"), pytest.warns(UserWarning, match="NOT executed"):
        read_original("coop", path)
    assert not marker.exists()


def test_tensor_views_and_half_precision_survive_both_formats(tmp_path):
    base = torch.arange(24.0).view(4, 6)
    saved = {"column": base[:, 1], "transposed": base.t(), "half": base.half(), "empty": torch.zeros(0, 3)}
    for legacy in (False, True):
        path = tmp_path / f"views{legacy}.pt"
        torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
        loaded, _ = load_pickled(path)
        for name, tensor in saved.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_unreadable_files_are_one_clear_error(tmp_path):
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth.tar"):
        read_original("maple", tmp_path / "junk.pth.tar")
    with pytest.raises(CheckpointError, match="not found"):
        read_original("maple", tmp_path / "missing.pth.tar")


# ------------------------------------------------------------------------------------ clear errors
def _maple_state(tiny_clip):
    source, trained = hand_built(tiny_clip, "maple")
    return original_state(source, trained)


def test_missing_tensor_is_named(tiny_clip, tmp_path):
    state = _maple_state(tiny_clip)
    del state["prompt_learner.compound_prompts_text.0"]  # .1 is present: depth 3 is implied
    path = save_original(tmp_path / "model.pth.tar-5", state)
    with pytest.raises(CheckpointError, match=re.escape("prompt_learner.compound_prompts_text.0")):
        import_original("maple", path, tiny_clip, CLASSES)
    state = _maple_state(tiny_clip)
    del state["prompt_learner.ctx"]
    with pytest.raises(CheckpointError, match=re.escape("missing tensor 'prompt_learner.ctx'")):
        import_original("maple", state, tiny_clip, CLASSES)


@pytest.mark.parametrize("name", ["prompt_learner.extra_prompt", "image_encoder.transformer.resblocks.1.VPT_shallow"])
def test_unknown_tensor_is_named(tiny_clip, tmp_path, name):
    """Unknown names are errors; a VPT-named tensor inside the frozen encoders is never silently dropped."""
    state = _maple_state(tiny_clip)
    state[name] = torch.zeros(2, 48)
    path = save_original(tmp_path / "model.pth.tar-5", state)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        import_original("maple", path, tiny_clip, CLASSES)


def test_shape_mismatch_is_named(tiny_clip, tmp_path):
    state = _maple_state(tiny_clip)
    state["prompt_learner.proj.weight"] = torch.zeros(768, 64)
    path = save_original(tmp_path / "model.pth.tar-5", state)
    with pytest.raises(CheckpointError, match=re.escape("prompt_learner.proj.weight: (768, 64) in the checkpoint, "
                                                        "(48, 64) expected")):
        import_original("maple", path, tiny_clip, CLASSES)
    state = _maple_state(tiny_clip)
    state["prompt_learner.ctx"] = torch.zeros(2, 512)  # a ViT-B/16 checkpoint on the tiny backbone
    with pytest.raises(CheckpointError, match=re.escape("prompt_learner.ctx: (2, 512)")):
        import_original("maple", state, tiny_clip, CLASSES)


def test_class_specific_context_needs_its_classes(tiny_clip):
    source, trained = hand_built(tiny_clip, "coop_csc")
    with pytest.raises(CheckpointError, match="ctx"):
        import_original(source, original_state(source, trained), tiny_clip, NEW_CLASSES)


def test_export_refuses_what_the_original_cannot_hold(tiny_clip, tmp_path):
    align = build_method("align", tiny_clip, CLASSES, n_text_prompts=2, n_visual_prompts=2, text_depth=2)
    with pytest.raises(CheckpointError, match="holds exactly one"):
        export_original(align, "maple", tmp_path / "x.pth.tar")
    with pytest.raises(CheckpointError, match="no counterpart"):
        export_original(align, "coop", tmp_path / "x.pth.tar")
    vpt = build_method("vpt", tiny_clip, CLASSES)
    with pytest.raises(CheckpointError, match=re.escape("missing tensor 'prompt_learner.ctx'")):
        export_original(vpt, "ivlp", tmp_path / "x.pth.tar")  # IVLP always has a text context
    assert not (tmp_path / "x.pth.tar").exists()


# ------------------------------------------------------------------------------------ command line
def test_cli_converts_to_prompts_safetensors(tiny_clip, tmp_path):
    from safetensors import safe_open

    from vlprompt.cli import main

    source, trained = hand_built(tiny_clip, "align")
    path = save_original(tmp_path / "model.pth.tar-5", original_state(source, trained))
    out = tmp_path / "prompts.safetensors"
    assert main(["import-original", "--source", "align", "--checkpoint", str(path), "--out", str(out),
                 "--backbone", "tiny", "--classes", *CLASSES]) == 0
    with safe_open(str(out), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["vlprompt"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    assert metadata["method"] == "align" and metadata["classnames"] == CLASSES
    assert metadata["imported_from"]["epoch"] == 5
    rebuilt = build_method(metadata["method"], tiny_clip, CLASSES, **metadata["options"])
    rebuilt.load_prompt_state_dict(tensors)
    assert_same_prompts(rebuilt, trained)
