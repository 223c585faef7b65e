"""User datasets, usable by every protocol through the registry without code edits.

``custom_folder``  root = a folder with one sub-folder of images per class (or ``train/``, ``test/`` and
                   optionally ``val/`` folders, each with one sub-folder per class).
``custom_csv``     root = a CSV file of ``path,label[,split]`` rows, paths relative to the CSV's folder.
``split_json``     root = an image folder, ``split_file`` = a CoOp-format split JSON
                   ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}``.

Without explicit splits, each class's images (sorted by path) are shuffled with ``random.Random(split_seed)``
and cut into train / val / test by ``split_fractions`` (CoOp's DTD-style 50 % / 20 % / 30 % by default).
"""

from __future__ import annotations

import csv
import os
import random
from typing import Sequence

from vlprompt.data.base import (
    DOCS_HINT,
    IMAGE_EXTENSIONS,
    DatasetInfo,
    DatasetSplits,
    Datum,
    check_files_exist,
    classnames_from_items,
    git_blob_sha1,
    items_from_split,
    list_images,
    path_under,
    list_subfolders,
    parse_split_json,
    to_datums,
)
from vlprompt.data.templates import template_for
from vlprompt.errors import ConfigError, DataError

SPLIT_FOLDERS = ("train", "val", "test")


def split_by_class(
    items: Sequence[Datum], num_classes: int, fractions: Sequence[float], seed: int, what: str
) -> tuple[list[Datum], list[Datum], list[Datum]]:
    """Deterministic per-class train/val/test split.

    Per class (in label order) the items, sorted by path, are shuffled by one ``random.Random(seed)``;
    ``n_train = round(n * fractions[0])`` and ``n_val = round(n * fractions[1])`` (each at least 1), the rest is
    test (at least 1, taken from train if needed). A class needs 3 images.
    """
    if len(fractions) != 2 or not all(0 < f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ConfigError(
            f"split_fractions must be (train, val) fractions in (0, 1) with sum < 1, got {tuple(fractions)}"
        )
    by_label: list[list[Datum]] = [[] for _ in range(num_classes)]
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    train, val, test = [], [], []
    for group in by_label:
        if len(group) < 3:
            name = group[0].classname if group else "?"
            raise DataError(
                f"{what}: class {name!r} has {len(group)} images; an automatic train/val/test split needs at "
                f"least 3 per class (or give the splits explicitly; {DOCS_HINT})"
            )
        group = sorted(group, key=lambda d: d.path)
        rng.shuffle(group)
        n = len(group)
        n_train, n_val = max(1, round(n * fractions[0])), max(1, round(n * fractions[1]))
        while n - n_train - n_val < 1:
            n_train -= 1
        train += group[:n_train]
        val += group[n_train:n_train + n_val]
        test += group[n_train + n_val:]
    return train, val, test


def _template(info: DatasetInfo, template: str | None) -> str:
    if template is None:
        return template_for(info.name)
    if template.count("{}") != 1:
        raise ConfigError(f"template must contain exactly one '{{}}' for the class name, got {template!r}")
    return template


def read_folder_classnames(path: str, folders: list[str]) -> dict[str, str]:
    """``classnames.txt``: lines ``<folder> [class name]``; unlisted folders keep their folder name."""
    names = {folder: folder for folder in folders}
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            folder, _, name = line.strip().partition(" ")
            if folder not in names:
                raise DataError(f"{path} names class folder {folder!r}, which does not exist")
            names[folder] = name.strip() or folder
    return names


def build_custom_folder(
    info: DatasetInfo,
    root: str,
    *,
    classnames_file: str | None = None,
    split_fractions: Sequence[float] = (0.5, 0.2),
    split_seed: int = 0,
    template: str | None = None,
    check_files: bool = True,
) -> DatasetSplits:
    """One sub-folder of images per class; labels follow the sorted folder names.

    ``classnames_file`` defaults to ``root/classnames.txt`` when present. With ``train/`` and ``test/``
    folders (``val/`` optional; missing val = test, as for ImageNet) those define the splits and the classes
    are ``train/``'s sub-folders; otherwise :func:`split_by_class` splits each class.
    ``check_files`` is accepted for a uniform interface: images are listed from disk.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(f"custom_folder: {root} does not exist or is not a folder ({DOCS_HINT})")
    has_splits = os.path.isdir(os.path.join(root, "train"))
    if has_splits and not os.path.isdir(os.path.join(root, "test")):
        raise DataError(f"custom_folder: {root} has train/ but no test/ folder; add test/ ({DOCS_HINT})")
    class_root = os.path.join(root, "train") if has_splits else root
    folders = list_subfolders(class_root)
    if not folders:
        raise DataError(f"custom_folder: {class_root} has no class sub-folders ({DOCS_HINT})")
    label_of = {folder: label for label, folder in enumerate(folders)}
    if classnames_file is not None and not os.path.isfile(classnames_file):
        raise DataError(f"custom_folder: class-name file {classnames_file} does not exist")
    default_file = os.path.join(root, "classnames.txt")
    classnames_file = classnames_file or (default_file if os.path.isfile(default_file) else None)
    names = read_folder_classnames(classnames_file, folders) if classnames_file else {f: f for f in folders}
    classnames = [names[folder] for folder in folders]

    def read(folder: str, required: bool) -> list[Datum]:
        items = []
        for class_folder in list_subfolders(folder):
            if class_folder not in label_of:
                raise DataError(f"custom_folder: {os.path.join(folder, class_folder)} is not a class of {class_root}")
            class_dir = os.path.join(folder, class_folder)
            files = list_images(class_dir, IMAGE_EXTENSIONS)
            if not files and required:
                raise DataError(
                    f"custom_folder: class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add images or remove the folder"
                )
            label = label_of[class_folder]
            items.extend(Datum(os.path.join(class_dir, f), label, classnames[label]) for f in files)
        return items

    if has_splits:
        train = read(class_root, required=True)
        test = read(os.path.join(root, "test"), required=False)
        val_dir = os.path.join(root, "val")
        val = read(val_dir, required=False) if os.path.isdir(val_dir) else list(test)
    else:
        train, val, test = split_by_class(
            read(root, required=True), len(folders), split_fractions, split_seed, f"custom_folder {root}"
        )
    return DatasetSplits(info.name, train, val, test, classnames, _template(info, template))


def build_custom_csv(
    info: DatasetInfo,
    root: str,
    *,
    classnames_file: str | None = None,
    split_fractions: Sequence[float] = (0.5, 0.2),
    split_seed: int = 0,
    template: str | None = None,
    check_files: bool = True,
) -> DatasetSplits:
    """A CSV of ``path,label[,split]`` rows (an optional header row starts with ``path``).

    Paths are relative to the CSV's folder and stay inside it (no absolute paths, no ``../``). Labels are
    integers 0..C-1, or class names (then labels follow the sorted names). ``classnames_file`` has one class
    name per line: line i names label i (integer labels) or fixes the label order (name labels). ``split`` is
    train / val / test (no val rows: val = test); without a split column :func:`split_by_class` splits each
    class.
    """
    csv_path = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isfile(csv_path):
        raise DataError(f"custom_csv: CSV file {csv_path} does not exist ({DOCS_HINT})")
    base = os.path.dirname(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as file:
        rows = [[cell.strip() for cell in row] for row in csv.reader(file) if row and any(c.strip() for c in row)]
    if rows and rows[0][0].lower() == "path":
        rows = rows[1:]
    if not rows:
        raise DataError(f"custom_csv: {csv_path} has no rows")
    widths = {len(row) for row in rows}
    if not widths <= {2, 3} or len(widths) != 1:
        raise DataError(f"custom_csv: every row of {csv_path} must be path,label or path,label,split")
    with_split = widths == {3}

    listed = None
    if classnames_file is not None:
        if not os.path.isfile(classnames_file):
            raise DataError(f"custom_csv: class-name file {classnames_file} does not exist")
        with open(classnames_file, encoding="utf-8") as file:
            listed = [line.strip() for line in file if line.strip()]
    raw_labels = [row[1] for row in rows]
    if all(label.lstrip("-").isdigit() for label in raw_labels):
        labels = [int(label) for label in raw_labels]
        num_classes = len(listed) if listed is not None else max(labels) + 1
        bad = sorted({label for label in labels if not 0 <= label < num_classes})
        if bad:
            raise DataError(f"custom_csv: labels {bad[:5]} are outside 0..{num_classes - 1}")
        classnames = listed if listed is not None else [str(i) for i in range(num_classes)]
    else:
        classnames = listed if listed is not None else sorted(set(raw_labels))
        label_of = {name: label for label, name in enumerate(classnames)}
        unknown = sorted(set(raw_labels) - set(label_of))
        if unknown:
            raise DataError(f"custom_csv: classes {unknown[:5]} are not in {classnames_file}")
        labels = [label_of[name] for name in raw_labels]

    items = [Datum(path_under(base, row[0], f"custom_csv {csv_path}"), label, classnames[label])
             for row, label in zip(rows, labels)]
    if with_split:
        by_split: dict[str, list[Datum]] = {name: [] for name in SPLIT_FOLDERS}
        for row, item in zip(rows, items):
            split = row[2].lower()
            if split not in by_split:
                raise DataError(f"custom_csv: split {row[2]!r} of {row[0]} must be train, val or test")
            by_split[split].append(item)
        train, val, test = by_split["train"], by_split["val"] or list(by_split["test"]), by_split["test"]
    else:
        train, val, test = split_by_class(items, len(classnames), split_fractions, split_seed, f"custom_csv {csv_path}")
    splits = DatasetSplits(info.name, train, val, test, list(classnames), _template(info, template))
    if check_files:
        check_files_exist(info.name, (splits.train, splits.val, splits.test))
    return splits


def build_split_json(
    info: DatasetInfo,
    root: str,
    *,
    split_file: str | None = None,
    git_blob: str | None = None,
    template: str | None = None,
    check_files: bool = True,
) -> DatasetSplits:
    """A CoOp-format split JSON (``split_file``) whose paths are relative to the image folder ``root``.

    ``git_blob``, when given, is the file's expected ``git hash-object`` id; a different file is an error.
    """
    if split_file is None:
        raise ConfigError("split_json needs the option split_file=PATH (a CoOp-format split JSON)")
    image_dir = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(image_dir):
        raise DataError(f"split_json: image folder {image_dir} does not exist ({DOCS_HINT})")
    split_file = os.path.abspath(os.path.expanduser(str(split_file)))
    if not os.path.isfile(split_file):
        raise DataError(f"split_json: split file {split_file} does not exist")
    with open(split_file, "rb") as file:
        content = file.read()
    if git_blob is not None and git_blob_sha1(content) != git_blob:
        raise DataError(
            f"split_json: {split_file} has git blob id {git_blob_sha1(content)}, expected {git_blob}"
        )
    split = parse_split_json(content, split_file)
    train, val, test = (items_from_split(split[key], image_dir, split_file) for key in SPLIT_FOLDERS)
    classnames = classnames_from_items(train, val, test, what=split_file)
    splits = DatasetSplits(
        info.name, to_datums(train, classnames), to_datums(val, classnames), to_datums(test, classnames),
        classnames, _template(info, template),
    )
    if check_files:
        check_files_exist(info.name, (splits.train, splits.val, splits.test))
    return splits


CUSTOM_DATASETS: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        "custom_folder", "CustomFolder", build_custom_folder,
        split_source="train/ val/ test/ folders, or a seeded per-class 50/20/30 split",
    ),
    DatasetInfo(
        "custom_csv", "CustomCSV", build_custom_csv,
        split_source="split column of the CSV, or a seeded per-class 50/20/30 split",
    ),
    DatasetInfo("split_json", "SplitJSON", build_split_json, split_source="split_file option (CoOp format)"),
)
