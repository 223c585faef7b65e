"""Helpers for the method tests."""

import torch


def perturb(method, scale=0.05, seed=0):
    """Add seeded Gaussian noise of std ``scale`` to every prompt parameter of ``method`` (in place); return it.

    Tests perturb prompts away from their initialisation so that comparisons do not pass by symmetry.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in method.prompt_parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return method


def cached_features(clip, images, labels):
    """The :class:`~vlprompt.engine.features.CachedFeatures` of ``images`` (one view, also used as val)."""
    from vlprompt.engine.features import CachedFeatures

    with torch.no_grad():
        features = clip.encode_image(images).features.float()
    return CachedFeatures(train=features[None], train_labels=labels, val=features, val_labels=labels, record={})
