"""Vectorised numpy renderer of toy-world scenes: a batch of attribute arrays in, ``(N, 64, 64, 3)`` uint8 out.

Shapes are signed distance functions evaluated on the pixel grid of every image at once, so one call renders a
whole batch with a handful of array operations (a few milliseconds per hundred images); pretraining draws its
images on the fly. Everything random comes from the ``numpy.random.Generator`` passed in: the same seed gives the
same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlprompt.errors import ConfigError
from vlprompt.toyworld.world import (
    COLORS, DOMAINS, IMAGE_SIZE, POSITIONS, PRETRAIN_ONLY_COLORS, SHAPES, SIZES, TEXTURES,
)

# (C, 3): the class colors, then the pretraining-only ones (their indices follow).
_COLOR_RGB = np.array([*COLORS.values(), *PRETRAIN_ONLY_COLORS.values()], dtype=np.float32)
_RADIUS_RANGE = {"small": (8.5, 11.5), "large": (16.0, 20.0)}  # object radius in pixels at 64 px
# Position offsets as unit directions; scaled per image by the room the object leaves to the border.
_POSITION_DIRECTION = {
    "center": (0.0, 0.0),
    "top left": (-1.0, -1.0),
    "top right": (1.0, -1.0),
    "bottom left": (-1.0, 1.0),
    "bottom right": (1.0, 1.0),
}
PIXEL_BLOCK = 4  # the pixel domain averages 4×4 blocks: 16×16 cells


def sample_attributes(
    rng: np.random.Generator,
    n: int,
    *,
    compositions: np.ndarray | None = None,
    **fixed: np.ndarray,
) -> dict[str, np.ndarray]:
    """Draw the discrete attributes of ``n`` scenes.

    Args:
        rng: source of randomness.
        n: number of scenes.
        compositions: (K, 2) allowed ``(color, shape)`` index pairs for the scenes whose color and shape are not
            fixed; ``None`` allows all of them.
        **fixed: attribute name (``color``, ``shape``, ``size``, ``position``, ``texture``) → (n,) indices that
            are not drawn.

    Returns:
        ``{"color", "shape", "size", "position", "texture"}`` → (n,) int64 indices into the vocabularies of
        :mod:`vlprompt.toyworld.world`.
    """
    unknown = set(fixed) - {"color", "shape", "size", "position", "texture"}
    if unknown:
        raise ConfigError(f"unknown scene attribute(s) {sorted(unknown)}")
    if compositions is None:
        color = rng.integers(len(COLORS), size=n)
        shape = rng.integers(len(SHAPES), size=n)
    else:
        pairs = np.asarray(compositions)[rng.integers(len(compositions), size=n)]
        color, shape = pairs[:, 0], pairs[:, 1]
    attributes = {
        "color": color,
        "shape": shape,
        "size": rng.integers(len(SIZES), size=n),
        "position": rng.integers(len(POSITIONS), size=n),
        "texture": rng.integers(len(TEXTURES), size=n),
    }
    for name, values in fixed.items():
        attributes[name] = np.broadcast_to(np.asarray(values), (n,))
    return {name: np.asarray(values, dtype=np.int64) for name, values in attributes.items()}


def render(attributes: dict[str, np.ndarray], domain: str, rng: np.random.Generator) -> np.ndarray:
    """Render scenes.

    Args:
        attributes: (N,) attribute indices as returned by :func:`sample_attributes`.
        domain: one of :data:`~vlprompt.toyworld.world.DOMAINS`.
        rng: source of the continuous nuisance (radius, offset, rotation, tones, lighting, noise).

    Returns:
        (N, 64, 64, 3) uint8 RGB images.
    """
    if domain not in DOMAINS:
        raise ConfigError(f"unknown rendering domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    n = len(attributes["color"])
    geometry = _sample_geometry(attributes, rng)
    # A painted object has wobbly brush-stroke edges; a sketch has a wobbly pencil line.
    wobble = 0.0 if domain in ("photo", "inverted", "pixel", "dusk") else _smooth_noise(rng, n, amplitude=0.04)
    sdf, u, v = _object_sdf(attributes["shape"], geometry, wobble)  # (N, S, S), in units of the radius
    radius = geometry["radius"][:, None, None]
    color = _COLOR_RGB[attributes["color"]] + rng.uniform(-12, 12, size=(n, 3)).astype(np.float32)

    if domain == "sketch":
        image = _sketch(attributes, sdf, radius, color, rng)
    else:
        background = _background(attributes["texture"], rng, n)
        image = _photo(background, sdf, u, v, radius, color, rng, noise=domain in ("photo", "inverted", "dusk"))
        if domain == "inverted":
            image = invert_lightness(image)
        elif domain == "dusk":
            image = _dusk(image, rng)
        elif domain == "pixel":
            image = _pixelate(image)
        elif domain == "painted":
            image = _paint(image, rng)
    # Channels-first inside (long inner loops for numpy), channels-last out.
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def generate(
    n: int,
    seed: int | Sequence[int] | np.random.SeedSequence,
    domain: str = "photo",
    *,
    compositions: np.ndarray | None = None,
    **fixed: np.ndarray,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` random scenes and their images, fully determined by ``seed`` (anything ``default_rng`` takes).

    Returns:
        images (n, 64, 64, 3) uint8 and the attribute dict of :func:`sample_attributes`.
    """
    rng = np.random.default_rng(seed)
    attributes = sample_attributes(rng, n, compositions=compositions, **fixed)
    return render(attributes, domain, rng), attributes


# --- geometry -------------------------------------------------------------------------------------------------

_GRID = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5


def _sample_geometry(attributes: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(attributes["color"])
    low = np.array([_RADIUS_RANGE[s][0] for s in SIZES], dtype=np.float32)[attributes["size"]]
    high = np.array([_RADIUS_RANGE[s][1] for s in SIZES], dtype=np.float32)[attributes["size"]]
    radius = low + (high - low) * rng.random(n, dtype=np.float32)
    direction = np.array([_POSITION_DIRECTION[p] for p in POSITIONS], dtype=np.float32)[attributes["position"]]
    room = IMAGE_SIZE / 2 - radius - 2.0  # keep the object inside the frame
    offset = direction * (room * (0.75 + 0.25 * rng.random(n, dtype=np.float32)))[:, None]
    jitter = rng.uniform(-2.5, 2.5, size=(n, 2)).astype(np.float32)
    centre = IMAGE_SIZE / 2 + offset + jitter
    angle = rng.uniform(-0.3, 0.3, size=n).astype(np.float32)  # radians; small, so a square never becomes a diamond
    return {"radius": radius, "cx": centre[:, 0], "cy": centre[:, 1], "angle": angle}


def _object_sdf(
    shape: np.ndarray, geometry: dict[str, np.ndarray], wobble: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance (negative inside, in radius units) and rotated local coordinates, each (N, S, S)."""
    r = geometry["radius"][:, None, None]
    dx = (_GRID[None, None, :] - geometry["cx"][:, None, None]) / r
    dy = (_GRID[None, :, None] - geometry["cy"][:, None, None]) / r
    cos, sin = np.cos(geometry["angle"])[:, None, None], np.sin(geometry["angle"])[:, None, None]
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy  # image y points down
    sdf = np.empty(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    for index, name in enumerate(SHAPES):
        selected = shape == index
        if selected.any():
            sdf[selected] = _SHAPE_SDF[name](u[selected], -v[selected])  # shapes are written with y up
    return sdf + wobble, u, v


def _circle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y) - 0.9


def _square(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y)) - 0.78


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Equilateral, pointing up, circumradius 1.1, bounding box centred on the origin.
    y = (y + 0.275) / 1.1
    return 1.1 * np.maximum(-y - 0.5, 0.866 * np.abs(x) + 0.5 * y - 0.5)


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Five points: the boundary radius zig-zags between an inner and an outer radius with the polar angle.
    rho = np.sqrt(x * x + y * y)
    sector = np.mod(np.arctan2(x, y) / (2 * np.pi / 5), 1.0)
    boundary = 0.45 + 0.6 * np.abs(2 * sector - 1) ** 1.5
    return 0.6 * (rho - boundary)


def _cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    return np.minimum(np.maximum(ax - 0.3, ay - 0.92), np.maximum(ax - 0.92, ay - 0.3))


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # A diamond (L1 ball) with a half-disc on each of its two upper edges.
    a, c = 0.8, -0.1
    diamond = (np.abs(x) + np.abs(y - c) - a) / np.sqrt(2)
    lobes_y = y - c - a / 2
    left = np.sqrt((x + a / 2) ** 2 + lobes_y**2) - a / np.sqrt(2)
    right = np.sqrt((x - a / 2) ** 2 + lobes_y**2) - a / np.sqrt(2)
    return np.minimum(diamond, np.minimum(left, right))


_SHAPE_SDF = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "heart": _heart,
}


def _coverage(sdf: np.ndarray, radius: np.ndarray, softness: float = 1.0) -> np.ndarray:
    """Anti-aliased inside-ness in [0, 1], the edge ``softness`` pixels wide."""
    return np.clip(0.5 - sdf * radius / softness, 0.0, 1.0)


# --- backgrounds ----------------------------------------------------------------------------------------------


def _background(texture: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """(N, 3, S, S) float backgrounds: two muted tones mixed by the texture's pattern."""
    pattern = _texture_pattern(texture, rng, n)  # (N, S, S) in [0, 1]
    level = rng.uniform(105, 200, size=(n, 1)).astype(np.float32)
    tone_a = level + rng.uniform(-14, 14, size=(n, 3)).astype(np.float32)  # near-grey, slightly tinted
    contrast = rng.uniform(38, 60, size=(n, 1)).astype(np.float32) * np.where(level > 150, -1, 1).astype(np.float32)
    tone_b = tone_a + contrast
    return tone_a[:, :, None, None] + (tone_b - tone_a)[:, :, None, None] * pattern[:, None]


def _texture_pattern(texture: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    size = IMAGE_SIZE
    x = _GRID[None, None, :] / size  # (1, 1, S) in (0, 1)
    y = _GRID[None, :, None] / size
    frequency = rng.uniform(4.5, 7.5, size=n).astype(np.float32)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2)).astype(np.float32)
    stripe_angle = (rng.integers(4, size=n) * np.pi / 4 + rng.uniform(-0.15, 0.15, size=n)).astype(np.float32)
    period = rng.uniform(7.5, 10.5, size=n).astype(np.float32)[:, None, None]
    dot_radius = rng.uniform(1.6, 2.4, size=n).astype(np.float32)[:, None, None]
    wave_amplitude = rng.uniform(0.05, 0.08, size=n).astype(np.float32)[:, None, None]
    speckle_density = rng.uniform(0.08, 0.16, size=(n, 1, 1)).astype(np.float32)
    gradient = rng.uniform(-0.12, 0.12, size=(n, 2)).astype(np.float32)
    ph0, ph1 = phase[:, 0, None, None], phase[:, 1, None, None]

    pattern = np.zeros((n, size, size), dtype=np.float32)
    for index, name in enumerate(TEXTURES):
        s = texture == index
        if not s.any():
            continue
        if name == "plain":  # a gentle lighting gradient, no pattern
            value = gradient[s, 0, None, None] * (2 * x - 1) + gradient[s, 1, None, None] * (2 * y - 1)
        elif name == "striped":
            cos, sin = np.cos(stripe_angle[s])[:, None, None], np.sin(stripe_angle[s])[:, None, None]
            value = _band(np.sin(2 * np.pi * frequency[s] * (x * cos + y * sin) + ph0[s]))
        elif name == "checkered":
            f = frequency[s] * 0.6
            value = _band(np.sin(2 * np.pi * f * x + ph0[s]) * np.sin(2 * np.pi * f * y + ph1[s]))
        elif name == "dotted":
            px = np.mod(_GRID[None, None, :] + ph0[s] * period[s], period[s]) - period[s] / 2
            py = np.mod(_GRID[None, :, None] + ph1[s] * period[s], period[s]) - period[s] / 2
            value = np.clip(dot_radius[s] - np.sqrt(px * px + py * py) + 0.5, 0.0, 1.0)
        elif name == "wavy":
            bent = y + wave_amplitude[s] * np.sin(2 * np.pi * 2.0 * x + ph1[s])
            value = _band(np.sin(2 * np.pi * frequency[s] * bent + ph0[s]))
        elif name == "speckled":
            value = (rng.random((int(s.sum()), size, size), dtype=np.float32) < speckle_density[s]).astype(np.float32)
        pattern[s] = value
    return pattern


def _band(wave: np.ndarray) -> np.ndarray:
    """A sine wave turned into soft-edged bands in [0, 1]."""
    return np.clip(wave * 3.0 + 0.5, 0.0, 1.0)


# --- domains --------------------------------------------------------------------------------------------------


def _photo(
    background: np.ndarray,
    sdf: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    radius: np.ndarray,
    color: np.ndarray,
    rng: np.random.Generator,
    noise: bool,
) -> np.ndarray:
    """A shaded object with a drop shadow on its background, plus sensor noise."""
    n = len(color)
    coverage = _coverage(sdf, radius)
    # Light from the upper left: the shadow falls down-right, softened by averaging shifted copies.
    shadow = sum(np.roll(coverage, (dy, dx), axis=(1, 2)) for dy, dx in ((2, 2), (3, 2), (2, 3), (3, 3))) / 4
    light = rng.uniform(-0.9, -0.5, size=(n, 2)).astype(np.float32)  # direction the light comes from
    lx, ly = light[:, 0, None, None], light[:, 1, None, None]
    shade = np.clip(1.0 + 0.22 * (u * lx + v * ly), 0.7, 1.25)
    # Bounded exponent: exp of large negatives gives denormals, which are slow.
    highlight = 0.3 * np.exp(np.maximum(-((u - 0.4 * lx) ** 2 + (v - 0.4 * ly) ** 2) / 0.06, -15.0))
    exposure = rng.uniform(0.9, 1.1, size=(n, 1, 1)).astype(np.float32)
    # Written to touch the (N, S, S, 3) arrays as few times as possible: this runs inside the pretraining loop.
    keep = (1.0 - coverage) * exposure
    image = background * (keep * (1.0 - 0.35 * shadow))[:, None]
    image += color[:, :, None, None] * (coverage * exposure * shade * (1.0 - highlight))[:, None]
    image += (255.0 * coverage * exposure * highlight)[:, None]
    if noise:  # uniform and shared by the channels: cheaper than normal per channel, looks the same
        image += (rng.random(size=coverage.shape, dtype=np.float32) * 10.0 - 5.0)[:, None]
    return image


def _sketch(
    attributes: dict[str, np.ndarray], sdf: np.ndarray, radius: np.ndarray, color: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A colored pencil outline with light hatching inside, on paper with the texture drawn in faint grey."""
    n = len(color)
    paper = rng.uniform(232, 250, size=(n, 1, 1, 1)).astype(np.float32)
    paper = paper + np.array([3.0, 1.0, -4.0], np.float32)[None, :, None, None]
    pattern = _texture_pattern(attributes["texture"], rng, n)
    image = paper - 40.0 * pattern[:, None]
    width = rng.uniform(1.0, 1.8, size=(n, 1, 1)).astype(np.float32)
    outline = np.clip(width - np.abs(sdf * radius) + 0.5, 0.0, 1.0)
    hatching = _band(np.sin(2 * np.pi * (_GRID[None, None, :] + _GRID[None, :, None]) / 5.0)) * 0.3
    hatching = hatching * _coverage(sdf, radius)
    ink = 0.85 * color[:, :, None, None]
    alpha = np.maximum(outline, hatching)[:, None]
    return image * (1.0 - alpha) + ink * alpha


def invert_lightness(image: np.ndarray) -> np.ndarray:
    """A photographic negative that keeps hue and chroma: lightness ``(max + min) / 2`` becomes ``255 - lightness``.

    The plain negative ``255 - image`` also turns every hue to its opposite (a red triangle becomes a cyan one),
    which would change the class of a color × shape image; shifting all channels of a pixel by
    ``255 - max - min`` inverts its lightness alone. Works on any layout with channels on axis 1 (N, 3, H, W).
    """
    return image + (255.0 - image.max(axis=1, keepdims=True) - image.min(axis=1, keepdims=True))


def _dusk(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The photo at dusk: dark, under a strong blue cast, with low-light noise. Hues crowd together (red turns
    maroon, pink and purple turn blue-violet) while their differences survive in the features."""
    n = len(image)
    cast = np.array([0.38, 0.46, 0.85], np.float32)[None, :, None, None]
    brightness = rng.uniform(0.85, 1.1, size=(n, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 5.0, size=(n, 1) + image.shape[2:]).astype(np.float32)
    return image * cast * brightness + 12.0 + noise


def _pixelate(image: np.ndarray) -> np.ndarray:
    """Average ``PIXEL_BLOCK``² blocks, posterize to 16 levels per channel, and scale back up."""
    n, size = image.shape[0], image.shape[-1]
    cells = size // PIXEL_BLOCK
    blocks = image.reshape(n, 3, cells, PIXEL_BLOCK, cells, PIXEL_BLOCK).mean(axis=(3, 5))
    blocks = np.rint(np.clip(blocks, 0, 255) / 17.0) * 17.0
    return blocks.repeat(PIXEL_BLOCK, axis=2).repeat(PIXEL_BLOCK, axis=3)


def _paint(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brush strokes: blur, boost saturation, posterize, then streak along a random stroke direction."""
    n = len(image)
    blurred = sum(np.roll(image, (dy, dx), axis=(2, 3)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    grey = blurred.mean(axis=1, keepdims=True)
    vivid = grey + 1.25 * (blurred - grey)
    vivid = np.rint(np.clip(vivid, 0, 255) / 42.0) * 42.0
    angle = rng.uniform(0, np.pi, size=n).astype(np.float32)[:, None, None]
    along = _GRID[None, None, :] * np.cos(angle) + _GRID[None, :, None] * np.sin(angle)
    across = -_GRID[None, None, :] * np.sin(angle) + _GRID[None, :, None] * np.cos(angle)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
    streaks = np.sin(across * 1.3 + 2.0 * np.sin(along * 0.15 + phase))
    canvas = 6.0 * np.sin(_GRID[None, None, :] * 2.1) * np.sin(_GRID[None, :, None] * 2.1)
    return vivid * (1.0 + 0.08 * streaks[:, None]) + canvas[:, None]


def _smooth_noise(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """(N, S, S) low-frequency noise: a sum of three random plane waves."""
    frequency = rng.uniform(0.08, 0.25, size=(n, 3, 2)).astype(np.float32) * rng.choice([-1, 1], size=(n, 3, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 3)).astype(np.float32)
    noise = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for k in range(3):
        fx, fy = frequency[:, k, 0, None, None], frequency[:, k, 1, None, None]
        noise += np.sin(fx * _GRID[None, None, :] + fy * _GRID[None, :, None] + phase[:, k, None, None])
    return amplitude / np.sqrt(3) * noise
