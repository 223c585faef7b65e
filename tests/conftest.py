"""Shared fixtures: tiny random CLIPs built with open_clip's public API and its bundled BPE tokenizer."""

import pytest
import torch

from vlprompt.weights import load_clip

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_clip():
    """A tiny frozen CLIP (ViT, patch 8 on 32 px, widths 48/64, 3 layers each, D = 32)."""
    return load_clip("tiny")


@pytest.fixture
def images():
    """A batch of 3 random normalised images at the tiny model's resolution."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 32, 32, generator=generator)


TIMM_TOWERS = {
    # EVA-02: rotary position embeddings over the patches, class-token pooling, linear projection.
    "eva02": (32, dict(timm_model_name="eva02_tiny_patch14_224", timm_pool="token", timm_proj="linear")),
    # SigLIP-style: attention-pool (MAP) head and no projection, so the joint space is the tower's width (192).
    "vit_map": (192, dict(timm_model_name="vit_tiny_patch16_224", timm_pool="map", timm_proj="none")),
}


@pytest.fixture(scope="session")
def timm_clips():
    """Tiny-width CLIPs whose image towers are timm trunks (open_clip's ``TimmModel``), random weights, 224 px."""
    import open_clip

    from vlprompt.backbone import PromptableCLIP

    clips = {}
    for name, (embed_dim, tower) in TIMM_TOWERS.items():
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=dict(tower, timm_model_pretrained=False, image_size=224),
                               text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3))
        clips[name] = PromptableCLIP(model, open_clip.get_tokenizer("ViT-B-16"), name=f"timm-{name}")
    return clips
