"""Shared fixtures: tiny random CLIPs built with open_clip's public API and its bundled BPE tokenizer."""

import pytest
import torch

from vlprompt.backbone import load_clip

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
