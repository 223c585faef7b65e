"""Hand-written prompt templates for zero-shot CLIP (CoOp ``trainers/zsclip.py``, ``CUSTOM_TEMPLATES``).

Keys are the dataset registry names of :mod:`vlprompt.data`. Class names are inserted with underscores replaced
by spaces (:func:`format_prompt`), as the original code does.
"""

from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."

TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

# CoOp's IMAGENET_TEMPLATES_SELECT: the 7-template ensemble used by its ensemble zero-shot variant.
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def template_for(dataset: str | None) -> str:
    """The single hand-written template of ``dataset`` (``"a photo of a {}."`` for unknown/custom datasets)."""
    return TEMPLATES.get(dataset or "", DEFAULT_TEMPLATE)


def format_prompt(template: str, classname: str) -> str:
    """Insert a class name into a template, underscores replaced by spaces."""
    return template.format(classname.replace("_", " "))
