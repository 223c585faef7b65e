"""The toy world: a generated vision-language world and a tiny CLIP pretrained on it, shipped in the package.

It lets every protocol run end to end, with real learning, on a machine with no downloads: images of colored
shapes on textured backgrounds in five rendering domains, captions built from their attributes, datasets written
in the CoOp split format, and a small open_clip CLIP whose weights live in ``toyworld/weights``.
See ``docs/toyworld.md``.
"""

from vlprompt.toyworld.materialize import generate_split, materialize
from vlprompt.toyworld.model import MODEL_CFG, build_toy_clip, get_tokenizer, images_to_tensor, load_toy_clip
from vlprompt.toyworld.render import generate, render, sample_attributes
from vlprompt.toyworld.world import DATASETS, DOMAINS, HELD_OUT, ToyDataset, get_dataset
from vlprompt.toyworld.zeroshot import evaluate_zero_shot, zero_shot_accuracy

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
