"""The toy world's vocabulary: attributes, held-out compositions, captions and the datasets built from them.

A scene is one object on a textured background. Its discrete attributes are a shape, a color, a size, a position
and a background texture; everything else (exact radius, offset, rotation, background tones, lighting, pattern
frequencies) is continuous nuisance drawn by the renderer (:mod:`vlprompt.toyworld.render`). A rendering domain
(photo, sketch, pixel, inverted, painted) says how the scene is drawn.

The classes of ``toy_objects`` are the color × shape compositions. A fixed set of them, one per color and one per
shape, is held out of pretraining, so every held-out composition combines a color and a shape that pretraining saw
in five other compositions each: zero-shot accuracy on them measures composition, not memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlprompt.errors import ConfigError

IMAGE_SIZE = 64

# Saturated, well separated hues; backgrounds use muted greys so the object's color is never ambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (240, 205, 40),
    "purple": (140, 60, 185),
    "pink": (250, 140, 190),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "wavy", "speckled")
DOMAINS: tuple[str, ...] = ("photo", "sketch", "pixel", "inverted", "painted")

# Color i is held out with shape (i + 2) mod 6: a permutation, so each color and each shape is held out once.
HELD_OUT: tuple[tuple[str, str], ...] = tuple(
    (color, SHAPES[(i + 2) % len(SHAPES)]) for i, color in enumerate(COLOR_NAMES)
)
HELD_OUT_CLASSNAMES: tuple[str, ...] = tuple(f"{color} {shape}" for color, shape in HELD_OUT)


def object_classname(color: str, shape: str) -> str:
    """The class name of a composition, e.g. ``"red triangle"``."""
    return f"{color} {shape}"


# Color-major order: label = color index * len(SHAPES) + shape index. CoOp's base-to-new split (first half of the
# labels) therefore has three colors as base and three as new, with held-out compositions on both sides.
OBJECT_CLASSNAMES: tuple[str, ...] = tuple(object_classname(c, s) for c in COLOR_NAMES for s in SHAPES)
PRETRAIN_COMPOSITIONS: tuple[tuple[int, int], ...] = tuple(
    (ci, si)
    for ci, c in enumerate(COLOR_NAMES)
    for si, s in enumerate(SHAPES)
    if (c, s) not in HELD_OUT
)


@dataclass(frozen=True)
class ToyDataset:
    """A classification dataset drawn from the world.

    Attributes:
        name: registry name, e.g. ``"toy_objects_sketch"``.
        target: which attribute(s) a label fixes: ``"object"`` (color and shape), ``"shape"``, ``"color"`` or
            ``"texture"``; all other attributes are drawn at random (over every composition, held-out included).
        domain: rendering domain of every image, one of :data:`DOMAINS`.
        classnames: label ``i`` is ``classnames[i]``; each reads well in ``"a photo of a {}."``.
    """

    name: str
    target: str
    domain: str
    classnames: tuple[str, ...]

    def attributes(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """The attribute indices that ``labels`` (N,) fix, as ``{"color"|"shape"|"texture": (N,) int}``."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.target == "object":
            return {"color": labels // len(SHAPES), "shape": labels % len(SHAPES)}
        return {self.target: labels}


def _build_datasets() -> dict[str, ToyDataset]:
    datasets = [
        ToyDataset("toy_objects", "object", "photo", OBJECT_CLASSNAMES),
        ToyDataset("toy_shapes", "shape", "photo", SHAPES),
        ToyDataset("toy_colors", "color", "photo", tuple(f"{c} shape" for c in COLOR_NAMES)),
        ToyDataset("toy_textures", "texture", "photo", tuple(f"{t} background" for t in TEXTURES)),
    ]
    datasets += [ToyDataset(f"toy_objects_{d}", "object", d, OBJECT_CLASSNAMES) for d in DOMAINS if d != "photo"]
    return {d.name: d for d in datasets}


DATASETS: dict[str, ToyDataset] = _build_datasets()


def get_dataset(name: str) -> ToyDataset:
    """The toy dataset called ``name``; a :class:`ConfigError` listing the names if there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown toy dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


# Caption templates with their sampling weights. The plain zero-shot form comes first and most often; partial
# captions (shape only, color only, texture only) teach each attribute word on its own.
CAPTION_TEMPLATES: tuple[tuple[str, float], ...] = (
    ("a photo of a {color} {shape}.", 4.0),
    ("a photo of a {size} {color} {shape}.", 2.0),
    ("a photo of a {size} {color} {shape} on a {texture} background.", 2.0),
    ("a photo of a {color} {shape} in the {position}.", 1.0),
    ("a {color} {shape} on a {texture} background.", 1.0),
    ("a photo of a {size} {color} {shape} in the {position}, on a {texture} background.", 1.0),
    ("a {size} {color} {shape}.", 1.0),
    ("a photo of a {shape}.", 0.7),
    ("a photo of a {color} shape.", 0.7),
    ("a photo of a {texture} background.", 0.7),
)
_CAPTION_WEIGHTS = np.array([w for _, w in CAPTION_TEMPLATES]) / sum(w for _, w in CAPTION_TEMPLATES)


def caption(color: str, shape: str, size: str, position: str, texture: str, template: int = 0) -> str:
    """The caption of a scene with template ``template`` (an index into :data:`CAPTION_TEMPLATES`)."""
    return CAPTION_TEMPLATES[template][0].format(
        color=color, shape=shape, size=size, position=position, texture=texture
    )


def sample_captions(attributes: dict[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    """One caption per scene, templates drawn with their weights.

    Args:
        attributes: ``{"color", "shape", "size", "position", "texture"}`` → (N,) attribute indices.
        rng: source of the template choice.
    """
    templates = rng.choice(len(CAPTION_TEMPLATES), size=len(attributes["color"]), p=_CAPTION_WEIGHTS)
    return [
        caption(COLOR_NAMES[c], SHAPES[s], SIZES[z], POSITIONS[p], TEXTURES[t], int(k))
        for c, s, z, p, t, k in zip(
            attributes["color"], attributes["shape"], attributes["size"], attributes["position"],
            attributes["texture"], templates,
        )
    ]
