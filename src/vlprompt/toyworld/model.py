"""The tiny toy-world CLIP: its architecture (as data), image preprocessing, and the loader of the shipped weights.

The architecture is a plain :class:`open_clip.model.CLIP` built from :data:`MODEL_CFG`, so everything that works
on an open_clip model works on it. The shipped weights (``weights/toyclip.safetensors``) are an open_clip state
dict stored in float16 to keep the file small; :func:`load_toy_clip` upcasts them to float32.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP

from vlprompt.errors import CheckpointError
from vlprompt.toyworld.world import IMAGE_SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "toyclip.safetensors"
CONFIG_FILE = "toyclip.json"

# The exact keyword arguments of ``open_clip.model.CLIP``. The text tower is narrow because its 49408-word token
# embedding dominates the file size; the toy captions use a few dozen of those words.
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "width": 128,
        "layers": 3,
        "head_width": 32,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 4,
        "layers": 3,
        "mlp_ratio": 4.0,
    },
    "quick_gelu": False,
}
TOKENIZER = "ViT-B-16"  # ``open_clip.get_tokenizer(TOKENIZER)``: the BPE vocabulary bundled with open_clip
IMAGE_MEAN: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_MEAN)
IMAGE_STD: tuple[float, float, float] = tuple(open_clip.OPENAI_DATASET_STD)


def build_toy_clip(model_cfg: dict[str, Any] | None = None) -> CLIP:
    """A randomly initialised open_clip CLIP with the toy architecture (``model_cfg`` defaults to MODEL_CFG)."""
    return CLIP(**(model_cfg or MODEL_CFG))


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The tokenizer of the toy CLIP: open_clip's bundled BPE (vocabulary 49408, context length 77).

    Cached: building it reads the BPE merges file, about a second.
    """
    return open_clip.get_tokenizer(TOKENIZER)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Normalise uint8 images (N, H, W, 3) into the model's input (N, 3, H, W) float32 (CLIP mean/std)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_toy_clip(weights_dir: str | Path | None = None) -> tuple[CLIP, dict[str, Any]]:
    """Load the shipped toy CLIP.

    Args:
        weights_dir: folder holding ``toyclip.safetensors`` and ``toyclip.json``; defaults to the copy inside the
            package.

    Returns:
        The open_clip CLIP in eval mode with float32 weights, and the JSON dict (``model_cfg``, ``image_size``,
        ``image_mean``, ``image_std``, ``tokenizer``, ``command``, ``seed``, ``zero_shot``, ...).
    """
    from safetensors.torch import load_file

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    missing = [str(p) for p in (weights, config_path) if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"toy CLIP files missing: {', '.join(missing)}; reinstall vlprompt, or recreate them with "
            f"`vlprompt toyworld pretrain --output-dir {folder}`"
        )
    config = json.loads(config_path.read_text())
    model = build_toy_clip(config["model_cfg"])
    try:
        state = {name: tensor.float() for name, tensor in load_file(str(weights)).items()}
        model.load_state_dict(state)
    except Exception as error:  # a truncated file or a state dict of another architecture
        raise CheckpointError(f"cannot load toy CLIP weights {weights}: {error}") from error
    return model.eval(), config
