"""Reading CLIP weights: :func:`load_clip` and everything it needs to find and read them.

A backbone is an architecture name (an open_clip config, one of the tiny random test configs, or ``toy``: the small
CLIP bundled with :mod:`vlprompt.toyworld`) plus weights: an open_clip pretrained tag (downloaded once through
open_clip's cache), a local file (safetensors, a plain ``torch.save`` state dict, or an OpenAI/TorchScript archive,
all read without running pickled code: :mod:`vlprompt.weights.unpickler`), or ``none`` for random weights.
:func:`load_clip` wraps the loaded, frozen model in a :class:`~vlprompt.backbone.PromptableCLIP`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from typing import Iterator, Mapping

import open_clip
import torch
from torch import nn

from vlprompt.backbone import PromptableCLIP
from vlprompt.errors import CheckpointError, ConfigError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Tiny random architectures for tests and examples: real open_clip CLIP modules, real BPE tokenizer.
TINY_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=48, layers=3, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3),
    ),
    # CLIP's modified ResNet (stem, 4 stages, attention pool) at 64 px: a 2 x 2 grid of local features.
    "tiny-rn": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=64, layers=(1, 1, 1, 1), width=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3),
    ),
    "tiny-quickgelu": dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=48, layers=3, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3),
        quick_gelu=True,
    ),
}



def available_backbones() -> list[str]:
    """Architecture names :func:`load_clip` accepts: every open_clip config plus the tiny test configs."""
    return sorted(TINY_CONFIGS) + ["toy"] + open_clip.list_models()


def weights_argument(pretrained: str | os.PathLike | None) -> str | os.PathLike | None:
    """``pretrained`` as :func:`load_clip` reads it: ``None`` and ``"none"`` (any case) both mean random weights."""
    return None if pretrained is None or str(pretrained).lower() == "none" else pretrained


def check_backbone(model_name: str, pretrained: str | os.PathLike | None = None) -> None:
    """Raise :class:`ConfigError` for an unknown architecture or an open_clip tag that the architecture does not
    have (the message lists its tags). Local files are checked when they are read; the tiny and toy backbones
    ignore tags (they need no download)."""
    pretrained = weights_argument(pretrained)
    if model_name in TINY_CONFIGS or model_name == "toy":
        return
    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown backbone {model_name!r}; choose an open_clip model (open_clip.list_models()), "
                          f"one of {sorted(TINY_CONFIGS)} or 'toy' (the bundled toy-world CLIP)")
    if pretrained is None or _looks_like_path(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not open_clip.get_pretrained_cfg(model_name, str(pretrained)):
        known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained weights for it"
        raise ConfigError(f"unknown --pretrained tag {str(pretrained)!r} for {model_name}; {known}; or give a local "
                          f"weights file, or 'none' for random weights")


def load_clip(
    model_name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> PromptableCLIP:
    """Build a frozen :class:`PromptableCLIP`.

    Building never changes the caller's random state (models are initialised under a forked generator), so that
    the order in which a run loads its data and its backbone does not change its results.

    Args:
        model_name: an open_clip architecture (``"ViT-B-16"``; use the ``-quickgelu`` variants with OpenAI
            weights), a tiny test config (``"tiny"``), or ``"toy"`` (the small CLIP pretrained on the bundled toy
            world, shipped inside the package; ``pretrained`` = the folder ``vlprompt toyworld pretrain`` wrote
            loads one's own toy weights).
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``; downloaded through open_clip
            when a network exists), a path to a local weights file (OpenAI TorchScript/state-dict archive, open_clip
            state dict, ``.safetensors``), or ``None`` / ``"none"`` for random weights.
        device: where to put the model.
        precision: weight precision ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        cache_dir: open_clip's download cache.

    Raises:
        ConfigError: unknown architecture, precision or tag.
        CheckpointError: a weights file that is missing, unsafe or does not fit; weights that cannot be downloaded.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    pretrained = weights_argument(pretrained)
    check_backbone(model_name, pretrained)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    with torch.random.fork_rng(devices=[]):
        if model_name == "toy":
            from vlprompt.toyworld import load_toy_clip

            folder = toy_weights_folder(pretrained)  # None: the shipped weights
            model, _ = load_toy_clip(folder)
            label = "toy" if folder is None else f"toy/{os.path.basename(os.path.abspath(folder))}"
            pretrained = None  # read with the architecture recorded beside the weights, not as a state dict
        elif model_name in TINY_CONFIGS:
            torch.manual_seed(0)  # tiny models are reproducible architectures, not seed-dependent ones
            model = open_clip.CLIP(**TINY_CONFIGS[model_name])
            label = model_name
        else:
            try:
                tokenizer = open_clip.get_tokenizer(model_name)
            except ModuleNotFoundError as error:  # Hugging Face tokenizers (SigLIP, XLM-R, ...) need transformers
                raise ConfigError(f"{model_name}: its tokenizer needs the '{error.name}' package: pip install "
                                  f"{error.name}") from error
            is_tag = pretrained is not None and not _looks_like_path(pretrained)
            if is_tag:
                download_weights(model_name, str(pretrained), cache_dir)
            model = open_clip.create_model(
                model_name, pretrained=str(pretrained) if is_tag else None, cache_dir=cache_dir, load_weights=True
            )
            label = f"{model_name}/{pretrained}" if is_tag else model_name
    if pretrained is not None and _looks_like_path(pretrained):
        state_dict = load_state_dict_file(pretrained)
        _load_into(model, state_dict, pretrained)
        label = f"{model_name}/{os.path.basename(str(pretrained))}"
    model = model.to(device=device, dtype=PRECISIONS[precision])
    return PromptableCLIP(model, tokenizer, name=label)


def download_weights(model_name: str, tag: str, cache_dir: str | None = None) -> str:
    """The local file of open_clip's weights ``tag`` for ``model_name``, downloaded into the cache unless there.

    Done before open_clip builds the model so that a failure is one :class:`CheckpointError` naming the tag and
    the ways out, not a minute of Hugging Face hub retry warnings and a chained traceback: when the weights are
    not cached and the hub does not answer, it fails at once.
    """
    from open_clip.pretrained import download_pretrained

    config = open_clip.get_pretrained_cfg(model_name, tag)
    try:
        with _hub_warnings_silenced():
            if not _weights_cached(config, cache_dir):
                _check_hub_reachable(config)
            return download_pretrained(config, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - every way a download fails gets the same advice
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"cannot download the weights {model_name}/{tag} ({reason[:200]}). Ways out: --pretrained PATH with a "
            f"local weights file, --backbone toy for the bundled toy-world CLIP (no download), or HF_HUB_OFFLINE=1 "
            f"to use weights already in the Hugging Face cache") from None


def _hub_file(config: Mapping) -> tuple[str, list[str]] | None:
    """``(repository, candidate file names)`` of a pretrained config on the Hugging Face hub (open_clip prefers a
    ``.safetensors`` twin of the file), or None for a plain URL."""
    if not config.get("hf_hub"):
        return None
    repository, filename = os.path.split(config["hf_hub"])
    filename = filename or "open_clip_pytorch_model.bin"
    return repository, ["open_clip_model.safetensors", filename] if filename.endswith(".bin") else [filename]


def _weights_cached(config: Mapping, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hub = _hub_file(config)
    if hub is None:
        return True  # a plain URL download fails fast on its own
    repository, names = hub
    return any(isinstance(try_to_load_from_cache(repository, name, cache_dir=cache_dir), str) for name in names)


def _check_hub_reachable(config: Mapping, timeout: float = 10.0) -> None:
    """For weights that are not cached: raise OSError when the hub cannot be asked (offline mode) or does not
    answer (one request instead of the hub client's retries)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if _hub_file(config) is None:
        return
    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set and they are not in the Hugging Face cache")
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except OSError as error:
        raise OSError(f"the Hugging Face hub at {constants.ENDPOINT} is not reachable: "
                      f"{getattr(error, 'reason', error)}") from None


@contextlib.contextmanager
def _hub_warnings_silenced() -> Iterator[None]:
    """Keep the hub client's retry warnings off the console while downloading (its failure is reported once)."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def toy_weights_folder(pretrained: str | os.PathLike | None) -> str | None:
    """The folder of a user's toy CLIP given as ``pretrained`` (the ``--output-dir`` of ``vlprompt toyworld
    pretrain``, or its ``toyclip.safetensors``), or None for the weights shipped in the package (no path given)."""
    if pretrained is None or not _looks_like_path(pretrained):
        return None
    path = os.path.expanduser(os.fspath(pretrained))
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def _looks_like_path(pretrained: str | os.PathLike) -> bool:
    text = str(pretrained)
    return isinstance(pretrained, os.PathLike) or os.sep in text or os.path.exists(text) or text.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".tar")
    )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code from it.

    Accepts ``.safetensors``, a ``torch.save`` state dict (optionally nested under ``"state_dict"``; loaded with
    ``weights_only=True``) and TorchScript archives such as OpenAI's released CLIP ``.pt`` files (their tensors
    and module attributes are read from the archive as data; its code is never compiled or run, see
    :func:`vlprompt.weights.unpickler.load_torchscript_weights`). A file that holds pickled code is refused with
    every pickled name listed.
    """
    from vlprompt.weights.unpickler import (
        is_torchscript_archive,
        load_torchscript_weights,
        pickled_code_refusal,
        pickled_names,
    )

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path} (expected a .safetensors, .pt or OpenAI .pt archive)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a valid safetensors file ({error})") from error
    if is_torchscript_archive(path):
        return load_torchscript_weights(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise pickled_code_refusal(path, pickled_names(path) or ["unsupported objects"],
                                   "Convert it to .safetensors with a trusted tool") from None
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read weights ({error})") from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors (a state dict)")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def _load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    # OpenAI archives carry three extra scalars that open_clip does not keep; TorchScript archives also store the
    # model's non-persistent buffers (open_clip's causal ``attn_mask``), which the model builds itself.
    ignored = {"input_resolution", "context_length", "vocab_size"}
    ignored.update(name for name, _ in model.named_buffers() if name not in expected)
    unexpected = [key for key in unexpected if key not in ignored]
    mismatched = [
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if mismatched:
            details.append(f"shape mismatch {mismatched[:3]}")
        raise CheckpointError(f"{path}: weights do not fit this architecture: " + "; ".join(details))
    model.load_state_dict({key: state_dict[key] for key in expected}, strict=True)


__all__ = [
    "PRECISIONS",
    "TINY_CONFIGS",
    "available_backbones",
    "check_backbone",
    "load_clip",
    "load_state_dict_file",
    "toy_weights_folder",
    "weights_argument",
]
