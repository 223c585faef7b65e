"""Toy datasets as image folders with a CoOp-format split file, so they load like any real dataset.

Layout written by :func:`materialize`::

    root/<name>/images/<split>/<class_folder>/<index>.png
    root/<name>/split.json      {"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}
    root/<name>/toyworld.json   how the folder was made (name, seed, images per class)

``relpath`` is relative to ``root/<name>/images``. The folder is written under a temporary name and renamed into
place once complete, so an interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from vlprompt.errors import DataError
from vlprompt.toyworld.render import render, sample_attributes
from vlprompt.toyworld.world import ToyDataset, get_dataset

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Images per class of each split when none are given: ``materialize``, its command and ``build_dataset`` all use
# these, so a folder written with the defaults is the folder a run reads with the defaults.
DEFAULT_PER_CLASS: dict[str, int] = {"train": 16, "val": 4, "test": 20}
_RENDER_CHUNK = 512  # images rendered per call: bounds memory


def split_seed(name: str, split: str, seed: int) -> np.random.SeedSequence:
    """The seed of one split of one dataset: distinct for every (name, split, seed)."""
    return np.random.SeedSequence([seed, SPLITS.index(split), zlib.crc32(name.encode())])


def generate_split(
    dataset: str | ToyDataset, split: str, n_per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one split, in memory.

    Args:
        dataset: a toy dataset or its registry name.
        split: ``"train"``, ``"val"`` or ``"test"``.
        n_per_class: images per class.
        seed: base seed; the split's own seed is :func:`split_seed`.

    Returns:
        images (C * n_per_class, 64, 64, 3) uint8 and labels (C * n_per_class,) int64, grouped by class.
    """
    dataset = get_dataset(dataset) if isinstance(dataset, str) else dataset
    rng = np.random.default_rng(split_seed(dataset.name, split, seed))
    labels = np.repeat(np.arange(len(dataset.classnames)), n_per_class)
    attributes = sample_attributes(rng, len(labels), **dataset.attributes(labels))
    chunks = [
        render({k: v[start : start + _RENDER_CHUNK] for k, v in attributes.items()}, dataset.domain, rng)
        for start in range(0, len(labels), _RENDER_CHUNK)
    ]
    images = np.concatenate(chunks) if chunks else np.zeros((0, 64, 64, 3), np.uint8)
    return images, labels


def materialize(
    name: str,
    root: str | Path,
    n_train_per_class: int = DEFAULT_PER_CLASS["train"],
    n_val_per_class: int = DEFAULT_PER_CLASS["val"],
    n_test_per_class: int = DEFAULT_PER_CLASS["test"],
    seed: int = 0,
) -> Path:
    """Write toy dataset ``name`` under ``root/<name>`` (PNG images + ``split.json``) and return that folder.

    Idempotent: a complete folder made with the same arguments is returned untouched; one made with different
    arguments is an error (delete it or choose another root).
    """
    dataset = get_dataset(name)
    root = Path(root)
    target = root / name
    recipe = {
        "name": name,
        "seed": seed,
        "n_per_class": {"train": n_train_per_class, "val": n_val_per_class, "test": n_test_per_class},
        "format": 1,
    }
    if _is_complete(target, recipe):
        return target

    root.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    try:
        split = {}
        for split_name in SPLITS:
            n = recipe["n_per_class"][split_name]
            images, labels = generate_split(dataset, split_name, n, seed)
            split[split_name] = _write_images(temporary / "images", split_name, images, labels, dataset)
        (temporary / "toyworld.json").write_text(json.dumps(recipe, indent=1) + "\n")
        (temporary / "split.json").write_text(json.dumps(split) + "\n")  # last: marks the folder complete
        try:
            os.rename(temporary, target)
        except OSError:
            if not _is_complete(target, recipe):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def class_folder(classname: str) -> str:
    """The folder name of a class: its name with spaces as underscores."""
    return classname.replace(" ", "_")


def _write_images(
    images_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, dataset: ToyDataset
) -> list[list]:
    entries = []
    counters: dict[int, int] = {}
    for image, label in zip(images, labels.tolist()):
        classname = dataset.classnames[label]
        index = counters[label] = counters.get(label, -1) + 1
        relpath = f"{split}/{class_folder(classname)}/{index:05d}.png"
        path = images_dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        entries.append([relpath, label, classname])
    return entries


def _is_complete(folder: Path, recipe: dict) -> bool:
    if not (folder / "split.json").is_file():
        if folder.exists():
            raise DataError(
                f"{folder} exists but has no split.json: it is not a complete toy dataset; delete it and re-run"
            )
        return False
    try:
        existing = json.loads((folder / "toyworld.json").read_text())
    except (OSError, ValueError):
        existing = None
    if existing != recipe:
        raise DataError(
            f"{folder} was made with different settings ({_settings(existing)}) than asked for ({_settings(recipe)}); "
            "read it with the settings it was made with (they are dataset options: --option KEY=VALUE, or "
            "--set data.options.KEY=VALUE for train), delete it, or materialize into another root"
        )
    return True


def _settings(recipe) -> str:
    """``n_train_per_class=16, n_val_per_class=4, n_test_per_class=20, seed=0`` of a ``toyworld.json`` record."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("n_per_class"), dict):
        return "unknown settings"
    sizes = [f"n_{split}_per_class={count}" for split, count in recipe["n_per_class"].items()]
    return ", ".join([*sizes, f"seed={recipe.get('seed')}"])
