"""Each method's options with their defaults, as its builder resolves them (``vlprompt methods`` prints them).

These are the builder's defaults: a protocol's preset (``vlprompt/engine/presets``) may change some of them for a run, and
``--set method.options.KEY=VALUE`` (or ``build_method(..., KEY=VALUE)``) changes any of them. Prompt depths are the
original code's; on a backbone with fewer layers they are clamped to its depth when the method is built.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


class _Unclamped:
    """Stands in for a backbone deep enough that no preset depth is clamped."""

    text_layers = vision_layers = 10**6


def _prompt_options(name: str, preset: dict) -> dict[str, Any]:
    """The :class:`~vlprompt.methods.align.AlignConfig` values of ``preset``, resolved as the builders do."""
    from vlprompt.methods.presets import preset_config

    return preset_config(name, preset, _Unclamped()).as_dict()


def default_options(name: str) -> dict[str, Any]:
    """``{option: default}`` of method ``name`` (see :func:`vlprompt.methods.available`)."""
    from vlprompt import methods
    from vlprompt.errors import ConfigError

    if name in methods.ALIGN_PRESETS:
        return _prompt_options(name, methods.ALIGN_PRESETS[name][0])
    if name == "aple":
        from vlprompt.methods.aple import PROMPT_PRESET, ApleOptions

        return {**_prompt_options(name, PROMPT_PRESET), **asdict(ApleOptions())}
    if name == "kgcoop":
        from vlprompt.methods.kgcoop import DEFAULT_KG_WEIGHT, PRESET

        return {**_prompt_options(name, PRESET), "kg_weight": DEFAULT_KG_WEIGHT}
    if name == "promptsrc":
        from vlprompt.methods.promptsrc import PRESET, PromptSRCOptions

        return {**_prompt_options(name, PRESET), **asdict(PromptSRCOptions())}
    if name not in methods.FACTORIES:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(methods.available())}")
    # The other builders take their options from a DEFAULTS table in their module (CoCoOp, the feature methods).
    module = __import__(methods.FACTORIES[name].__module__, fromlist=["DEFAULTS"])
    return dict(module.DEFAULTS)
