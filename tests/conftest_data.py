"""Helpers for the data tests (tiny images, fake dataset trees at the real split paths) and for the end-to-end
tests (colour-patch image folders).

Every fake tree holds one small encoded image written at each path a real split file lists, so the loaders
see exactly the folder structure of the real datasets without their size.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlprompt.data.standard import packaged

# Real split files (provenance and checksums in its SOURCES.md); the package ships byte-identical copies,
# which are used when this checkout has no shared fixtures.
REAL_SPLITS = Path(os.environ.get("VLPROMPT_REAL_SPLITS", "/work/shared/fixtures/real_splits"))

# name -> (split file, image folder relative to the data root, CoOp layout)
SPLIT_DATASETS = {
    "caltech101": ("split_zhou_Caltech101.json", "caltech-101/101_ObjectCategories"),
    "oxford_pets": ("split_zhou_OxfordPets.json", "oxford_pets/images"),
    "stanford_cars": ("split_zhou_StanfordCars.json", "stanford_cars"),
    "oxford_flowers": ("split_zhou_OxfordFlowers.json", "oxford_flowers/jpg"),
    "dtd": ("split_zhou_DescribableTextures.json", "dtd/images"),
    "eurosat": ("split_zhou_EuroSAT.json", "eurosat/2750"),
    "ucf101": ("split_zhou_UCF101.json", "ucf101/UCF-101-midframes"),
}


def image_bytes(fmt: str = "JPEG", size: int = 4, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buffer, fmt)
    return buffer.getvalue()


TINY_JPEG = image_bytes("JPEG")


def write_files(paths, data: bytes = TINY_JPEG) -> int:
    """Put ``data`` at every path (creating folders); returns the number of files.

    The first file is written, the others are hard links to it: tens of thousands of files in about a
    second even on a busy disk (so never overwrite one of them in place; unlink it instead).
    """
    made: set[str] = set()
    first = None
    count = 0
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        if first is None:
            with open(path, "wb") as file:
                file.write(data)
            first = path
        else:
            os.link(first, path)
        count += 1
    return count


def real_file(filename: str) -> bytes:
    """A real split / class-list file: the shared fixture if present, else the packaged copy."""
    fixture = {
        "oxford_flowers_cat_to_name.json": "cat_to_name.json",
        "imagenet_classnames.txt": "classnames.txt",
        "fgvc_aircraft_variants.txt": "derived/variants.txt",
        **{f"fgvc_aircraft_images_variant_{s}.txt": f"derived/images_variant_{s}.txt" for s in ("train", "val", "test")},
    }.get(filename, filename)
    path = REAL_SPLITS / fixture
    return path.read_bytes() if path.exists() else packaged(filename)


def real_split(filename: str) -> dict:
    return json.loads(real_file(filename))


def make_split_tree(root: Path, name: str) -> int:
    """Fake images at every path of ``name``'s real split file (CoOp layout)."""
    filename, image_dir = SPLIT_DATASETS[name]
    split = real_split(filename)
    paths = (os.path.join(root, image_dir, rel) for key in ("train", "val", "test") for rel, _, _ in split[key])
    return write_files(paths)


def aircraft_lines(split: str) -> list[tuple[str, str]]:
    lines = real_file(f"fgvc_aircraft_images_variant_{split}.txt").decode().splitlines()
    return [(line.split(" ", 1)[0], line.split(" ", 1)[1]) for line in lines]


def make_aircraft_tree(root: Path) -> int:
    ids = [image_id for split in ("train", "val", "test") for image_id, _ in aircraft_lines(split)]
    return write_files(os.path.join(root, "fgvc_aircraft", "images", f"{i}.jpg") for i in ids)


def imagenet_names() -> list[tuple[str, str]]:
    """(wnid, CLIP class name) of CoOp's classnames.txt, in file order."""
    pairs = []
    for line in real_file("imagenet_classnames.txt").decode().splitlines():
        wnid, name = line.split(" ", 1)
        pairs.append((wnid, name))
    return pairs


def make_class_folders(folder: Path, classes, per_class: int = 1) -> None:
    """``folder/<class>/img_<i>.jpg`` for every class."""
    write_files(os.path.join(folder, str(c), f"img_{i}.jpg") for c in classes for i in range(per_class))


COLOURS = {"blue": (30, 30, 220), "green": (30, 200, 30), "red": (220, 30, 30), "yellow": (220, 220, 30)}


def colour_patch_tree(root: Path, colours: dict = COLOURS, train: int = 2, test: int = 2, *, size=(36, 36),
                      seed: int = 0) -> Path:
    """``root/{train,test}/<colour name>/<i>.png``: noisy patches of one colour per class (std 30), a dataset
    that a tiny CLIP learns in a few steps. Images depend only on the arguments."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
