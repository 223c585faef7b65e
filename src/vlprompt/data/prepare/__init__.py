"""``vlprompt data prepare``: the official archives of a dataset -> the CoOp layout the loaders read, verified.

::

    prepare("dtd", "~/data", ["~/Downloads/dtd-r1.0.1.tar.gz"])   # -> ~/data/dtd/images/..., verified
    prepare("eurosat", "~/data", download=True)                   # fetch from the official host, then the same

How it stays safe to interrupt and to re-run:

1. If the dataset already verifies under ``root`` (prepared before, or put there by hand or by torchvision),
   nothing is done.
2. Everything is built inside ``root/.vlprompt-prepare-<folder>/`` (a sibling of the final folder, so on the
   same file system): archives are extracted there, user folders are hard-linked there (copied across file
   systems), converters write there.
3. The result is verified there with the same checks as ``vlprompt data verify``, a marker file
   ``.vlprompt-prepared.json`` recording what was prepared is added, and the folder is renamed into place in
   one atomic step. Then the temporary folder is removed.

An interrupted run leaves only the temporary folder (it holds a ``.vlprompt-staging`` file saying so); the
next run deletes it and starts again. Nothing outside it is ever deleted or overwritten: an existing,
non-empty dataset folder that does not verify is an error that says what to do. A dataset folder that is a
symbolic link (to an empty folder, or to none yet) is prepared where it points, the temporary folder beside
that.

Archives are extracted by :func:`~vlprompt.data.prepare.files.extract`: a member named with an absolute path or
``..`` is refused, and so is an archive that would unpack to more than :class:`ExtractLimits` allow.

Downloads (``download=True``) go to ``root/downloads/`` through ``*.part`` files, are md5-checked where the
sum is published, and are kept (a re-run uses them). A host that does not answer within ``timeout`` seconds
fails the command with the manual instructions (:func:`instructions`).

Kept as one module (~550 lines) on purpose: the steps of one preparation (find the given files, download what is
missing, build in a staging folder, mark the dataset ready) read top to bottom in the order they run; the file and
recipe details are in
:mod:`~vlprompt.data.prepare.files`, :mod:`~vlprompt.data.prepare.recipes` and :mod:`~vlprompt.data.prepare.convert`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from vlprompt.data.base import read_verified
from vlprompt.data.prepare.convert import Step
from vlprompt.data.prepare.files import (
    NETWORK_ERRORS,
    ExtractLimits,
    describe_network_error,
    extract,
    fetch,
    is_archive,
    link_file,
    link_tree,
    top_level_names,
)
from vlprompt.data.prepare.recipes import RECIPES, Download, Recipe, split_where
from vlprompt.data.registry import dataset_info
from vlprompt.data.standard import BLOBS, USER_SPLIT_SOURCES
from vlprompt.errors import ConfigError, DataError

__all__ = ["RECIPES", "ExtractLimits", "MissingFiles", "PrepareResult", "check", "instructions", "prepare"]

MARKER = ".vlprompt-prepared.json"
STAGING_SENTINEL = ".vlprompt-staging"
DOWNLOADS = "downloads"
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare` did: ``action`` is ``"prepared"``, ``"already prepared"`` (our marker is there),
    ``"already present"`` (verifies, put there some other way) or ``"split file added"``."""

    dataset: str
    folder: str
    action: str
    inputs: tuple[str, ...] = ()


class MissingFiles(DataError):
    """Official files are neither given nor downloadable; ``instructions`` says where to get them."""

    def __init__(self, message: str, instructions: str):
        super().__init__(f"{message}\n{instructions}")
        self.instructions = instructions


@dataclass(frozen=True)
class Input:
    """An official file the user gave (archive, plain file, or the folder it extracts to)."""

    download: Download
    path: str
    is_folder: bool


def recipe_for(name: str) -> Recipe:
    dataset_info(name)  # a ConfigError naming the datasets for an unknown name
    if name not in RECIPES:
        raise ConfigError(
            f"{name!r} has no official archives to prepare; `vlprompt data prepare` handles the standard datasets "
            f"({', '.join(RECIPES)}) and generates the toy ones ({', '.join(_toy_names())})"
        )
    return RECIPES[name]


def _toy_names() -> list[str]:
    from vlprompt.data.toy import TOY_DATASETS

    return [info.name for info in TOY_DATASETS]


def _generate(name: str, root: str) -> PrepareResult:
    """A toy dataset: generated under ``root/<name>`` with the default sizes (deterministic, idempotent)."""
    folder = os.path.join(root, name)
    action = "already prepared" if os.path.isfile(os.path.join(folder, "split.json")) else "generated"
    dataset_info(name).build(root)
    return PrepareResult(name, folder, action)


def check(name: str, root: str) -> list[str]:
    """What ``vlprompt data verify`` would report as wrong with ``name`` under ``root`` ([] when it passes)."""
    info = dataset_info(name)
    try:
        splits = info.build(root)  # missing folder, split file, wrong hash or missing images: DataError
    except DataError as error:
        return [str(error)]
    counts, problems = info.counts, []
    if splits.num_classes != counts.classes:
        problems.append(f"{splits.num_classes} classes, expected {counts.classes}")
    for which in ("train", "val", "test"):
        found, expected = len(splits.split(which)), getattr(counts, which)
        if found != expected:
            problems.append(f"{found} {which} images, expected {expected}")
    return problems


def _layout_path(name: str, root: str) -> str:
    layout = dataset_info(name).layouts[0]
    return os.path.join(root, layout.folder, layout.images).rstrip(os.sep)


def instructions(name: str, root: str = "ROOT", missing: list[str] | None = None) -> str:
    """Exact manual steps for ``name``: what to fetch, from where, where to put it, and the command to run.

    ``missing`` limits the list to those file names (all required files when None).
    """
    recipe = recipe_for(name)
    downloads = os.path.join(root, DOWNLOADS)
    lines = [f"To prepare {name}, fetch:"]
    for d in recipe.downloads:
        if missing is not None and d.filename not in missing and d.instead_of not in missing:
            continue
        facts = ", ".join(x for x in (d.size, f"md5 {d.md5}" if d.md5 else "") if x)
        kind = f"or, instead of {d.instead_of}" if d.instead_of else "required" if d.required else "optional"
        lines.append(f"  - {d.filename} ({kind}{'; ' + facts if facts else ''})")
        if d.url:
            lines.append(f"      {d.url}   (--download fetches it)")
        if d.where:
            lines.append(f"      from {d.where}")
    if recipe.user_split and (missing is None or recipe.user_split in missing):
        lines.append(f"  - {recipe.user_split} (required; vlprompt cannot ship it)")
        lines.append(f"      from {split_where(recipe.user_split)}")
    lines.append(
        f"Put the files into {downloads}{os.sep} and re-run the same command, or pass each with --from "
        "(an archive, or the folder it extracts to):"
    )
    lines.append(f"  vlprompt data prepare --dataset {name} --root {root} --from FILE [--from FILE ...]")
    lines.append(f"Result: {_layout_path(name, root)}{os.sep}... (layout: docs/datasets.md, section {name})")
    if recipe.note:
        lines.append(f"Note: {recipe.note}")
    return "\n".join(lines)


# --- finding the inputs ------------------------------------------------------------------------------------


def _matches_folder(d: Download, folder_name: str) -> bool:
    return d.top is not None and ((d.top and folder_name == d.top) or folder_name in d.folder_names)


def _identify_file(recipe: Recipe, path: str) -> Download | None:
    name = os.path.basename(path)
    for d in recipe.downloads:
        if d.filename == name:
            return d
    if is_archive(path):  # a renamed archive: recognise it by the folder it extracts to
        tops = top_level_names(path)
        for d in recipe.downloads:
            if d.top and (d.top in tops or any(n in tops for n in d.folder_names)):
                return d
    return None


def _expected(recipe: Recipe) -> str:
    names = [d.filename for d in recipe.downloads] + ([recipe.user_split] if recipe.user_split else [])
    folders = [d.top for d in recipe.downloads if d.top] + [n for d in recipe.downloads for n in d.folder_names]
    return f"one of {', '.join(names)} (or the folder it extracts to: {', '.join(dict.fromkeys(folders))})"


def find_inputs(recipe: Recipe, paths: list[str], log: Callable[[str], None]) -> tuple[list[Input], str | None]:
    """Identify each ``--from`` path (by name, or by the folder an archive extracts to); returns the inputs
    and the user-supplied split file. Anything that is not a file of the dataset is a :class:`DataError`."""
    inputs: list[Input] = []
    split: str | None = None

    def add_file(path: str) -> None:
        nonlocal split
        name = os.path.basename(path)
        if recipe.user_split and name == recipe.user_split:
            split = path
        elif name in BLOBS and name not in USER_SPLIT_SOURCES:
            log(f"{path}: not needed, vlprompt ships this file")
        elif (d := _identify_file(recipe, path)) is not None:
            inputs.append(Input(d, path, is_folder=False))
        else:
            raise DataError(f"{path} is not a file of {recipe.dataset}: expected {_expected(recipe)}")

    for given in paths:
        path = os.path.abspath(os.path.expanduser(str(given)))
        if os.path.isfile(path):
            add_file(path)
            continue
        if not os.path.isdir(path):
            raise DataError(f"--from {path}: no such file or folder")
        folder_name = os.path.basename(os.path.normpath(path))
        own = [d for d in recipe.downloads if _matches_folder(d, folder_name)]
        if own:
            inputs.append(Input(own[0], path, is_folder=True))
            continue
        found = False  # a folder holding the downloads, or the folders they extract to
        for child in sorted(os.listdir(path)):
            full = os.path.join(path, child)
            if os.path.isdir(full):
                match = [d for d in recipe.downloads if _matches_folder(d, child)]
                if match:
                    inputs.append(Input(match[0], full, is_folder=True))
                    found = True
            elif any(child == d.filename for d in recipe.downloads) or child == recipe.user_split:
                add_file(full)
                found = True
        if not found:
            raise DataError(f"{path} holds no file of {recipe.dataset}: expected {_expected(recipe)}")

    seen: dict[str, str] = {}
    for item in inputs:
        other = seen.setdefault(item.download.filename, item.path)
        if other != item.path:
            raise DataError(f"two inputs for {item.download.filename}: {other} and {item.path}; pass one")
    return inputs, split


def _missing(recipe: Recipe, inputs: list[Input], split: str | None) -> list[str]:
    given = {i.download.filename for i in inputs} | {i.download.instead_of for i in inputs}
    missing = [d.filename for d in recipe.downloads if d.required and d.filename not in given]
    if recipe.user_split and split is None:
        missing.append(recipe.user_split)
    return missing


def _download_missing(recipe, root, inputs, split, timeout, log) -> None:
    """Fetch every missing required file that has a URL; a manual-only file or a network failure raises
    :class:`MissingFiles` before anything large is fetched, where possible."""
    missing = _missing(recipe, inputs, split)
    plan, manual = [], []
    for filename in missing:
        options = [d for d in recipe.downloads if d.filename == filename or d.instead_of == filename]
        fetchable = [d for d in options if d.url]
        (plan.append(fetchable[0]) if fetchable else manual.append(filename))
    if manual:
        raise MissingFiles(
            f"{', '.join(manual)} cannot be downloaded by a program (login, Google Drive or a dead host)",
            instructions(recipe.dataset, root, missing),
        )
    folder = os.path.join(root, DOWNLOADS)
    os.makedirs(folder, exist_ok=True)
    for d in plan:
        dest = os.path.join(folder, d.filename)
        try:
            fetch(d.url, dest, md5=d.md5, timeout=timeout, log=log)
        except NETWORK_ERRORS as error:
            raise MissingFiles(
                f"could not download {d.filename} from {d.url} ({describe_network_error(error)}); "
                "no network, or the host is gone. Fetch it by hand:",
                instructions(recipe.dataset, root, missing),
            ) from None
        inputs.append(Input(d, dest, is_folder=False))


# --- building the folder -----------------------------------------------------------------------------------


def _staging(root: str, recipe: Recipe) -> str:
    return os.path.join(root, f".vlprompt-prepare-{recipe.folder}")


def _real_target(target: str) -> str:
    """The dataset folder to create: ``target``, or where it points when it is a symbolic link (the result is
    built next to the link's target and renamed onto it, so the link then leads to the dataset)."""
    if not os.path.islink(target):
        return target
    real = os.path.realpath(target)
    if not os.path.isdir(os.path.dirname(real)):
        raise DataError(f"{target} is a symbolic link to {real}, whose parent folder does not exist; create "
                        f"{os.path.dirname(real)} or remove the link")
    if os.path.lexists(real) and not os.path.isdir(real):
        raise DataError(f"{target} is a symbolic link to {real}, which is not a folder; remove the link or "
                        "point it at a folder")
    return real


def _remove_staging(staging: str, strict: bool = True) -> None:
    """Delete a temporary folder left by an earlier run; anything else with its name is not ours to delete."""
    if not os.path.lexists(staging):
        return
    if not os.path.isfile(os.path.join(staging, STAGING_SENTINEL)):
        if not strict:
            return
        raise DataError(
            f"{staging} exists but was not made by vlprompt data prepare (it has no {STAGING_SENTINEL} file); "
            "move it away and re-run"
        )
    shutil.rmtree(staging)


def _descend(content: str) -> str:
    """``X/X/...`` (as some mirrors nest the folder twice, e.g. Kaggle's cars_train/cars_train) -> ``X/X``."""
    name = os.path.basename(content)
    entries = [e for e in os.listdir(content) if not e.startswith((".", "__MACOSX"))]
    if entries == [name] and os.path.isdir(os.path.join(content, name)):
        return os.path.join(content, name)
    return content


class _Builder:
    """Fills ``dataset_dir`` (inside the temporary folder) from the inputs, following the recipe."""

    def __init__(self, recipe: Recipe, dataset_dir: str, work: str, inputs: list[Input], log,
                 limits: ExtractLimits):
        self.recipe, self.dataset_dir, self.work, self.log, self.limits = recipe, dataset_dir, work, log, limits
        self.others = {i.download.filename: i.path for i in inputs}

    def content(self, item: Input) -> tuple[str, bool]:
        """(path of the content under the archive's top folder, whether it belongs to the user)."""
        d = item.download
        if d.top is None or item.is_folder:
            return (_descend(item.path) if item.is_folder else item.path), True
        if not is_archive(item.path):
            raise DataError(
                f"{item.path} is not an archive Python can read; extract it yourself and pass the folder "
                f"{d.top or d.folder_names[0]}/ with --from"
            )
        self.log(f"extracting {item.path}")
        out = os.path.join(self.work, d.filename)
        extract(item.path, out, self.log, limits=self.limits, md5=d.md5, size=d.size)
        content = os.path.join(out, d.top)
        if not os.path.isdir(content):
            found = ", ".join(sorted(os.listdir(out))[:5]) or "nothing"
            raise DataError(
                f"{item.path} does not hold the folder {d.top}/ that the official {d.filename} extracts to "
                f"(found: {found}); is it the right file?"
            )
        return _descend(content), False

    def put(self, source: str, target: str, users: bool) -> None:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.lexists(target):
            raise DataError(f"two inputs provide {os.path.relpath(target, self.dataset_dir)}; pass one of them")
        if not users:
            os.rename(source, target)  # inside the temporary folder: cheap
        elif os.path.isdir(source):
            link_tree(source, target)
        else:
            link_file(source, target)

    def add(self, item: Input) -> None:
        d = item.download
        if d.convert is not None:
            self.log(f"converting {item.path}")
            d.convert(Step(item.path, item.is_folder, self.dataset_dir, self.work, self.others, self.log,
                           self.limits))
            return
        if not (d.place or d.nested):
            return  # read by a converter (the ImageNet devkit)
        content, users = self.content(item)
        if d.nested:
            inner = self.recipe.download(d.instead_of)
            path = os.path.join(content, d.nested)
            if not os.path.exists(path) and os.path.isdir(os.path.join(content, inner.top)):
                path = os.path.join(content, inner.top)  # a user's folder with the inner archive extracted
            if not os.path.exists(path):
                raise DataError(f"{item.path} does not hold {d.nested}, which the official {d.filename} holds")
            self.add(Input(inner, path, os.path.isdir(path)))
            return
        for source, target in d.place:
            path = os.path.normpath(os.path.join(content, source))
            if not os.path.exists(path):
                raise DataError(
                    f"{item.path} has no {os.path.join(d.top or '', source).rstrip('/')} "
                    f"(the official {d.filename} has); is it the right file?"
                )
            self.put(path, os.path.normpath(os.path.join(self.dataset_dir, target)), users)


def _order(item: Input) -> int:
    """Inputs that become the whole dataset folder go first; the others are placed inside it."""
    return 0 if any(target == "" for _, target in item.download.place) else 1


def _write_marker(dataset_dir: str, name: str, inputs: list[Input], split: str | None) -> None:
    from vlprompt import __version__

    record = {
        "dataset": name,
        "prepared_by": f"vlprompt {__version__}",
        "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [
            {"file": i.download.filename, "path": i.path,
             "bytes": None if i.is_folder else os.path.getsize(i.path)}
            for i in inputs
        ] + ([{"file": os.path.basename(split), "path": split, "bytes": os.path.getsize(split)}] if split else []),
    }
    with open(os.path.join(dataset_dir, MARKER), "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1)
        file.write("\n")


def _located(name: str, root: str) -> str | None:
    """The dataset folder of the first layout of ``name`` present under ``root`` (as the loader finds it)."""
    for layout in dataset_info(name).layouts:
        if os.path.isdir(os.path.join(root, layout.folder, layout.images)):
            return os.path.join(root, layout.folder)
    return None


def _read_split(recipe: Recipe, split: str) -> bytes:
    with open(split, "rb") as file:
        content = file.read()
    return read_verified(
        content, BLOBS[recipe.user_split], split,
        f"Use the official CoOp file from {split_where(recipe.user_split)}.",
    )


def prepare(
    name: str,
    root: str,
    sources: list[str] | tuple[str, ...] = (),
    *,
    download: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    log: Callable[[str], None] | None = None,
    limits: ExtractLimits = ExtractLimits(),
) -> PrepareResult:
    """Arrange dataset ``name`` under data root ``root`` from its official files, verified.

    ``sources`` are the official archives, plain files, split file, or folders (the folder an archive extracts
    to, or a folder holding the downloads); files already in ``root/downloads/`` are used too. ``download``
    fetches missing files whose host still serves them (``timeout`` seconds per network wait); ``limits``
    bounds what each archive may unpack to (:class:`ExtractLimits`). A toy dataset is generated instead
    (nothing to fetch). Raises :class:`MissingFiles` (with :func:`instructions`) when files are missing,
    :class:`DataError` for a wrong or damaged file, naming it and what was expected. Safe to interrupt and
    re-run (see the module docs).
    """
    log = log or (lambda message: None)
    root = os.path.abspath(os.path.expanduser(str(root)))
    if name in _toy_names():
        return _generate(name, root)
    recipe = recipe_for(name)
    target = _real_target(os.path.join(root, recipe.folder))
    staging = _staging(os.path.dirname(target), recipe)
    downloads = os.path.join(root, DOWNLOADS)
    kept = [os.path.join(downloads, f) for f in sorted(os.listdir(downloads))] if os.path.isdir(downloads) else []
    inputs, split = find_inputs(recipe, list(sources), log)
    given = {i.download.filename for i in inputs} | {i.download.instead_of for i in inputs}
    for path in kept:  # earlier downloads, unless given explicitly
        filename = os.path.basename(path)
        if filename == recipe.user_split and split is None:
            split = path
        elif filename not in given and any(d.filename == filename for d in recipe.downloads):
            inputs.append(Input(recipe.download(filename), path, is_folder=False))
    if split is not None:
        _read_split(recipe, split)  # a wrong split file fails now, before any extraction

    problems = check(name, root)
    existing = _located(name, root)
    if not problems:
        _remove_staging(staging, strict=False)
        action = "already prepared" if os.path.isfile(os.path.join(existing, MARKER)) else "already present"
        return PrepareResult(name, existing, action)
    if existing is not None and recipe.user_split and split is not None:
        placed = os.path.join(existing, recipe.user_split)
        if not os.path.exists(placed):  # e.g. torchvision's food-101/ without CoOp's split: just add the split
            partial = placed + ".vlprompt-tmp"
            shutil.copyfile(split, partial)
            os.replace(partial, placed)
            problems = check(name, root)
            if not problems:
                return PrepareResult(name, existing, "split file added", (split,))
    if os.path.isdir(target) and os.listdir(target):
        marker = os.path.join(target, MARKER)
        earlier = " (it was prepared by vlprompt, then changed)" if os.path.isfile(marker) else ""
        raise DataError(
            f"{target} exists but is not a complete {name}{earlier}: {problems[0]}\n"
            f"vlprompt never overwrites or deletes your files: move it away (mv {target} {target}.old) and "
            f"re-run; archives or folders inside it can be passed with --from"
        )

    if download:
        os.makedirs(root, exist_ok=True)
        _download_missing(recipe, root, inputs, split, timeout, log)
    missing = _missing(recipe, inputs, split)
    if missing:
        raise MissingFiles(f"{name} is not under {root} and these files are missing: {', '.join(missing)}",
                           instructions(name, root, missing))

    _remove_staging(staging)
    os.makedirs(staging)  # and the data root with it
    with open(os.path.join(staging, STAGING_SENTINEL), "w") as file:
        file.write("temporary folder of `vlprompt data prepare`; an interrupted run left it, the next run "
                   "deletes it. Safe to delete.\n")
    staged_root = os.path.join(staging, "root")
    dataset_dir = os.path.join(staged_root, recipe.folder)
    builder = _Builder(recipe, dataset_dir, os.path.join(staging, "work"), inputs, log, limits)
    try:
        for item in sorted(inputs, key=_order):
            builder.add(item)
        os.makedirs(dataset_dir, exist_ok=True)
        if split is not None:
            shutil.copyfile(split, os.path.join(dataset_dir, recipe.user_split))
        _write_marker(dataset_dir, name, inputs, split)
    except OSError as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"preparing {name} in {staging} failed: {error}; fix the cause (disk space?) and "
                        "re-run, which starts again from the archives") from None
    staged_problems = check(name, staged_root)
    if staged_problems:
        raise DataError(
            f"the given files do not make a complete {name}: {staged_problems[0]}\n"
            f"(the result is kept for inspection in {dataset_dir}; the next run deletes it)"
        )
    log(f"moving the result to {target}")
    os.rename(dataset_dir, target)  # atomic; replaces at most an empty folder
    shutil.rmtree(staging)
    return PrepareResult(name, target, "prepared", tuple(i.path for i in inputs))
