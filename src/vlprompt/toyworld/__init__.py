"""The toy world: a generated vision-language world and a tiny CLIP pretrained on it, shipped in the package.

It lets every protocol run end to end, with real learning, on a machine with no downloads: images of colored
shapes on textured backgrounds in five rendering domains, captions built from their attributes, datasets written
in the CoOp split format, and a small open_clip CLIP whose weights live in ``toyworld/weights``.
See ``docs/toyworld.md``.
"""

from vlprompt.lazy import lazy_exports

# Imported on first use (see vlprompt.lazy), so that importing the package does not import torch.
lazy_exports(__name__, {
    "generate_split": "materialize",
    "materialize": "materialize",
    "MODEL_CFG": "model",
    "build_toy_clip": "model",
    "get_tokenizer": "model",
    "images_to_tensor": "model",
    "load_toy_clip": "model",
    "generate": "render",
    "render": "render",
    "sample_attributes": "render",
    "DATASETS": "world",
    "DOMAINS": "world",
    "HELD_OUT": "world",
    "ToyDataset": "world",
    "get_dataset": "world",
    "evaluate_zero_shot": "zeroshot",
    "zero_shot_accuracy": "zeroshot",
})

__all__ = [
    "DATASETS",
    "DOMAINS",
    "HELD_OUT",
    "MODEL_CFG",
    "ToyDataset",
    "build_toy_clip",
    "evaluate_zero_shot",
    "generate",
    "generate_split",
    "get_dataset",
    "get_tokenizer",
    "images_to_tensor",
    "load_toy_clip",
    "materialize",
    "render",
    "sample_attributes",
    "zero_shot_accuracy",
]
