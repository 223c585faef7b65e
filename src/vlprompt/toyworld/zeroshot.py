"""Zero-shot accuracy of a CLIP on toy datasets generated in memory (the template is ``"a photo of a {}."``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from open_clip.model import CLIP

from vlprompt.toyworld.materialize import generate_split
from vlprompt.toyworld.model import get_tokenizer, images_to_tensor
from vlprompt.toyworld.world import DATASETS, HELD_OUT_CLASSNAMES, OBJECT_CLASSNAMES

TEMPLATE = "a photo of a {}."
# Evaluated by pretraining and recorded in toyclip.json; "toy_objects_held_out" is the 36-way accuracy on the test
# images of the held-out compositions alone.
EVALUATED: tuple[str, ...] = (
    "toy_objects",
    "toy_objects_held_out",
    "toy_objects_sketch",
    "toy_objects_pixel",
    "toy_objects_inverted",
    "toy_objects_painted",
    "toy_shapes",
    "toy_colors",
    "toy_textures",
    "toy_patterns",
    "toy_layouts",
    "toy_signs",
)


@torch.no_grad()
def zero_shot_predict(
    model: CLIP,
    images: np.ndarray,
    classnames: Sequence[str],
    template: str = TEMPLATE,
    batch_size: int = 256,
) -> np.ndarray:
    """Predicted labels (N,) of uint8 images (N, 64, 64, 3) among ``classnames``."""
    device = next(model.parameters()).device
    tokens = get_tokenizer()([template.format(c) for c in classnames]).to(device)
    text = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)  # (C, D)
    predictions = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size]).to(device)
        features = torch.nn.functional.normalize(model.encode_image(x), dim=-1)  # (B, D)
        predictions.append((features @ text.T).argmax(dim=-1).cpu())
    return torch.cat(predictions).numpy()


def zero_shot_accuracy(model: CLIP, dataset: str, n_per_class: int = 50, seed: int = 0) -> float:
    """Accuracy on ``n_per_class`` generated test images per class of ``dataset``.

    ``"toy_objects_held_out"`` means: the held-out compositions' test images of ``toy_objects``, classified among
    all 36 classes.
    """
    held_out = dataset == "toy_objects_held_out"
    name = "toy_objects" if held_out else dataset
    images, labels = generate_split(DATASETS[name], "test", n_per_class, seed)
    if held_out:
        keep = np.isin(labels, [OBJECT_CLASSNAMES.index(c) for c in HELD_OUT_CLASSNAMES])
        images, labels = images[keep], labels[keep]
    predictions = zero_shot_predict(model, images, DATASETS[name].classnames)
    return float((predictions == labels).mean())


def evaluate_zero_shot(
    model: CLIP, datasets: Sequence[str] = EVALUATED, n_per_class: int = 50, seed: int = 0
) -> dict[str, float]:
    """``{dataset: accuracy}`` over ``datasets`` (default :data:`EVALUATED`), model put in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return {name: round(zero_shot_accuracy(model, name, n_per_class, seed), 4) for name in datasets}
    finally:
        model.train(was_training)
