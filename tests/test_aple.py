"""APLe: the FFT/Gaussian adapter, the two stages, the zero-shot KL term."""

import math

import pytest
import torch
import torch.nn.functional as F

from vlprompt.methods import build_method
from vlprompt.methods.aple import GaussianLowPassAdapter

CLASSES = ["dog", "cat", "sea lion"]


def test_alpha_zero_and_infinite_sigma_are_identity():
    x = torch.randn(2, 5, 7, 6)
    assert torch.equal(GaussianLowPassAdapter(sigma=0.3, alpha=0.0)(x), x)
    assert torch.allclose(GaussianLowPassAdapter(sigma=1e6, alpha=1.0)(x), x, atol=1e-5)


def test_removes_high_frequency_and_keeps_constant():
    adapter = GaussianLowPassAdapter(sigma=0.25, alpha=1.0, dims=(-2, -1))
    rows = torch.arange(8).view(-1, 1)
    cols = torch.arange(8).view(1, -1)
    checkerboard = ((rows + cols) % 2 * 2 - 1).float().expand(1, 3, 8, 8)  # the Nyquist pattern
    constant = torch.full((1, 3, 8, 8), 0.7)
    assert adapter(checkerboard).abs().max() < math.exp(-1 / 0.25 ** 2) * 1.01  # G at Nyquist = e^{-16}
    assert torch.allclose(adapter(constant), constant, atol=1e-6)
    assert torch.allclose(adapter(constant + checkerboard), constant, atol=1e-5)
    # Half blend keeps half of the pattern.
    half = GaussianLowPassAdapter(sigma=0.25, alpha=0.5, dims=(-2, -1))
    assert torch.allclose(half(checkerboard), 0.5 * checkerboard, atol=1e-5)


def test_adapter_matches_numpy_reference():
    import numpy as np

    x = torch.randn(1, 6, 4, 3, dtype=torch.float64)
    out = GaussianLowPassAdapter(sigma=0.4, alpha=0.3)(x)
    u = np.fft.fftfreq(6) / 0.5
    v = np.fft.fftfreq(4) / 0.5
    mask = np.exp(-(u[:, None] ** 2 + v[None, :] ** 2) / (2 * 0.4 ** 2))
    low = np.fft.ifft2(np.fft.fft2(x.numpy(), axes=(1, 2)) * mask[None, :, :, None], axes=(1, 2)).real
    assert np.allclose(out.numpy(), 0.7 * x.numpy() + 0.3 * low, atol=1e-10)


def test_adapter_is_differentiable_including_learnable_alpha():
    adapter = GaussianLowPassAdapter(sigma=0.25, alpha=0.2, learnable_alpha=True)
    x = torch.randn(2, 4, 4, 3, dtype=torch.float64, requires_grad=True)
    adapter.double()
    assert torch.autograd.gradcheck(lambda t: adapter(t), (x,))
    adapter(x).sum().backward()
    assert adapter.alpha_logit.grad is not None


def _train_one_step(method, images, labels):
    params = [p for _, p in method.trainable_parameters()]
    loss, _ = method.training_loss(images, labels)
    loss.backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(0.5 * p.grad)
                p.grad = None


@pytest.mark.parametrize("adapter_on", ["patch_tokens", "pixels"])
def test_stage_one_changes_only_text_stage_two_only_visual_and_adapter(tiny_clip, images, adapter_on):
    method = build_method("aple", tiny_clip, CLASSES, adapter_on=adapter_on, adapter_learnable_alpha=True)
    labels = torch.tensor([0, 1, 2])
    language, vision = method.stages()
    assert (language.name, vision.name) == ("language", "vision")
    before = method.prompt_state_dict()
    method.set_stage(language)
    _train_one_step(method, images, labels)
    after_one = method.prompt_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after_one[k])}
    assert changed and all(k.startswith("text.") for k in changed)
    assert any(k.startswith("text.deep") for k in changed)
    method.set_stage(vision)
    _train_one_step(method, images, labels)
    after_two = method.prompt_state_dict()
    changed = {k for k in before if not torch.equal(after_one[k], after_two[k])}
    assert any(k.startswith("visual.") for k in changed) and "adapter.alpha_logit" in changed
    assert not any(k.startswith("text.") for k in changed)


def test_stage_two_can_also_train_text(tiny_clip):
    method = build_method("aple", tiny_clip, CLASSES, stage2_train_text=True)
    method.set_stage(method.stages()[1])
    names = {n for n, _ in method.trainable_parameters()}
    assert any(n.startswith("text.") for n in names) and any(n.startswith("visual.") for n in names)


def test_kl_term_is_zero_when_the_model_equals_zero_shot_clip(tiny_clip, images):
    # Word-initialised shallow text prompts spelling out the template: the model is zero-shot CLIP.
    method = build_method("aple", tiny_clip, CLASSES, template="a photo of a {}.", text_n_ctx=4, text_depth=1,
                          kl_weight=1.0)
    language = method.stages()[0]
    method.set_stage(language)
    labels = torch.tensor([0, 1, 2])
    loss, logits = method.training_loss(images, labels)
    assert torch.allclose(logits, method.zero_shot_logits(images), atol=1e-5)
    assert torch.isclose(loss, F.cross_entropy(logits, labels), atol=1e-6)
    # Move the prompts away from the template: the KL term becomes positive.
    with torch.no_grad():
        method.text.ctx.add_(0.5 * torch.randn_like(method.text.ctx))
    loss, logits = method.training_loss(images, labels)
    assert loss > F.cross_entropy(logits, labels) + 1e-6
    # Stage II has no KL term.
    method.set_stage(method.stages()[1])
    loss, logits = method.training_loss(images, labels)
    assert torch.isclose(loss, F.cross_entropy(logits, labels))


def test_visual_side_is_off_in_stage_one_and_on_afterwards(tiny_clip, images):
    method = build_method("aple", tiny_clip, CLASSES)
    with torch.no_grad():
        method.visual.prompts.add_(1.0)
        full = method(images)
        method.set_stage(method.stages()[0])
        language_only = method(images)
        method.set_stage(method.stages()[1])
        assert torch.equal(method(images), full)
    assert not torch.allclose(full, language_only)
