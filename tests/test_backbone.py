"""PromptableCLIP against open_clip's own forward, prompt insertion semantics, and safe weight loading."""

import os

import pytest
import torch

from vlprompt.weights import load_clip, load_state_dict_file
from vlprompt.errors import CheckpointError, ConfigError

TEXTS = ["a photo of a dog.", "a tabby cat on a sofa", "x", "a centered satellite photo of river."]


def test_no_prompt_forwards_equal_open_clip_on_tiny(tiny_clip, images):
    tokens = tiny_clip.tokenize(TEXTS)
    with torch.no_grad():
        ours_text = tiny_clip.encode_text(tokens, truncate=False)
        ours_text_truncated = tiny_clip.encode_text(tokens)
        ours_image = tiny_clip.encode_image(images)
        ref_text = tiny_clip.model.encode_text(tokens)
        ref_image = tiny_clip.model.encode_image(images)
    assert (ours_text.features - ref_text).abs().max() <= 1e-5
    assert (ours_text_truncated.features - ref_text).abs().max() <= 1e-5
    assert (ours_image.features - ref_image).abs().max() <= 1e-5
    assert ours_text.tokens.shape == (4, 77, tiny_clip.embed_dim)
    assert ours_text_truncated.tokens.shape[1] == int(tokens.argmax(-1).max()) + 1
    # The truncated token features are the untruncated ones, position by position.
    length = ours_text_truncated.tokens.shape[1]
    assert torch.allclose(ours_text_truncated.tokens, ours_text.tokens[:, :length], atol=1e-5)
    assert ours_image.tokens.shape == (3, 16, tiny_clip.embed_dim)


def test_no_prompt_forwards_equal_open_clip_on_random_vit_b16():
    clip = load_clip("ViT-B-16", pretrained=None)
    assert (clip.embed_dim, clip.text_width, clip.vision_width) == (512, 512, 768)
    assert (clip.text_layers, clip.vision_layers, clip.context_length, clip.image_size) == (12, 12, 77, 224)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = clip.tokenize(TEXTS[:2])
    with torch.no_grad():
        ours_text = clip.encode_text(tokens).features
        ours_image = clip.encode_image(images)
        ref_text = clip.model.encode_text(tokens)
        ref_image = clip.model.encode_image(images)
    assert (ours_text - ref_text).abs().max() <= 1e-5
    assert (ours_image.features - ref_image).abs().max() <= 1e-5
    assert ours_image.tokens.shape == (2, 196, 512)


def test_all_clip_weights_frozen(tiny_clip):
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    assert torch.isclose(tiny_clip.logit_scale, torch.tensor(1 / 0.07))


def _text_hidden_states(clip, tokens, deep_prompts):
    """Hidden states entering each text block, recorded with forward pre-hooks."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args, kw=None: seen.append(args[0].clone()))
             for b in clip.text.transformer.resblocks]
    try:
        clip.encode_text(tokens, deep_prompts=deep_prompts, truncate=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_text_deep_prompt_replaces_rows_before_requested_block_only(tiny_clip):
    tokens = tiny_clip.tokenize(TEXTS[:2])
    prompt = torch.randn(2, tiny_clip.text_width)
    plain = _text_hidden_states(tiny_clip, tokens, None)
    prompted = _text_hidden_states(tiny_clip, tokens, {2: prompt})
    # Inputs to blocks 0 and 1 are untouched; block 2 receives the prompt at rows 1..2.
    assert torch.equal(plain[0], prompted[0]) and torch.equal(plain[1], prompted[1])
    assert torch.equal(prompted[2][:, 1:3], prompt.expand(2, -1, -1))
    assert torch.equal(prompted[2][:, 0], plain[2][:, 0])
    assert torch.equal(prompted[2][:, 3:], plain[2][:, 3:])
    out_plain = tiny_clip.encode_text(tokens).features
    out_prompted = tiny_clip.encode_text(tokens, deep_prompts={2: prompt}).features
    assert not torch.allclose(out_plain, out_prompted)
    # A list form is equivalent to the mapping form; entry 0 is ignored (layer 0 enters through embeddings).
    out_list = tiny_clip.encode_text(tokens, deep_prompts=[prompt, None, prompt]).features
    assert torch.allclose(out_list, out_prompted)


def _vision_hidden_states(clip, images, **kwargs):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
             for b in clip.visual.transformer.resblocks]
    try:
        out = clip.encode_image(images, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("position", ["after_patches", "after_cls"])
def test_visual_prompts_inserted_and_replaced_at_requested_layers(tiny_clip, images, position):
    width = tiny_clip.vision_width
    prompts = torch.randn(2, width)
    deep = torch.randn(2, width)
    plain, plain_out = _vision_hidden_states(tiny_clip, images)
    layer0, _ = _vision_hidden_states(tiny_clip, images, prompts=prompts, prompt_position=position)
    deep_seen, out = _vision_hidden_states(tiny_clip, images, prompts=prompts, deep_prompts={2: deep},
                                           prompt_position=position)
    rows = slice(-2, None) if position == "after_patches" else slice(1, 3)
    others = [i for i in range(19) if i not in range(19)[rows]]
    assert layer0[0].shape[1] == 1 + 16 + 2
    # Block 0 sees ln_pre of the prompt rows; the other rows keep their (per-token normalised) values.
    assert torch.allclose(layer0[0][:, rows], tiny_clip.visual.ln_pre(prompts).expand(3, -1, -1), atol=1e-6)
    assert torch.allclose(layer0[0][:, others], plain[0], atol=1e-6)
    # Deep prompts: blocks 0 and 1 identical to the shallow run, block 2 sees the deep rows verbatim.
    assert torch.equal(deep_seen[1], layer0[1])
    assert torch.equal(deep_seen[2][:, rows], deep.expand(3, -1, -1))
    assert torch.equal(deep_seen[2][:, others], layer0[2][:, others])
    assert out.tokens.shape == (3, 18, tiny_clip.embed_dim)
    assert out.patch_tokens.shape == (3, 16, tiny_clip.embed_dim)
    assert not torch.allclose(out.features, plain_out.features)


def test_patch_transform_hook_sees_patch_grid(tiny_clip, images):
    grids = []

    def record(grid):
        grids.append(grid.shape)
        return grid

    out = tiny_clip.encode_image(images, patch_transform=record)
    assert grids == [torch.Size([3, 4, 4, tiny_clip.vision_width])]
    assert torch.allclose(out.features, tiny_clip.encode_image(images).features)


def test_gradients_reach_prompts_through_frozen_model(tiny_clip, images):
    prompts = torch.zeros(2, tiny_clip.vision_width, requires_grad=True)
    tiny_clip.encode_image(images, prompts=prompts).features.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_grad_checkpointing_gives_same_gradients(tiny_clip, images):
    def grads():
        prompts = torch.ones(2, tiny_clip.vision_width, requires_grad=True)
        tiny_clip.encode_image(images, prompts=prompts).features.square().sum().backward()
        return prompts.grad

    reference = grads()
    tiny_clip.set_grad_checkpointing(True)
    try:
        checkpointed = grads()
    finally:
        tiny_clip.set_grad_checkpointing(False)
    assert torch.allclose(reference, checkpointed, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip_reproduces_outputs(tmp_path, images, suffix):
    source = load_clip("tiny")
    with torch.no_grad():  # make the weights differ from the fixed tiny initialisation
        for p in source.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / f"weights{suffix}"
    state = source.model.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_clip("tiny", pretrained=path)
    tokens = source.tokenize(TEXTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images).features, source.encode_image(images).features)
        assert torch.equal(loaded.encode_text(tokens).features, source.encode_text(tokens).features)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, handle)
    with pytest.raises(CheckpointError, match=r"refusing .*evil.pt: it contains pickled code \((posix|nt)\.system\)"):
        load_state_dict_file(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_bad_weight_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*missing.pt"):
        load_clip("tiny", pretrained=tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pt.*do not fit"):
        load_clip("tiny", pretrained=wrong)
    with pytest.raises(ConfigError, match="unknown backbone"):
        load_clip("ViT-Q-99")
    with pytest.raises(ConfigError, match="precision"):
        load_clip("tiny", precision="fp8")


def test_openai_format_state_dict_loads_into_quickgelu_architecture(tmp_path, images):
    """OpenAI's released state dicts use open_clip's key names plus three scalar entries open_clip drops."""
    source = load_clip("tiny-quickgelu")
    state = dict(source.model.state_dict())
    assert "visual.conv1.weight" in state and "transformer.resblocks.0.attn.in_proj_weight" in state
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    with torch.no_grad():
        state = {k: (v + 0.01 if k == "visual.proj" else v) for k, v in state.items()}
    path = tmp_path / "openai_style.pt"
    torch.save(state, path)
    loaded = load_clip("tiny-quickgelu", pretrained=path)
    with torch.no_grad():
        assert torch.equal(loaded.visual.proj, state["visual.proj"])
        assert not torch.equal(loaded.encode_image(images).features, source.encode_image(images).features)


# ------------------------------------------------------------------------------------------- ResNets
def test_resnet_local_features_are_the_attention_pool_at_every_position():
    """CLIP's ResNets: the image feature is open_clip's, and the local features (PLOT's visual set) are the
    attention pool's outputs at the spatial positions, recomputed here head by head."""
    clip = load_clip("tiny-rn")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    visual, pool = clip.visual, clip.visual.attnpool
    with torch.no_grad():
        out = clip.encode_image(images)
        reference = clip.model.encode_image(images)
        x = visual.stem(images)
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
        batch, width, height, breadth = x.shape
        seq = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        seq = torch.cat([seq.mean(1, keepdim=True), seq], 1) + pool.positional_embedding  # (B, 1 + HW, C)
        heads, length = pool.num_heads, seq.shape[1]

        def split(t):
            return t.view(batch, length, heads, width // heads).transpose(1, 2)  # (B, h, T, d)

        weights = (split(pool.q_proj(seq)) @ split(pool.k_proj(seq)).transpose(-1, -2) / (width // heads) ** 0.5)
        by_hand = pool.c_proj((weights.softmax(-1) @ split(pool.v_proj(seq))).transpose(1, 2).reshape(
            batch, length, width))
    assert clip.has_image_tokens and not clip.is_vit and clip.token_grid == (height, breadth) == (2, 2)
    assert out.tokens.shape == (2, 4, clip.embed_dim) and torch.equal(out.patch_tokens, out.tokens)
    assert (out.features - reference).abs().max() <= 1e-6
    torch.testing.assert_close(out.tokens, by_hand[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.features, by_hand[:, 0], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="visual prompts need a ViT image tower"):
        clip.encode_image(images, prompts=torch.zeros(2, 8))


def test_rn50_gives_plot_its_7x7_local_features():
    clip = load_clip("RN50-quickgelu", pretrained=None)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = clip.encode_image(images)
        reference = clip.model.encode_image(images)
    assert clip.token_grid == (7, 7) and out.tokens.shape == (1, 49, 1024)
    assert (out.features - reference).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------- timm towers
@pytest.mark.parametrize("position", ["after_patches", "after_cls"])
@pytest.mark.parametrize("tower", ["eva02", "vit_map"])
def test_timm_towers_equal_open_clip_and_take_prompts_like_our_vit(timm_clips, tower, position):
    """EVA / SigLIP-style towers: without prompts open_clip's encode_image; prompts go after the patches or after
    the prefix tokens, pass norm_pre, deep prompts replace exactly those rows before the requested block, and
    pooling sees the image tokens only."""
    clip = timm_clips[tower]
    trunk, width = clip.timm_trunk, clip.vision_width
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(7)
    prompts, deep = torch.randn(3, width, generator=generator), torch.randn(3, width, generator=generator)
    # Both towers' norm_pre is the identity: a LayerNorm with random affine makes "prompts pass norm_pre" testable.
    norm_pre = torch.nn.LayerNorm(width)
    with torch.no_grad():
        norm_pre.weight.copy_(torch.rand(width, generator=generator) + 0.5)
        norm_pre.bias.copy_(torch.randn(width, generator=generator))
    identity, trunk.norm_pre = trunk.norm_pre, norm_pre.requires_grad_(False)
    seen, ropes, finals = {}, [], []

    def record(index, args, kwargs):
        seen[index] = args[0].clone()
        ropes.append(kwargs.get("rope"))

    hooks = [block.register_forward_pre_hook(lambda _, args, kwargs, i=i: record(i, args, kwargs), with_kwargs=True)
             for i, block in enumerate(trunk.blocks)]
    hooks.append(trunk.norm.register_forward_hook(lambda _, args, output: finals.append(output)))
    try:
        with torch.no_grad():
            plain = clip.encode_image(images)
            reference = clip.model.encode_image(images)
            plain_seen = dict(seen)
            prompted = clip.encode_image(images, prompts=prompts, deep_prompts={2: deep}, prompt_position=position)
            n_tokens = plain_seen[0].shape[1]  # prefix tokens + patches
            start = n_tokens if position == "after_patches" else trunk.num_prefix_tokens
            rows, others = slice(start, start + 3), [i for i in range(n_tokens + 3) if not start <= i < start + 3]
            # The pooled feature is that of the final image tokens with the prompt rows taken out.
            pooled = clip.visual.head(trunk.forward_head(finals[-1][:, others]))
            prompts_after_norm_pre = trunk.norm_pre(prompts)
    finally:
        for hook in hooks:
            hook.remove()
        trunk.norm_pre = identity  # the fixture is shared by other tests
    grid = clip.token_grid
    assert clip.is_vit and clip.vision_layers == len(trunk.blocks)
    assert (plain.features - reference).abs().max() <= 1e-6
    assert plain.tokens.shape == (2, grid[0] * grid[1], clip.embed_dim)
    assert n_tokens == trunk.num_prefix_tokens + grid[0] * grid[1]
    assert seen[0].shape[1] == n_tokens + 3
    torch.testing.assert_close(seen[0][:, rows], prompts_after_norm_pre.expand(2, -1, -1))
    torch.testing.assert_close(seen[0][:, others], plain_seen[0])
    assert torch.equal(seen[2][:, rows], deep.expand(2, -1, -1))
    assert prompted.tokens.shape == (2, grid[0] * grid[1] + 3, clip.embed_dim)
    assert prompted.patch_tokens.shape == plain.tokens.shape
    assert not torch.allclose(prompted.features, plain.features)
    torch.testing.assert_close(prompted.features, pooled)
    if tower == "eva02":  # rotary rows follow the tokens after the prefix: identity on the prompts, patches' own
        plain_rope, rope = ropes[0], ropes[-1]
        prompt_rows = slice(start - trunk.num_prefix_tokens, start - trunk.num_prefix_tokens + 3)
        sin, cos = rope[prompt_rows].chunk(2, dim=-1)
        assert torch.equal(sin, torch.zeros_like(sin)) and torch.equal(cos, torch.ones_like(cos))
        kept = [i for i in range(rope.shape[0]) if not prompt_rows.start <= i < prompt_rows.stop]
        assert torch.equal(rope[kept], plain_rope)
    else:
        assert all(rope is None for rope in ropes)


def test_timm_prompt_tokens_get_the_identity_rotation():
    """Under EVA-02's rotary embeddings the appended prompt rows are left unrotated, the others as before."""
    from timm.layers import apply_rot_embed_cat

    from vlprompt.backbone import _with_identity_rotations

    generator = torch.Generator().manual_seed(8)
    angles = torch.rand(5, 4, generator=generator) * 6
    rope = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (5 tokens, [sin | cos])
    q = torch.randn(2, 3, 5 + 2, 4, generator=generator)  # (B, heads, tokens, head dim)
    rotated = apply_rot_embed_cat(q, _with_identity_rotations(rope, 2))
    torch.testing.assert_close(rotated[:, :, :5], apply_rot_embed_cat(q[:, :, :5], rope))
    assert torch.equal(rotated[:, :, 5:], q[:, :, 5:])
    rotated = apply_rot_embed_cat(q, _with_identity_rotations(rope, 2, at_start=True))
    assert torch.equal(rotated[:, :, :2], q[:, :, :2])
    torch.testing.assert_close(rotated[:, :, 2:], apply_rot_embed_cat(q[:, :, 2:], rope))


def test_timm_patch_transform_and_gradients(timm_clips):
    clip = timm_clips["eva02"]
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    grids = []
    out = clip.encode_image(images, patch_transform=lambda grid: grids.append(grid.shape) or grid)
    assert grids == [torch.Size([1, *clip.token_grid, clip.vision_width])]
    torch.testing.assert_close(out.features, clip.encode_image(images).features)
    prompts = torch.zeros(2, clip.vision_width, requires_grad=True)
    clip.encode_image(images, prompts=prompts).features.sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_a_missing_tokenizer_package_is_a_clear_error(monkeypatch):
    import open_clip

    real = open_clip.get_tokenizer

    def needs_transformers(name):  # as open_clip behaves without transformers installed
        if "SigLIP" in name:
            raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
        return real(name)

    monkeypatch.setattr(open_clip, "get_tokenizer", needs_transformers)
    with pytest.raises(ConfigError, match="pip install transformers"):
        load_clip("ViT-B-16-SigLIP", pretrained=None)
