"""Building a method from a preset of :class:`~vlprompt.methods.align.AlignConfig` values plus user overrides.

Preset depths are the original code's (9 or 12 blocks); on a smaller backbone they are clamped to its number of
layers, so that every preset also runs on tiny test models. A depth given explicitly is never clamped.
"""

from __future__ import annotations

from typing import Sequence

from vlprompt.backbone import PromptableCLIP
from vlprompt.methods.align import Align, AlignConfig


def preset_config(name: str, preset: dict, clip: PromptableCLIP, **overrides) -> AlignConfig:
    """The validated config of a preset with ``overrides`` applied (depths clamped to the backbone)."""
    options = {**AlignConfig().as_dict(), **preset}
    for key, layers in (("text_depth", clip.text_layers), ("visual_depth", clip.vision_layers or 1)):
        if key in options and key not in overrides:
            options[key] = min(options[key], layers)
    if "visual_depth" not in overrides and options.get("coupling", "linear") == "linear":
        options["visual_depth"] = options.get("text_depth", 1)  # coupled prompts share the text depth
    options.update(overrides)
    return AlignConfig.from_options(name, **options)


def build_from_preset(name: str, preset: dict, clip: PromptableCLIP, classnames: Sequence[str],
                      template: str = "a photo of a {}.", **overrides) -> Align:
    config = preset_config(name, preset, clip, **overrides)
    return Align(clip, classnames, template, config=config, name=name)
