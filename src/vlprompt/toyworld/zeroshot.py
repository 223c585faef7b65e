"""Zero-shot accuracy of a CLIP on toy datasets generated in memory (the template is ``"a photo of a {}."``), and
the accuracy of a few-shot linear probe on the same frozen image features: what the features hold."""

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
    "toy_objects_dusk",
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


@torch.no_grad()
def image_features(model: CLIP, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features (N, D) of uint8 images (N, 64, 64, 3), float64 on the CPU."""
    device = next(model.parameters()).device
    chunks = [
        model.encode_image(images_to_tensor(images[start : start + batch_size]).to(device))
        for start in range(0, len(images), batch_size)
    ]
    return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).double().cpu()


PROBE_PENALTIES = (1e-6, 1e-5, 1e-4, 1e-3)  # L2 penalties tried; the one with the best validation accuracy is used


def fit_probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int, penalty: float) -> torch.nn.Linear:
    """Multinomial logistic regression on ``features`` (N, D): mean cross-entropy + ``penalty`` · ‖W‖², L-BFGS."""
    probe = torch.nn.Linear(features.shape[1], n_classes, dtype=torch.float64)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(features), labels) + penalty * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return probe


def linear_probe_accuracy(
    model: CLIP, dataset: str, shots: int = 16, n_val_per_class: int = 8, n_per_class: int = 50, seed: int = 0
) -> float:
    """Test accuracy of a linear probe on frozen image features, trained on ``shots`` generated train images per
    class, its L2 penalty chosen among :data:`PROBE_PENALTIES` on ``n_val_per_class`` validation images per class;
    tested on the test images :func:`zero_shot_accuracy` uses."""
    classes = len(DATASETS[dataset].classnames)
    splits = {
        split: generate_split(DATASETS[dataset], split, n, seed)
        for split, n in (("train", shots), ("val", n_val_per_class), ("test", n_per_class))
    }
    features = {split: image_features(model, images) for split, (images, _) in splits.items()}
    labels = {split: torch.from_numpy(labels) for split, (_, labels) in splits.items()}

    def accuracy(probe: torch.nn.Linear, split: str) -> float:
        with torch.no_grad():
            return float((probe(features[split]).argmax(dim=1) == labels[split]).double().mean())

    probes = [fit_probe(features["train"], labels["train"], classes, penalty) for penalty in PROBE_PENALTIES]
    best = max(probes, key=lambda probe: accuracy(probe, "val"))  # the first of the best on a tie
    return accuracy(best, "test")


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


# Datasets whose zero-shot → linear-probe gap is reported (``vlprompt toyworld zeroshot --probe``).
PROBED: tuple[str, ...] = (
    "toy_objects",
    "toy_objects_sketch",
    "toy_objects_pixel",
    "toy_objects_inverted",
    "toy_objects_painted",
    "toy_objects_dusk",
    "toy_textures",
    "toy_patterns",
    "toy_layouts",
    "toy_signs",
    "toy_color_textures_dusk",
)


def evaluate_probe_gaps(
    model: CLIP, datasets: Sequence[str] = PROBED, shots: int = 16, n_per_class: int = 50, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{dataset: {"zero_shot", "linear_probe", "gap"}}``: zero-shot and ``shots``-shot linear-probe accuracy on
    the same test images, and the probe's lead (accuracies in [0, 1])."""
    was_training = model.training
    model.eval()
    try:
        gaps = {}
        for name in datasets:
            zero_shot = zero_shot_accuracy(model, name, n_per_class, seed)
            probe = linear_probe_accuracy(model, name, shots, n_per_class=n_per_class, seed=seed)
            gaps[name] = {"zero_shot": round(zero_shot, 4), "linear_probe": round(probe, 4),
                          "gap": round(probe - zero_shot, 4)}
        return gaps
    finally:
        model.train(was_training)
