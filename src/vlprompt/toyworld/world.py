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
# Colors that only pretraining draws, with every shape: no dataset has them as a class. Without them every shape
# comes in five colors and never in the sixth, and the image tower learns that shortcut (a green spiky object must
# be a cross, since green stars are held out); with them, each shape is seen in thirteen colors, so its features cannot
# lean on the color. Their indices follow the class colors' (6, 7, ...).
PRETRAIN_ONLY_COLORS: dict[str, tuple[int, int, int]] = {
    "orange": (245, 125, 25),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "brown": (125, 75, 35),
    "cyan": (30, 195, 205),
    "lime": (165, 225, 30),
    "navy": (25, 30, 115),
    "magenta": (225, 35, 200),
}
ALL_COLOR_NAMES: tuple[str, ...] = COLOR_NAMES + tuple(PRETRAIN_ONLY_COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted", "wavy", "speckled")
DOMAINS: tuple[str, ...] = ("photo", "sketch", "pixel", "inverted", "painted", "dusk")

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
# The (color index, shape index) pairs pretraining draws from: the class compositions that are not held out, and
# every shape in each pretraining-only color.
PRETRAIN_COMPOSITIONS: tuple[tuple[int, int], ...] = tuple(
    (ci, si)
    for ci, c in enumerate(ALL_COLOR_NAMES)
    for si, s in enumerate(SHAPES)
    if (c, s) not in HELD_OUT
)


VOCABULARIES: dict[str, tuple[str, ...]] = {
    "color": COLOR_NAMES, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "texture": TEXTURES,
}
# Words pretraining never saw for the shapes: the class names of ``toy_signs``, whose images are ``toy_objects``'.
SHAPE_SYNONYMS: dict[str, str] = {
    "circle": "disc", "square": "tile", "triangle": "wedge", "star": "spark", "cross": "plus", "heart": "valentine",
}


@dataclass(frozen=True)
class ToyDataset:
    """A classification dataset drawn from the world.

    Attributes:
        name: registry name, e.g. ``"toy_objects_sketch"``.
        label_attributes: the attributes a label fixes, most significant first: label = mixed-radix number of their
            indices (``("color", "shape")``: label = 6 · color + shape). All other attributes are drawn at random
            (over every composition, held-out included).
        domain: rendering domain of every image, one of :data:`DOMAINS`.
        classnames: label ``i`` is ``classnames[i]``; each reads well in ``"a photo of a {}."``.
    """

    name: str
    label_attributes: tuple[str, ...]
    domain: str
    classnames: tuple[str, ...]

    def attributes(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """The attribute indices that ``labels`` (N,) fix, as ``{attribute: (N,) int}``."""
        remainder = np.asarray(labels, dtype=np.int64)
        fixed = {}
        for name in reversed(self.label_attributes):
            remainder, fixed[name] = np.divmod(remainder, len(VOCABULARIES[name]))
        return fixed


def _combinations(form: str, *attributes: str, **words: dict[str, str]) -> tuple[str, ...]:
    """Class names ``form.format(...)`` over every combination of ``attributes``, the first most significant;
    ``words[attribute]`` renames an attribute's values."""
    combos: list[dict[str, str]] = [{}]
    for attribute in attributes:
        rename = words.get(attribute, {})
        combos = [{**c, attribute: rename.get(v, v)} for c in combos for v in VOCABULARIES[attribute]]
    return tuple(form.format(**c) for c in combos)


def _build_datasets() -> dict[str, ToyDataset]:
    datasets = [
        ToyDataset("toy_objects", ("color", "shape"), "photo", OBJECT_CLASSNAMES),
        ToyDataset("toy_shapes", ("shape",), "photo", SHAPES),
        ToyDataset("toy_colors", ("color",), "photo", tuple(f"{c} shape" for c in COLOR_NAMES)),
        ToyDataset("toy_textures", ("texture",), "photo", tuple(f"{t} background" for t in TEXTURES)),
        # The downstream suite: fine-grained attribute combinations, unusual class names, a domain shift.
        ToyDataset("toy_patterns", ("shape", "texture"), "photo",
                   _combinations("{shape} on a {texture} background", "shape", "texture")),
        ToyDataset("toy_layouts", ("shape", "position"), "photo",
                   _combinations("{shape} in the {position}", "shape", "position")),
        ToyDataset("toy_signs", ("color", "shape"), "photo",
                   _combinations("{color} {shape}", "color", "shape", shape=SHAPE_SYNONYMS)),
        ToyDataset("toy_color_textures_dusk", ("color", "texture"), "dusk",
                   _combinations("{color} shape on a {texture} background", "color", "texture")),
    ]
    datasets += [ToyDataset(f"toy_objects_{d}", ("color", "shape"), d, OBJECT_CLASSNAMES) for d in DOMAINS if d != "photo"]
    return {d.name: d for d in datasets}


DATASETS: dict[str, ToyDataset] = _build_datasets()


def get_dataset(name: str) -> ToyDataset:
    """The toy dataset called ``name``; a :class:`ConfigError` listing the names if there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown toy dataset {name!r}; choose one of {', '.join(DATASETS)}") from None


# Caption templates with their sampling weights. The plain zero-shot form comes first and most often; partial
# captions (shape only, color only, texture only, shape and texture) teach each attribute word on its own. A caption
# is true of every scene that shares the attributes it names (``caption_matches``), which pretraining uses as its
# contrastive targets: in a world of 36 compositions a batch holds many true captions per image.
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
    ("a photo of a {texture} background.", 1.5),
    ("a photo of a {shape} on a {texture} background.", 1.5),
    ("a photo of a {shape} in the {position}.", 0.7),
)
_CAPTION_WEIGHTS = np.array([w for _, w in CAPTION_TEMPLATES]) / sum(w for _, w in CAPTION_TEMPLATES)
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "texture")
# The attributes each template names, in template order.
TEMPLATE_ATTRIBUTES: tuple[tuple[str, ...], ...] = tuple(
    tuple(a for a in ATTRIBUTES if "{" + a + "}" in template) for template, _ in CAPTION_TEMPLATES
)


def caption(color: str, shape: str, size: str, position: str, texture: str, template: int = 0) -> str:
    """The caption of a scene with template ``template`` (an index into :data:`CAPTION_TEMPLATES`)."""
    return CAPTION_TEMPLATES[template][0].format(
        color=color, shape=shape, size=size, position=position, texture=texture
    )


def sample_templates(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) template indices drawn with the templates' weights."""
    return rng.choice(len(CAPTION_TEMPLATES), size=n, p=_CAPTION_WEIGHTS)


def captions_of(attributes: dict[str, np.ndarray], templates: np.ndarray) -> list[str]:
    """Scene ``i``'s caption with template ``templates[i]``; ``attributes`` maps each attribute name to (N,)."""
    return [
        caption(ALL_COLOR_NAMES[c], SHAPES[s], SIZES[z], POSITIONS[p], TEXTURES[t], int(k))
        for c, s, z, p, t, k in zip(
            attributes["color"], attributes["shape"], attributes["size"], attributes["position"],
            attributes["texture"], templates,
        )
    ]


def sample_captions(attributes: dict[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    """One caption per scene, templates drawn with their weights.

    Args:
        attributes: ``{"color", "shape", "size", "position", "texture"}`` → (N,) attribute indices.
        rng: source of the template choice.
    """
    return captions_of(attributes, sample_templates(len(attributes["color"]), rng))


def caption_matches(attributes: dict[str, np.ndarray], templates: np.ndarray) -> np.ndarray:
    """(N, N) bool: ``[i, j]`` is true when caption ``j`` (scene ``j`` with template ``templates[j]``) is a true
    description of scene ``i``, i.e. scenes ``i`` and ``j`` agree on every attribute the template names.
    The diagonal is true."""
    equal = {a: attributes[a][:, None] == attributes[a][None, :] for a in ATTRIBUTES}  # (N, N) each
    named = np.array([[a in TEMPLATE_ATTRIBUTES[k] for a in ATTRIBUTES] for k in templates])  # (N, A)
    matches = np.ones(equal["color"].shape, dtype=bool)
    for index, name in enumerate(ATTRIBUTES):
        matches &= equal[name] | ~named[None, :, index]
    return matches
