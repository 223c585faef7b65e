"""Use trained prompts: load a run folder or an exported prompts file and classify images with any class names.

Typical use::

    import vlprompt

    model = vlprompt.load("runs/few_shot/dtd/align/shots_16/seed_1")   # or an exported prompts.safetensors
    result = model.predict(["cat.jpg", "dog.png"], ["cat", "dog", "bird"])
    result.labels          # ['cat', 'dog']
    result.probs           # (2, 3) softmax over the three classes
    folder = model.classify_folder("holiday_photos/", ["beach", "mountain", "city"])

A :class:`Predictor` rebuilds the method named in the prompts header with its stored options on the backbone
named there, loads the learned tensors, and pre-processes images exactly as the engine's evaluation does (test
transform from the backbone's image size, mean and std), so its logits are those of ``vlprompt eval``. The class
side (text features, token sets) is computed once per class list and cached.

A prompts file (``prompts.safetensors``, written by training, ``vlprompt export`` and ``vlprompt import``) holds
the learned tensors only, plus a JSON header; docs/usage.md documents the format.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from vlprompt.errors import CheckpointError, ConfigError, DataError

PROMPTS_FORMAT = "vlprompt.prompts/1"
DEFAULT_TEMPLATE = "a photo of a {}."
# Class sides kept per predictor (a class side of 1000 ImageNet classes with N prompts is a few hundred MB for
# ALIGN's token sets, so only a few are kept).
CLASS_CACHE_SIZE = 4


class RunNotFoundError(CheckpointError, FileNotFoundError):
    """The run folder or prompts file does not exist, or holds no trained prompts yet."""


class UnreadableImageError(DataError):
    """An image file is missing or cannot be decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


class EmptyClassListError(ConfigError):
    """The class list to predict over is empty."""


ImageInput = Any  # a path, a PIL image, a float tensor (3, H, W) already pre-processed, or a uint8 image array


@dataclass
class Prediction:
    """Predictions for B images over K class names.

    Attributes:
        classnames: the K class names, in the order of the columns below.
        labels: the top-1 class name of each image, ``B`` strings.
        indices: ``(B,)`` int64 index of the top-1 class.
        probs: ``(B, K)`` float32 softmax of the logits.
        logits: ``(B, K)`` float32 logits (the method's, with the backbone's logit scale).
        sources: for each row, the image path it came from (None for in-memory images).
        skipped: paths of unreadable images that were left out (only with ``skip_unreadable=True``).
    """

    classnames: list[str]
    labels: list[str]
    indices: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    sources: list[str | None] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def top_k(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each image, the ``k`` most probable ``(class name, probability)`` pairs, best first."""
        k = max(1, min(k, len(self.classnames)))
        values, indices = self.probs.topk(k, dim=-1)
        return [[(self.classnames[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())]
                for row_p, row_i in zip(values, indices)]


# --------------------------------------------------------------------------------------------- prompts files


def read_prompts(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, header)`` of a run folder (its ``prompts.safetensors``) or of a prompts file.

    For a run folder the header gets the folder's ``config.json`` as ``"config"`` when it lacks one. Raises
    :class:`RunNotFoundError` when there is nothing to load.
    """
    from vlprompt.engine.checkpoint import load_prompts
    from vlprompt.engine.runs import RunFolder

    path = os.fspath(source)
    if os.path.isdir(path):
        folder = RunFolder(path)
        if not os.path.isfile(folder.config_file):
            raise RunNotFoundError(f"{path} is not a vlprompt run folder (no config.json)")
        if not os.path.isfile(folder.prompts_file):
            raise RunNotFoundError(f"{path} has no trained prompts yet (no prompts.safetensors); finish the run "
                                   f"with `vlprompt train` first")
        tensors, header = load_prompts(folder.prompts_file)
        header.setdefault("config", folder.config().to_dict())
    elif os.path.isfile(path):
        tensors, header = load_prompts(path)
    else:
        raise RunNotFoundError(f"run folder or prompts file not found: {path}")
    check_header(header, path)
    return tensors, header


# Header entries and their JSON types (docs/usage.md, "Prompts files"); "method" is required.
HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "method": str, "options": dict, "backbone": str, "classnames": list, "template": str, "stages": list,
    "config": dict, "training": dict,
}


def check_header(header: Any, path: str) -> None:
    """Raise :class:`CheckpointError` naming the entry when a prompts header is not what vlprompt writes."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its vlprompt header is not a JSON object (got {type(header).__name__})")
    if "method" not in header:
        raise CheckpointError(f"{path}: the prompts header names no method (not written by vlprompt?)")
    for key, kind in HEADER_TYPES.items():
        value = header.get(key)
        if value is not None and not isinstance(value, kind):
            raise CheckpointError(f"{path}: the prompts header's {key!r} must be a JSON "
                                  f"{_JSON_NAMES[kind]}, got {value!r:.80}")
    if not all(isinstance(name, str) for name in header.get("classnames") or []):
        raise CheckpointError(f"{path}: the prompts header's 'classnames' must be a list of texts")
    backbone = (header.get("config") or {}).get("backbone")
    if backbone is not None and not (isinstance(backbone, dict) and isinstance(backbone.get("name", ""), str)):
        raise CheckpointError(f"{path}: the prompts header's config.backbone must be an object with a 'name'")


_JSON_NAMES = {str: "string", dict: "object", list: "array"}


def backbone_of(header: dict[str, Any]) -> tuple[str, str | None]:
    """``(architecture, pretrained)`` the prompts were trained on, as :func:`~vlprompt.weights.load_clip` takes.

    Read from the header's run config; headers without one (``vlprompt import-original`` files) carry only the
    backbone label ``"name"`` or ``"name/tag"``: tiny and toy models need no weights, other architectures
    without a tag get the engine's default (``openai``), as ``vlprompt eval`` does.
    """
    from vlprompt.weights import TINY_CONFIGS
    from vlprompt.engine.config import BackboneConfig

    spec = (header.get("config") or {}).get("backbone")
    if isinstance(spec, dict) and spec.get("name"):
        return spec["name"], spec.get("pretrained")
    label = header.get("backbone")
    if not isinstance(label, str) or not label:
        raise CheckpointError("the prompts header names no backbone; pass backbone= (--backbone)")
    name, _, tag = label.partition("/")
    if name in TINY_CONFIGS or name == "toy":
        return name, None
    return name, tag or BackboneConfig().pretrained


def backbone_for(header: dict[str, Any], backbone: str | None = None,
                 pretrained: str | os.PathLike | None = None) -> tuple[str, str | os.PathLike | None]:
    """``(architecture, weights)`` to rebuild prompts on: the header's (:func:`backbone_of`) unless ``backbone`` or
    ``pretrained`` (``"none"``: random weights) replace them. The one rule of ``vlprompt.load``, ``predict``,
    ``explain`` and ``eval``."""
    from vlprompt.weights import weights_argument

    name, weights = backbone_of(header)
    if pretrained is not None:
        weights = weights_argument(pretrained)
    return backbone or name, weights


def load(source: str | os.PathLike, device: str | torch.device = "cpu", backbone: str | None = None,
         pretrained: str | None = None, *, template: str | None = None, precision: str = "fp32") -> "Predictor":
    """Load trained prompts for prediction.

    Args:
        source: a run folder (``config.json`` + ``prompts.safetensors``) or a prompts file (``vlprompt export``,
            ``vlprompt import-original``, or a run's own ``prompts.safetensors``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``.
        backbone: architecture to use instead of the one in the header (same widths and depths needed); the
            header's weights are used unless ``pretrained`` is given.
        pretrained: weights instead of the header's: an open_clip tag, a local checkpoint file, or ``"none"``
            for random weights. Needed when the run was trained on a local weights file that is not at its
            recorded path on this machine.
        template: prompt template for new class names (default: the one stored with the prompts, i.e. the
            training dataset's). Only methods with fixed hand-written text use it (zero-shot, VPT).
        precision: autocast precision of the forward pass, ``"fp32"``, ``"fp16"`` or ``"bf16"``.

    Raises:
        RunNotFoundError: no such folder/file, or the run has not finished training.
        CheckpointError: the weights or the prompts do not fit the backbone.
    """
    from vlprompt.weights import load_clip
    from vlprompt.engine.trainer import resolve_device
    from vlprompt.methods import build_method

    tensors, header = read_prompts(source)
    name, weights = backbone_for(header, backbone, pretrained)
    from_header = pretrained is None
    device = resolve_device(device) if isinstance(device, str) else device
    try:
        clip = load_clip(name, weights, device=device)
    except CheckpointError as error:
        if from_header and weights is not None:
            raise CheckpointError(f"{error} (the prompts were trained on backbone {name} with weights {weights!r}; "
                                  f"pass pretrained= / --pretrained with the weights file on this machine)") from None
        raise
    classnames = header.get("classnames") or []
    template = template or header.get("template") or DEFAULT_TEMPLATE
    method = build_method(header["method"], clip, classnames or ["object"], template,
                          **dict(header.get("options") or {}))
    method.load_prompt_state_dict(tensors)
    return Predictor(method.to(device), header=header, precision=precision, source=os.fspath(source),
                     classnames=classnames)


# --------------------------------------------------------------------------------------------- predictor


class Predictor:
    """A trained prompt method ready to classify images (see :func:`load`).

    Args:
        method: a built :class:`~vlprompt.methods.base.PromptMethod` holding its learned parameters; available
            as ``.method`` for power users (its ``encode_views``, ``encode_classes``, ``match``…).
        header: the prompts header (method, options, backbone, config, training class names…).
        precision: autocast precision of the forward pass.
        source: where the prompts came from (for messages).
        classnames: the class names used for training; the default class list of :meth:`predict`.
    """

    def __init__(self, method, *, header: dict[str, Any] | None = None, precision: str = "fp32",
                 source: str | None = None, classnames: Sequence[str] | None = None):
        from vlprompt.data import build_transform

        self.method = method.eval()
        self.header = dict(header or {})
        self.precision = precision
        self.source = source
        self.classnames = list(classnames if classnames is not None else method.classnames)
        clip = method.clip
        self.transform = build_transform(False, clip.image_size, clip.image_mean, clip.image_std)
        self._class_sides: OrderedDict[tuple, Any] = OrderedDict()

    @property
    def clip(self):
        return self.method.clip

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def __repr__(self) -> str:
        return f"Predictor({self.method.name} on {self.clip.name}, from {self.source or 'a method object'})"

    # ------------------------------------------------------------------ class side
    def check_classnames(self, classnames: Sequence[str] | None) -> list[str]:
        """The class list to use (``None``: the training classes); empty lists are an error."""
        names = self.classnames if classnames is None else [str(name).strip() for name in classnames]
        names = [name for name in names if name]
        if not names:
            raise EmptyClassListError("the class list is empty; give at least one class name"
                                      if classnames is not None else
                                      "no class names given and none stored with the prompts; give class names")
        return names

    def class_side(self, classnames: Sequence[str]) -> Any:
        """Switch the method to ``classnames`` and return their class side (cached per class list)."""
        names = list(classnames)
        if names != self.method.classnames:
            self.method.set_classnames(names)
        key = tuple(names)
        if key in self._class_sides:
            self._class_sides.move_to_end(key)
            return self._class_sides[key]
        with torch.no_grad(), self._autocast():
            side = self.method.encode_classes()
        self._class_sides[key] = side
        while len(self._class_sides) > CLASS_CACHE_SIZE:
            self._class_sides.popitem(last=False)
        return side

    def _autocast(self):
        from vlprompt.engine.trainer import autocast

        return autocast(self.device, self.precision)

    # ------------------------------------------------------------------ images
    def load_image(self, image: ImageInput) -> torch.Tensor:
        """One image → normalised ``(3, S, S)`` tensor (S = the backbone's image size).

        Paths and PIL images go through the test transform (resize, centre crop, normalise); a float tensor
        ``(3, H, W)`` is taken as already pre-processed; a uint8 tensor/array ``(H, W, 3)`` (or ``(3, H, W)``
        tensor) is taken as raw pixels. Raises :class:`UnreadableImageError` for a file PIL cannot decode.
        """
        import numpy as np
        from PIL import Image

        from vlprompt.data.loading import UNREADABLE

        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise UnreadableImageError(path, "no such file")
            try:
                with Image.open(path) as file:
                    image = file.convert("RGB")  # decodes fully, so truncated files fail here
            except UNREADABLE as error:
                raise UnreadableImageError(path, str(error) or type(error).__name__) from None
        if isinstance(image, Image.Image):
            return self.transform(image)
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            size = self.clip.image_size
            if image.dim() != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != (size, size):
                raise ConfigError(f"a float image tensor must be pre-processed, shape (3, {size}, {size}); got "
                                  f"{tuple(image.shape)} (pass a PIL image or a path to have it resized)")
            return image
        if isinstance(image, torch.Tensor):
            array = image.numpy() if image.dim() == 3 and image.shape[-1] in (1, 3, 4) else \
                image.permute(1, 2, 0).numpy()
            return self.transform(Image.fromarray(np.ascontiguousarray(array)))
        if isinstance(image, np.ndarray):
            return self.transform(Image.fromarray(image))
        raise ConfigError(f"cannot use {type(image).__name__} as an image (give a path, a PIL image or a tensor)")

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def logits(self, images: torch.Tensor, classnames: Sequence[str] | None = None) -> torch.Tensor:
        """Logits ``(B, K)`` (fp32) of pre-processed images ``(B, 3, S, S)``."""
        names = self.check_classnames(classnames)
        side = self.class_side(names)
        with self._autocast():
            return self.method(images.to(self.device), side).float()

    def predict(self, images: ImageInput | Sequence[ImageInput], classnames: Sequence[str] | None = None, *,
                batch_size: int = 32, skip_unreadable: bool = False) -> Prediction:
        """Classify images among ``classnames`` (default: the training classes).

        Args:
            images: one image or a list: paths, PIL images, pre-processed float tensors ``(3, S, S)`` (or a
                batch ``(B, 3, S, S)``), uint8 pixel arrays.
            classnames: the class names to choose from (any names: the prompts carry over to new classes).
            batch_size: images per forward pass.
            skip_unreadable: leave unreadable files out (listed in ``Prediction.skipped``) instead of raising
                :class:`UnreadableImageError`.
        """
        names = self.check_classnames(classnames)
        items = _as_list(images)
        rows, sources, skipped = [], [], []
        batch: list[torch.Tensor] = []

        def flush():
            if batch:
                rows.append(self.logits(torch.stack(batch), names))
                batch.clear()

        for item in items:
            try:
                tensor = self.load_image(item)
            except UnreadableImageError as error:
                if not skip_unreadable:
                    raise
                skipped.append(error.path)
                continue
            batch.append(tensor)
            sources.append(os.fspath(item) if isinstance(item, (str, os.PathLike)) else None)
            if len(batch) == batch_size:
                flush()
        flush()
        logits = torch.cat(rows).cpu() if rows else torch.empty(0, len(names))
        indices = logits.argmax(dim=-1)
        return Prediction(classnames=names, labels=[names[i] for i in indices.tolist()], indices=indices,
                          probs=logits.softmax(dim=-1), logits=logits, sources=sources, skipped=skipped)

    def classify_folder(self, folder: str | os.PathLike, classnames: Sequence[str] | None = None,
                        batch_size: int = 32, *, recursive: bool = True,
                        skip_unreadable: bool = True) -> Prediction:
        """Classify every image file under ``folder`` (sorted paths; sub-folders too unless ``recursive=False``).

        Unreadable images are skipped and listed in ``Prediction.skipped`` (``skip_unreadable=False`` raises).
        """
        paths = find_images([folder], recursive=recursive)
        return self.predict(paths, classnames, batch_size=batch_size, skip_unreadable=skip_unreadable)


def _as_list(images) -> list:
    if isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, torch.Tensor)) or not isinstance(images, Iterable):
        return [images]
    try:
        import numpy as np

        if isinstance(images, np.ndarray):
            return [images]
    except ImportError:  # pragma: no cover
        pass
    return list(images)


def find_images(paths: Iterable[str | os.PathLike], recursive: bool = True) -> list[str]:
    """Image files named by ``paths``: files as given, folders searched for image files (sorted, no hidden ones).

    Raises :class:`~vlprompt.errors.DataError` for a path that does not exist or a folder without images.
    """
    from vlprompt.data.base import IMAGE_EXTENSIONS

    found: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isfile(path):
            found.append(path)
            continue
        if not os.path.isdir(path):
            raise DataError(f"image path not found: {path}")
        inside = []
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")) if recursive else []
            inside += [os.path.join(folder, name) for name in files
                       if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)]
        if not inside:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        found += sorted(inside)
    return found


# --------------------------------------------------------------------------------------------- export


def export_prompts(source: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the learned prompt tensors of a run folder (or prompts file) to ``out`` with a complete header.

    The file is the engine's ``prompts.safetensors`` format (safetensors: tensors + a JSON header, no pickles):
    the header keeps everything the run stored (method, options, backbone, config, training class names,
    template, training summary) and gets ``"format"`` and the library version. Returns the header.
    """
    from vlprompt import __version__
    from vlprompt.engine.checkpoint import save_prompts

    tensors, header = read_prompts(source)
    header = {**header, "format": PROMPTS_FORMAT}
    header.setdefault("vlprompt", __version__)
    header.setdefault("template", DEFAULT_TEMPLATE)
    if "backbone" not in header or not isinstance(header["backbone"], str):
        header["backbone"] = backbone_of(header)[0]
    save_prompts(os.fspath(out), tensors, header)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # a file to share: the usual permissions, not the temporary file's 0600
    return header


__all__ = [
    "EmptyClassListError",
    "PROMPTS_FORMAT",
    "Prediction",
    "Predictor",
    "RunNotFoundError",
    "UnreadableImageError",
    "backbone_of",
    "export_prompts",
    "find_images",
    "load",
    "read_prompts",
]
