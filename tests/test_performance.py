"""The fast paths give the results of the plain ones: truncated text, cached class side, batched views, checkpointing,
the plain-block forward, and chunked / length-grouped token OT. Correctness only; speed lives in ``vlprompt bench``."""

import pytest
import torch

from conftest_methods import perturb
from vlprompt import ot
from vlprompt.backbone import _is_plain_block, _plain_block_forward
from vlprompt.weights import load_clip
from vlprompt.bench import (BenchReport, BenchSettings, encode_views_per_view, imagenet_names, interleaved,
                            render_markdown, run, shipped_classnames, token_ot_one_call)
from vlprompt.methods import available, build_method

CLASSES = ["dog", "sea lion", "golden retriever", "kite (bird of prey)", "Boeing 737-800"]


@pytest.fixture(scope="module")
def vit_b16():
    return load_clip("ViT-B-16", pretrained=None)


@pytest.fixture(scope="module")
def dataset_names():
    return shipped_classnames()


def assert_truncation_exact(clip, prompts):
    token_ids = clip.tokenize(prompts)
    with torch.no_grad():
        full = clip.encode_text(token_ids, truncate=False)
        truncated = clip.encode_text(token_ids, truncate=True)
    length = int(full.eot_index.max()) + 1
    assert truncated.tokens.shape[1] == length < clip.context_length
    scale = full.features.abs().max()
    assert (truncated.features - full.features).abs().max() <= 1e-5 * scale
    assert (truncated.tokens - full.tokens[:, :length]).abs().max() <= 1e-5 * full.tokens.abs().max()


# ------------------------------------------------------------------------------------------ text truncation


def test_shipped_class_names_cover_the_standard_datasets(dataset_names):
    counts = {name: len(names) for name, names in dataset_names.items()}
    assert counts == {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196,
                      "oxford_flowers": 102, "fgvc_aircraft": 100, "dtd": 47, "eurosat": 10, "ucf101": 101,
                      "imagenet_a": 200, "imagenet_r": 200}
    assert "kite (bird of prey)" in dataset_names["imagenet"]
    assert "Annual Crop Land" in dataset_names["eurosat"]


def longest_and_some(clip, names, longest, others):
    """The ``longest`` names with the most tokens (they set the truncated length) and ``others`` evenly spread."""
    lengths = clip.eot_index(clip.tokenize(names))
    picked = lengths.argsort(descending=True, stable=True)[:longest].tolist()
    picked += list(range(0, len(names), max(1, len(names) // others)))[:others]
    return [f"a photo of a {names[i].replace('_', ' ')}." for i in dict.fromkeys(picked)]


def test_truncated_text_equals_full_length_on_the_shipped_class_names(tiny_clip, dataset_names):
    for dataset, names in dataset_names.items():
        assert_truncation_exact(tiny_clip, longest_and_some(tiny_clip, names, 20, 100))


def test_truncated_text_equals_full_length_on_vit_b16_text_tower(vit_b16, dataset_names):
    prompts = []
    for dataset in ("imagenet", "oxford_flowers", "fgvc_aircraft", "stanford_cars", "ucf101", "eurosat"):
        prompts += longest_and_some(vit_b16, dataset_names[dataset], 3, 2)
    assert_truncation_exact(vit_b16, prompts)


@pytest.mark.parametrize("name", ["coop", "maple", "align", "ivlp"])
def test_truncation_is_exact_through_the_prompt_learners(tiny_clip, dataset_names, name):
    """Learned context, deep prompts and CoOp's 16-token context: class features do not depend on truncation."""
    method = build_method(name, tiny_clip, dataset_names["fgvc_aircraft"][:40] + dataset_names["imagenet"][:40])
    perturb(method)
    with torch.no_grad():
        tiny_clip.truncate_text = False
        try:
            full = method.encode_classes()
        finally:
            tiny_clip.truncate_text = True
        truncated = method.encode_classes()
    length = truncated.tokens.shape[2]
    assert length < full.tokens.shape[2]
    assert torch.allclose(truncated.features, full.features, atol=1e-5)
    assert torch.allclose(truncated.tokens, full.tokens[:, :, :length], atol=1e-5)
    assert torch.equal(truncated.reference_mask, full.reference_mask[:, :, :length])
    assert not full.reference_mask[:, :, length:].any() and not full.paper_mask[:, :, length:].any()


# ------------------------------------------------------------------------------------------ cached class side


@pytest.mark.parametrize("name", available())
def test_cached_class_side_gives_the_logits_of_recomputing_it(tiny_clip, images, name):
    method = build_method(name, tiny_clip, CLASSES).eval()
    perturb(method)
    calls = []
    original = tiny_clip.encode_text

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with torch.no_grad():
        cached = method.encode_classes()
        tiny_clip.encode_text = counting
        try:
            for batch in (images[:2], images[1:]):
                calls.clear()
                with_cache = method(batch, cached)
                cached_calls = len(calls)
                recomputed = method(batch)
                assert torch.equal(with_cache, recomputed)
                # With the class side given, only CoCoOp (image-conditioned prompts) runs the text encoder.
                assert cached_calls == (1 if name == "cocoop" else 0)
        finally:
            del tiny_clip.encode_text


# ------------------------------------------------------------------------------------------ batched views


@pytest.mark.parametrize("name, overrides", [
    ("align", {}),
    ("align", {"coupling": "independent", "n_visual_prompts": 3, "n_text_prompts": 2}),
    ("maple", {}),
    ("vpt", {}),
    ("vpt", {"visual_position": "after_cls", "n_visual_prompts": 2}),
    ("upt", {}),
])
def test_batched_views_equal_one_pass_per_view(tiny_clip, images, name, overrides):
    method = build_method(name, tiny_clip, CLASSES, **overrides).eval()  # eval: UPT's generator has dropout
    perturb(method)
    with torch.no_grad():
        batched = method.encode_views(images)
        per_view = encode_views_per_view(method, images)
        assert torch.allclose(batched.features, per_view.features, atol=1e-5)
        assert torch.allclose(batched.tokens, per_view.tokens, atol=1e-5)
        assert batched.patch_slice == per_view.patch_slice
        text = method.encode_classes()
        assert torch.allclose(method.match(batched, text, 3), method.match(per_view, text, 3), atol=1e-4)


# ------------------------------------------------------------------------------------------ backward paths


def _gradients(method, images, labels):
    method.zero_grad(set_to_none=True)
    loss, _ = method.training_loss(images, labels)
    loss.backward()
    return {name: p.grad.clone() for name, p in method.prompt_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["align", "maple", "coop"])
def test_grad_checkpointing_gives_the_same_gradients(tiny_clip, images, name):
    method = build_method(name, tiny_clip, CLASSES)
    perturb(method)
    labels = torch.tensor([0, 3, 1])
    reference = _gradients(method, images, labels)
    tiny_clip.set_grad_checkpointing(True)
    try:
        checkpointed = _gradients(method, images, labels)
    finally:
        tiny_clip.set_grad_checkpointing(False)
    assert reference.keys() == checkpointed.keys() and reference
    for key in reference:
        assert torch.allclose(reference[key], checkpointed[key], atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize("tower", ["text", "visual"])
@pytest.mark.parametrize("model", ["tiny", "ViT-B-16"])
def test_plain_block_forward_equals_the_open_clip_block(tiny_clip, vit_b16, tower, model):
    """Training runs the blocks through ``_plain_block_forward``; values and input gradients are the block's."""
    clip = tiny_clip if model == "tiny" else vit_b16
    transformer = clip.text.transformer if tower == "text" else clip.visual.transformer
    block = transformer.resblocks[1]
    assert _is_plain_block(block)
    width = clip.text_width if tower == "text" else clip.vision_width
    length = 11 if tower == "text" else 20
    mask = clip.text.attn_mask[:length, :length] if tower == "text" else None
    x = torch.randn(3, length, width, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ours = _plain_block_forward(block, x, mask)
    theirs = block(x, attn_mask=mask)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    weights = torch.randn_like(ours)
    grad_ours, = torch.autograd.grad((ours * weights).sum(), x)
    grad_theirs, = torch.autograd.grad((theirs * weights).sum(), x)
    assert (grad_ours - grad_theirs).abs().max() <= 1e-5 * grad_theirs.abs().max()


def test_blocks_with_hooks_run_through_their_own_forward(tiny_clip, images):
    block = tiny_clip.visual.transformer.resblocks[0]
    seen = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    try:
        assert not _is_plain_block(block)
        method = build_method("vpt", tiny_clip, CLASSES)
        loss, _ = method.training_loss(images, torch.tensor([0, 1, 2]))
    finally:
        handle.remove()
    assert seen and _is_plain_block(block)


# ------------------------------------------------------------------------------------------ token OT at large K


def _unit(*shape, seed):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("stop", ["reference", "per_problem"])
def test_token_ot_chunked_over_classes_equals_one_chunk_at_large_k(stop):
    classes = 1000
    image_tokens, text_tokens = _unit(2, 2, 9, 16, seed=1), _unit(classes, 2, 7, 16, seed=2)
    lengths = torch.randint(2, 8, (classes, 2), generator=torch.Generator().manual_seed(3))
    mask = torch.arange(7).view(1, 1, -1) < lengths.unsqueeze(-1)
    whole = ot.token_level_ot(image_tokens, text_tokens, text_mask=mask, stop=stop, chunk_size=classes)
    chunked = ot.token_level_ot(image_tokens, text_tokens, text_mask=mask, stop=stop, chunk_size=37)
    assert torch.allclose(whole.similarity, chunked.similarity, atol=1e-6)
    assert torch.allclose(whole.distance, chunked.distance, atol=1e-6)


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_token_ot_grouped_by_length_equals_one_padded_call(tiny_clip, images, mode):
    """ALIGN cuts each group of classes at the end of its token sets; ImageNet's 1000 names, both token sets."""
    method = build_method("align", tiny_clip, imagenet_names(1000), mode=mode)
    perturb(method)
    with torch.no_grad():
        text = method.encode_classes()
        views = method.encode_views(images[:1])
        stop = "reference" if mode == "reference" else "per_problem"
        grouped = method._token_similarity(views, text, 1, stop)
        one_call = token_ot_one_call(method, views, text, 1)
    assert grouped.shape == (1, 1000, 4, 4)
    assert torch.allclose(grouped, one_call, atol=1e-5)


def test_token_ot_grouping_keeps_gradients_in_paper_mode(tiny_clip, images):
    method = build_method("align", tiny_clip, CLASSES, mode="paper")
    perturb(method)
    _gradients(method, images, torch.tensor([0, 1, 4]))
    assert all(p.grad is not None for _, p in method.trainable_parameters())


# ------------------------------------------------------------------------------------------ the benchmark itself


def test_interleaved_rotates_and_takes_medians():
    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, torch.device("cpu"))
    assert order == ["a", "b", "b", "a", "a", "b"] and set(times) == {"a", "b"}


def test_bench_runs_and_renders_on_a_tiny_model():
    report = run(BenchSettings(model="tiny", quick=True, sections=("text",)), log=lambda line: None)
    rows = report.sections["text"]
    assert rows[-1]["dataset"] == "all" and all(row["speedup"] > 0 for row in rows)
    markdown = render_markdown(report)
    assert "| imagenet |" in markdown and "Text encoder" in markdown
    assert isinstance(BenchReport(report.machine, report.settings).to_json(), str)


def test_bench_command_is_registered():
    from vlprompt.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--only", "text,eval"])
    assert args.quick and args.only == "text,eval" and callable(args.func)
