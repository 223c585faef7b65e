"""Parameter layouts of the original code bases, and how each maps onto our methods.

Every source is data: a list of :class:`Rule` (one tensor family each, original name ↔ our name) and a function
that reads our method's options (n_ctx, N, depth, …) off the tensor shapes. Facts from the original trainers
(docs/methods.md, 'Conventions'; docs/compat.md has the tables):

* CoOp, CoCoOp and PLOT register only the prompt learner with Dassl, so their names are bare (``ctx``).
* MaPLe, ALIGN (trainer ``MMP``), IVLP, PromptSRC and the MaPLe repo's VPT register the whole ``CustomCLIP``:
  names carry ``prompt_learner.`` and the file also holds the frozen CLIP weights (``image_encoder.*``,
  ``text_encoder.*``, ``logit_scale``; PromptSRC also ``prompt_learner.ZS_image_encoder.*``). IVLP-style deep
  prompts live inside the encoders as ``…resblocks.{i}.VPT_shallow`` (blocks ``i ≥ 1``).
* ``token_prefix`` / ``token_suffix`` are word embeddings of the training class names; we rebuild them from the
  class names given at import.
* Single-prompt originals store ``(n_ctx, W)`` where our modules keep a leading prompt axis ``(1, n_ctx, W)``
  (``prompt_axis``); CoOp's class-specific context ``(K, n_ctx, W)`` becomes ``(1, K, n_ctx, W)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from vlprompt.errors import CheckpointError, ConfigError

WORD_INIT = "a photo of a"  # CTX_INIT of every shipped config of these code bases


@dataclass(frozen=True)
class Rule:
    """One tensor family. ``{i}`` in a name is a block index; our index = original index + ``shift``.

    Attributes:
        original: name in the original state dict, e.g. ``"prompt_learner.compound_prompts_text.{i}"``.
        ours: name in :meth:`PromptMethod.prompt_state_dict`, e.g. ``"text.deep.{i}"``.
        shift: index offset (IVLP numbers deep prompts by transformer block, starting at 1; we from 0).
        prompt_axis: the original tensor lacks our leading axis of size 1 (one prompt / one visual set).
    """

    original: str
    ours: str
    shift: int = 0
    prompt_axis: bool = False

    def _match(self, template: str, name: str) -> int | None:
        pattern = re.escape(template).replace(re.escape("{i}"), r"(\d+)")
        match = re.fullmatch(pattern, name)
        if match is None:
            return None
        return int(match.group(1)) if match.groups() else -1

    def to_ours(self, name: str) -> str | None:
        index = self._match(self.original, name)
        if index is None or (index >= 0 and index + self.shift < 0):
            return None
        return self.ours.format(i=index + self.shift) if index >= 0 else self.ours

    def to_original(self, name: str) -> str | None:
        index = self._match(self.ours, name)
        if index is None:
            return None
        return self.original.format(i=index - self.shift) if index >= 0 else self.original


@dataclass(frozen=True)
class Layout:
    """The parameter layout of one original trainer and the method of ours it maps to.

    Attributes:
        source: name accepted by :func:`vlprompt.compat.import_original`.
        trainer: the original trainer class (``"MaPLe"``, ``"MMP"``).
        origin: the repository file that defines it.
        rules: the tensor families.
        infer: ``tensors in our names -> (our method name, options)``.
    """

    source: str
    trainer: str
    origin: str
    rules: tuple[Rule, ...]
    infer: Callable[[Mapping[str, torch.Tensor]], tuple[str, dict]]

    # ------------------------------------------------------------------ names
    def our_name(self, original: str) -> tuple[Rule, str] | None:
        for rule in self.rules:
            ours = rule.to_ours(original)
            if ours is not None:
                return rule, ours
        return None

    def original_name(self, ours: str) -> tuple[Rule, str] | None:
        for rule in self.rules:
            original = rule.to_original(ours)
            if original is not None:
                return rule, original
        return None

    def describe_original(self, ours: str) -> str:
        found = self.original_name(ours)
        return found[1] if found else ours

    def expected_names(self) -> str:
        return ", ".join(rule.original for rule in self.rules)

    # ------------------------------------------------------------------ tensors
    def to_ours(self, state: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Original state dict → ``(tensors in our names and layout, ignored original names)``."""
        tensors: dict[str, torch.Tensor] = {}
        ignored: list[str] = []
        unknown: list[str] = []
        for raw_name, value in state.items():
            name = str(raw_name).removeprefix("module.")
            found = None
            for candidate in (name, f"prompt_learner.{name}", name.removeprefix("prompt_learner.")):
                found = self.our_name(candidate)
                if found:
                    break
            if found is None:
                (ignored if is_ignored(name) else unknown).append(name)
                continue
            rule, ours = found
            if ours in tensors:
                raise CheckpointError(f"{self.source} checkpoint: {name!r} and another entry both hold "
                                      f"{self.describe_original(ours)!r}")
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{self.source} checkpoint: {name!r} is not a tensor ({value!r})")
            tensors[ours] = value.detach().clone().unsqueeze(0) if rule.prompt_axis else value.detach().clone()
        if unknown:
            raise CheckpointError(
                f"{self.source} checkpoint: unknown tensor name(s) {unknown[:5]}"
                f"{' …' if len(unknown) > 5 else ''}; a {self.trainer} checkpoint holds {self.expected_names()} "
                f"(plus token_prefix/token_suffix and frozen CLIP weights, which are ignored)")
        return tensors, sorted(ignored)

    def to_original(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our prompt state dict → the original names and layout (tensors only)."""
        found = {ours: self.original_name(ours) for ours in tensors}
        unmapped = [ours for ours, match in found.items() if match is None]
        if unmapped:
            raise CheckpointError(f"parameter(s) {unmapped} have no counterpart in the original {self.trainer} "
                                  f"layout ({self.expected_names()}); export this method as another source")
        state: dict[str, torch.Tensor] = {}
        for ours, tensor in tensors.items():
            rule, original = found[ours]
            if rule.prompt_axis:
                if tensor.shape[0] != 1:
                    raise CheckpointError(f"{ours} holds {tensor.shape[0]} prompts {tuple(tensor.shape)}, but "
                                          f"{self.trainer}'s {original} holds exactly one")
                tensor = tensor[0]
            state[original] = tensor.detach().cpu().clone()
        return state

    def original_shape(self, ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        found = self.original_name(ours)
        return shape[1:] if found and found[0].prompt_axis and shape and shape[0] == 1 else shape


def is_ignored(name: str) -> bool:
    """Class-specific buffers and frozen CLIP weights: rebuilt or already in our backbone, never imported.

    A name containing ``VPT`` is never ignored: the original trainers train every such parameter.
    """
    if name.rsplit(".", 1)[-1] in ("token_prefix", "token_suffix"):
        return True
    if "VPT" in name:
        return False
    frozen = ("image_encoder.", "text_encoder.", "prompt_learner.ZS_image_encoder.")
    return name == "logit_scale" or name.startswith(frozen)


# ---------------------------------------------------------------------------------------------- inference
def _count(tensors: Mapping[str, torch.Tensor], family: str) -> int:
    """Number of indexed entries ``family.{i}[...]`` (max index + 1; gaps are reported as missing later)."""
    pattern = re.compile(re.escape(family) + r"\.(\d+)(\..*)?")
    indices = [int(m.group(1)) for name in tensors if (m := pattern.fullmatch(name))]
    return max(indices) + 1 if indices else 0


def _require(tensors: Mapping[str, torch.Tensor], ours: str, source: str, original: str, dims: tuple[int, ...],
             shape: str, axis: bool = True) -> torch.Tensor:
    """``tensors[ours]`` with ``dims`` dimensions in our layout (``axis``: we added a leading prompt axis);
    errors name the original tensor, its shape and the original layout ``shape``."""
    if ours not in tensors:
        raise CheckpointError(f"{source} checkpoint: missing tensor {original!r}")
    tensor = tensors[ours]
    if tensor.dim() not in dims:
        given = tuple(tensor.shape[1:] if axis else tensor.shape)
        raise CheckpointError(f"{source} checkpoint: {original!r} has shape {given}; the original layout is {shape}")
    return tensor


def _word_init(n_ctx: int) -> str | None:
    """The original prompt learners use CTX_INIT only when n_ctx <= 4 (its extra words stay fixed)."""
    return WORD_INIT if n_ctx <= 4 else None


def _infer_coop(tensors):
    ctx = _require(tensors, "text.ctx", "coop", "ctx", (3, 4), "(n_ctx, W) or class-specific (K, n_ctx, W)")
    # All context rows are replaced, so the init words do not matter: "X X … <name>." tokenizes alike.
    return "coop", dict(text_n_ctx=ctx.shape[-2], csc=ctx.dim() == 4, text_ctx_init=None)


def _infer_cocoop(tensors):
    ctx = _require(tensors, "text.ctx", "cocoop", "ctx", (3,), "(n_ctx, W)")
    return "cocoop", dict(text_n_ctx=ctx.shape[1], text_ctx_init=None)


def _infer_plot(tensors):
    ctx = _require(tensors, "text.ctx", "plot", "ctx", (3,), "(N, n_ctx, W)", axis=False)
    return "plot", dict(n_text_prompts=ctx.shape[0], text_n_ctx=ctx.shape[1], text_ctx_init=None)


def _coupled(source: str, method: str):
    def infer(tensors):
        ctx = _require(tensors, "text.ctx", source, "prompt_learner.ctx", (3,),
                       "(N, n_ctx, W)" if method == "align" else "(n_ctx, W)", axis=method != "align")
        prompts, n_ctx = ctx.shape[0], ctx.shape[1]
        depth = 1 + max(_count(tensors, "text.deep"), _count(tensors, "coupling.deep_proj"))
        options = dict(text_n_ctx=n_ctx, visual_n_ctx=n_ctx, text_depth=depth, visual_depth=depth,
                       text_ctx_init=_word_init(n_ctx))
        if method == "align":
            options.update(n_text_prompts=prompts, n_visual_prompts=prompts)
        return method, options

    return infer


def _visual_options(tensors, source: str) -> dict:
    visual = _require(tensors, "visual.prompts", source, "image_encoder.VPT", (3,), "(n_ctx, W_vis)")
    return dict(visual_n_ctx=visual.shape[1], visual_depth=1 + _count(tensors, "visual.deep"))


def _independent(source: str, method: str):
    def infer(tensors):
        ctx = _require(tensors, "text.ctx", source, "prompt_learner.ctx", (3,), "(n_ctx, W)")
        options = dict(text_n_ctx=ctx.shape[1], text_depth=1 + _count(tensors, "text.deep"),
                       text_ctx_init=_word_init(ctx.shape[1]))
        if "visual.prompts" not in tensors and _count(tensors, "visual.deep") == 0:
            return "ivlp_text", options  # PROMPT_DEPTH_VISION 0: deep language prompting only
        return method, {**options, **_visual_options(tensors, source)}

    return infer


def _infer_vpt(tensors):
    return "vpt", _visual_options(tensors, "vpt")


# ---------------------------------------------------------------------------------------------- layouts
_CTX_SINGLE = Rule("ctx", "text.ctx", prompt_axis=True)


def _coupled_rules(prompt_axis: bool) -> tuple[Rule, ...]:
    return (
        Rule("prompt_learner.ctx", "text.ctx", prompt_axis=prompt_axis),
        Rule("prompt_learner.compound_prompts_text.{i}", "text.deep.{i}", prompt_axis=prompt_axis),
        Rule("prompt_learner.proj.weight", "coupling.proj.weight"),
        Rule("prompt_learner.proj.bias", "coupling.proj.bias"),
        Rule("prompt_learner.compound_prompt_projections.{i}.weight", "coupling.deep_proj.{i}.weight"),
        Rule("prompt_learner.compound_prompt_projections.{i}.bias", "coupling.deep_proj.{i}.bias"),
    )


_VISUAL_RULES = (
    Rule("image_encoder.VPT", "visual.prompts", prompt_axis=True),
    Rule("image_encoder.transformer.resblocks.{i}.VPT_shallow", "visual.deep.{i}", shift=-1, prompt_axis=True),
)
_INDEPENDENT_RULES = (
    Rule("prompt_learner.ctx", "text.ctx", prompt_axis=True),
    Rule("text_encoder.transformer.resblocks.{i}.VPT_shallow", "text.deep.{i}", shift=-1, prompt_axis=True),
) + _VISUAL_RULES

_MPL = "muzairkhattak/multimodal-prompt-learning"
LAYOUTS: dict[str, Layout] = {
    "coop": Layout("coop", "CoOp", "KaiyangZhou/CoOp trainers/coop.py", (_CTX_SINGLE,), _infer_coop),
    "cocoop": Layout("cocoop", "CoCoOp", "KaiyangZhou/CoOp trainers/cocoop.py", (
        _CTX_SINGLE,
        Rule("meta_net.linear1.weight", "meta_net.net.0.weight"),
        Rule("meta_net.linear1.bias", "meta_net.net.0.bias"),
        Rule("meta_net.linear2.weight", "meta_net.net.2.weight"),
        Rule("meta_net.linear2.bias", "meta_net.net.2.bias"),
    ), _infer_cocoop),
    "plot": Layout("plot", "PLOT", "CHENGY12/PLOT plot-coop/trainers/plot.py", (Rule("ctx", "text.ctx"),),
                   _infer_plot),
    "maple": Layout("maple", "MaPLe", f"{_MPL} trainers/maple.py", _coupled_rules(True), _coupled("maple", "maple")),
    "align": Layout("align", "MMP", "wds2014/ALIGN trainers/mmp.py", _coupled_rules(False),
                    _coupled("align", "align")),
    "ivlp": Layout("ivlp", "IVLP", f"{_MPL} trainers/independentVL.py", _INDEPENDENT_RULES, _independent("ivlp", "ivlp")),
    "promptsrc": Layout("promptsrc", "PromptSRC", "muzairkhattak/PromptSRC trainers/promptsrc.py",
                        _INDEPENDENT_RULES, _independent("promptsrc", "promptsrc")),
    "vpt": Layout("vpt", "VPT", f"{_MPL} trainers/vpt.py", _VISUAL_RULES, _infer_vpt),
}
SOURCES = tuple(LAYOUTS)


def layout_for(source: str) -> Layout:
    if source not in LAYOUTS:
        raise ConfigError(f"unknown checkpoint source {source!r}; choose one of {', '.join(SOURCES)} "
                          f"('align' is the original trainer MMP)")
    return LAYOUTS[source]
