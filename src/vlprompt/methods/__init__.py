"""Prompt-learning methods: a small registry of factory functions over one general model.

``build_method(name, clip, classnames, template, **overrides)`` returns a :class:`~vlprompt.methods.base.PromptMethod`.
The prompt methods but CoCoOp are presets or subclasses (APLe, KgCoOp, PromptSRC) of
:class:`~vlprompt.methods.align.Align` (ALIGN, the general case); the overrides are
:class:`~vlprompt.methods.align.AlignConfig` fields (or a method's own options).
"""

from __future__ import annotations

from typing import Callable, Sequence

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import ConfigError
from vlprompt.methods import coop, ivlp, maple, plot, upt, vpt, zeroshot
from vlprompt.methods.align import Align, AlignConfig
from vlprompt.methods.base import PromptMethod, Stage
from vlprompt.methods.cocoop import CoCoOp
from vlprompt.methods.clip_adapter import ClipAdapter
from vlprompt.methods.linear_probe import LinearProbe
from vlprompt.methods.tip_adapter import build_tip_adapter, build_tip_adapter_f
from vlprompt.methods.kgcoop import build_kgcoop
from vlprompt.methods.promptsrc import build_promptsrc
from vlprompt.methods.presets import build_from_preset
from vlprompt.methods import clip_adapter, cocoop, kgcoop, linear_probe, tip_adapter  # their option defaults
from vlprompt.methods.aple import ApleOptions
from vlprompt.methods.options import check_options
from vlprompt.methods.promptsrc import PromptSRCOptions

# name -> (preset of AlignConfig values, one-line description); CoCoOp and APLe have their own classes.
ALIGN_PRESETS: dict[str, tuple[dict, str]] = {
    "zeroshot": (zeroshot.PRESET, "zero-shot CLIP with the dataset's hand-written template"),
    "coop": (coop.PRESET, "CoOp: learned text context (16 tokens, shallow)"),
    "vpt": (vpt.PRESET, "VPT deep (CLIP variant): free visual prompts at every layer, frozen text"),
    "vpt_shallow": (vpt.SHALLOW_PRESET, "VPT shallow: free visual prompts at the input layer only"),
    "ivlp": (ivlp.PRESET, "IVLP: independent deep text and visual prompts"),
    "ivlp_text": (ivlp.TEXT_ONLY_PRESET, "deep language prompting (IVLP text only)"),
    "maple": (maple.PRESET, "MaPLe: deep text prompts, visual prompts coupled by linear maps"),
    "plot": (plot.PRESET, "PLOT: N text prompts matched to patch tokens by optimal transport"),
    "upt": (upt.PRESET, "UPT: one shared prompt set generating text and visual prompts"),
    "align": ({}, "ALIGN: M visual x N text prompts, two-level (prompt + token) optimal transport"),
}


def _align_factory(name: str) -> Callable[..., PromptMethod]:
    def build(clip, classnames, template="a photo of a {}.", **overrides):
        return build_from_preset(name, ALIGN_PRESETS[name][0], clip, classnames, template, **overrides)

    return build


def _aple_factory(clip, classnames, template="a photo of a {}.", **overrides):
    from vlprompt.methods.aple import build_aple  # separate module: two-stage method with the image adapter

    return build_aple(clip, classnames, template, **overrides)


FACTORIES: dict[str, Callable[..., PromptMethod]] = {name: _align_factory(name) for name in ALIGN_PRESETS}
FACTORIES["cocoop"] = CoCoOp
DESCRIPTIONS = {name: description for name, (_, description) in ALIGN_PRESETS.items()}
DESCRIPTIONS["cocoop"] = "CoCoOp: CoOp context plus an image-conditioned meta-net bias"
FACTORIES["aple"] = _aple_factory
DESCRIPTIONS["aple"] = "APLe: two-stage text then visual prompts with an FFT/Gaussian image adapter"
FACTORIES["kgcoop"] = build_kgcoop
DESCRIPTIONS["kgcoop"] = "KgCoOp: CoOp kept near the hand-written prompt's class embeddings (weighted distance)"
FACTORIES["promptsrc"] = build_promptsrc
DESCRIPTIONS["promptsrc"] = ("PromptSRC: IVLP regulated towards frozen CLIP (L1 features, KL), prompts averaged "
                             "over epochs")

# Methods on frozen image features (cached once per run: vlprompt.engine.features).
FACTORIES["linear_probe"] = LinearProbe
DESCRIPTIONS["linear_probe"] = "Linear probe (CoOp's): logistic regression on frozen image features, C searched on val"
FACTORIES["clip_adapter"] = ClipAdapter
DESCRIPTIONS["clip_adapter"] = "CLIP-Adapter: residual bottleneck MLP on the frozen image feature"
FACTORIES["tip_adapter"] = build_tip_adapter
DESCRIPTIONS["tip_adapter"] = "Tip-Adapter: training-free cache model of the few-shot features, alpha/beta searched"
FACTORIES["tip_adapter_f"] = build_tip_adapter_f
DESCRIPTIONS["tip_adapter_f"] = "Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned"


# name -> the declarations of the options build_method accepts for it (dataclasses or mappings of defaults; see
# vlprompt.methods.options): every method's options are checked against their types before anything is built.
OPTIONS: dict[str, tuple] = {name: (AlignConfig,) for name in ALIGN_PRESETS}
OPTIONS["cocoop"] = (cocoop.DEFAULTS,)
OPTIONS["aple"] = (AlignConfig, ApleOptions)
OPTIONS["kgcoop"] = (AlignConfig, {"kg_weight": kgcoop.DEFAULT_KG_WEIGHT})
OPTIONS["promptsrc"] = (AlignConfig, PromptSRCOptions)
OPTIONS["linear_probe"] = (linear_probe.DEFAULTS,)
OPTIONS["clip_adapter"] = (clip_adapter.DEFAULTS,)
OPTIONS["tip_adapter"] = OPTIONS["tip_adapter_f"] = (tip_adapter.DEFAULTS,)


def available() -> list[str]:
    """Names accepted by :func:`build_method`."""
    return sorted(FACTORIES)


available_methods = available  # the name ``vlprompt.available_methods`` exports


def build_method(name: str, clip: PromptableCLIP, classnames: Sequence[str], template: str = "a photo of a {}.",
                 **overrides) -> PromptMethod:
    """Build method ``name`` for ``classnames``; ``overrides`` replace preset values (unknown keys are an error)."""
    if name not in FACTORIES:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available())}")
    if not classnames:
        raise ConfigError(f"{name}: the class list is empty")
    overrides = check_options(name, overrides, prefix=f"{name}: option ")
    return FACTORIES[name](clip, list(classnames), template, **overrides)


__all__ = ["Align", "AlignConfig", "CoCoOp", "PromptMethod", "Stage", "available", "build_method"]
