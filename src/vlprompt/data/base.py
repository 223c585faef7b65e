"""The data types every dataset produces, and the file checks they share.

A dataset is read into a :class:`DatasetSplits`: three lists of :class:`Datum` (absolute image path, integer
label, class name), the class names indexed by label, and the dataset's zero-shot template. Everything after
that (few-shot sampling, base/new class selection, loading images) works on these plain lists, so a custom
dataset is a first-class citizen as soon as it produces one.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Iterable, Sequence

from vlprompt.errors import ConfigError, DataError

DOCS_HINT = "see docs/datasets.md in the vlprompt repository"

# File types read by the custom datasets (the standard datasets list their files explicitly).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True, slots=True)
class Datum:
    """One labelled image: ``path`` is absolute, ``label`` indexes ``DatasetSplits.classnames``."""

    path: str
    label: int
    classname: str


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset ready for a protocol.

    ``classnames[label]`` names each label (two labels may share a name, as ImageNet's "missile" does).
    ``template`` is the zero-shot prompt template (``"a photo of a {}."``-style). ``sample_val`` says whether
    :func:`~vlprompt.data.sample_few_shot` also draws a ``min(k, 4)``-shot val set; it is False for the
    ImageNet family, whose val set is its test set, as in CoOp.
    """

    name: str
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]
    template: str
    sample_val: bool = field(default=True)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, which: str) -> list[Datum]:
        """The list named ``which`` ("train", "val" or "test")."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"unknown split {which!r}; expected 'train', 'val' or 'test'")
        return getattr(self, which)


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files sit under the data root.

    ``folder`` (relative to the root) holds split and metadata files; ``images`` (relative to ``folder``,
    ``""`` for the folder itself) is the directory the split's relative image paths are joined to.
    ``origin`` says which download produces it ("CoOp", "torchvision", "archive").
    """

    folder: str
    images: str
    origin: str


@dataclass(frozen=True)
class Counts:
    """Expected number of images per split and of classes."""

    train: int
    val: int
    test: int
    classes: int


@dataclass(frozen=True)
class DatasetInfo:
    """A registry entry: :meth:`build` reads the dataset under a data root into a :class:`DatasetSplits`.

    ``builder(info, root, **builder_options, **user_options)`` does the reading; its keyword-only parameters
    not fixed by ``builder_options`` are the options users may pass. ``layouts`` are tried in order (the first
    is CoOp's); ``counts`` are what ``vlprompt data verify`` expects (None for custom data).
    """

    name: str
    title: str
    builder: Callable[..., DatasetSplits]
    builder_options: dict = field(default_factory=dict, hash=False)
    layouts: tuple[Layout, ...] = ()
    counts: Counts | None = None
    split_source: str = ""
    download: str = ""

    def options(self) -> list[str]:
        """Names of the options :meth:`build` accepts."""
        parameters = inspect.signature(self.builder).parameters.values()
        return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in self.builder_options]

    def build(self, root: str, **options) -> DatasetSplits:
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            raise ConfigError(
                f"dataset {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(self.options()) or 'none'}"
            )
        return self.builder(self, root, **self.builder_options, **options)


def git_blob_sha1(content: bytes) -> str:
    """The id ``git hash-object`` gives ``content``: sha1 of ``b"blob <size>\\0" + content``."""
    digest = hashlib.sha1(b"blob %d\0" % len(content))
    digest.update(content)
    return digest.hexdigest()


def read_packaged(filename: str) -> bytes:
    """Bytes of a file shipped in ``vlprompt/data/splits/`` (``.gz`` files are decompressed)."""
    resource = resources.files("vlprompt.data").joinpath("splits", filename)
    data = resource.read_bytes()
    return gzip.decompress(data) if filename.endswith(".gz") else data


def read_verified(content: bytes, blob: str, what: str, fix: str) -> bytes:
    """Return ``content`` if its git blob id is ``blob``; otherwise a :class:`DataError` naming ``what``."""
    actual = git_blob_sha1(content)
    if actual != blob:
        raise DataError(f"{what} is not the official file: its git blob id is {actual}, expected {blob}. {fix}")
    return content


def path_under(folder: str, relpath: str, what: str) -> str:
    """``folder/relpath`` as an absolute path; a ``relpath`` that is absolute or leaves ``folder`` (``../``) is a
    :class:`DataError` (a split file lists images inside its image folder, nothing else)."""
    folder = os.path.abspath(folder)
    path = os.path.abspath(os.path.join(folder, relpath))
    if os.path.isabs(relpath) or not path.startswith(folder.rstrip(os.sep) + os.sep):
        raise DataError(f"{what}: image path {relpath!r} is absolute or leaves the image folder {folder}; "
                        "paths must be relative to it and stay inside it")
    return path


def items_from_split(entries: Sequence, image_dir: str, what: str) -> list[tuple[str, int, str]]:
    """Validate CoOp split entries ``[relpath, label, classname]`` and join the paths to ``image_dir`` (each
    must stay inside it: :func:`path_under`)."""
    out = []
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise DataError(f"{what}: each item must be [relative path, label, class name], got {entry!r}")
        relpath, label, classname = entry
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise DataError(f"{what}: label {label!r} of {relpath!r} is not an integer") from None
        out.append((path_under(image_dir, str(relpath), what), label, str(classname)))
    return out


def parse_split_json(content: bytes, what: str) -> dict[str, list]:
    """The ``{"train": [...], "val": [...], "test": [...]}`` object of a CoOp split file."""
    try:
        split = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{what} is not valid JSON ({error})") from None
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val", "test")):
        raise DataError(f'{what} must be a JSON object with lists "train", "val" and "test"')
    return split


def classnames_from_items(*lists: Iterable[tuple[str, int, str]], what: str) -> list[str]:
    """``classnames[label]`` from (path, label, name) triples; labels must be 0..C-1 with one name each."""
    names: dict[int, str] = {}
    for items in lists:
        for path, label, name in items:
            if names.setdefault(label, name) != name:
                raise DataError(f"{what}: label {label} is named both {names[label]!r} and {name!r}")
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{what}: labels must be 0..C-1 without gaps, got {sorted(names)[:10]}...")
    return [names[label] for label in range(len(names))]


def to_datums(items: Iterable[tuple[str, int, str]], classnames: Sequence[str]) -> list[Datum]:
    """Datums whose class names come from ``classnames`` (where the name fixes are applied)."""
    return [Datum(path, label, classnames[label]) for path, label, _ in items]


def missing_files(paths: Iterable[str]) -> list[str]:
    """The paths that do not exist (a cheap ``os.path.exists`` pass; images are not opened)."""
    return [path for path in paths if not os.path.exists(path)]


def check_files_exist(name: str, lists: Sequence[Sequence[Datum]], show: int = 5) -> None:
    """Raise a :class:`DataError` listing the first ``show`` missing images and how many are missing."""
    seen: set[str] = set()
    paths = [d.path for items in lists for d in items if not (d.path in seen or seen.add(d.path))]
    missing = missing_files(paths)
    if missing:
        listed = ", ".join(missing[:show])
        raise DataError(
            f"{name}: {len(missing)} of {len(paths)} images listed in the split are missing (first: {listed}); "
            f"check the folder layout ({DOCS_HINT}) or pass check_files=False to skip this check"
        )


def list_images(folder: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Sorted non-hidden file names in ``folder`` (only ``extensions``, case-insensitive, when given)."""
    names = [
        entry.name
        for entry in os.scandir(folder)
        if not entry.name.startswith(".") and entry.is_file()
        and (extensions is None or entry.name.lower().endswith(extensions))
    ]
    return sorted(names)


def list_subfolders(folder: str) -> list[str]:
    """Sorted non-hidden sub-folder names of ``folder``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
