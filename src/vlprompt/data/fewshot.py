"""Few-shot sampling (identical to Dassl's ``generate_fewshot_dataset``) and base/new class selection.

Same seed, same split -> the same images as the original code: the run seed goes to Python ``random``, NumPy
and torch (Dassl's ``set_random_seed``), the train list is grouped by label in order of first appearance and
``random.sample(items, k)`` draws each class (all items when a class has fewer than k), then the val list is
drawn the same way with ``min(k, 4)`` (not for the ImageNet family). ``random.sample`` depends only on the
group sizes, so drawing indices consumes the random state exactly as drawing the items does. A class with
fewer than k training images keeps all it has, as in Dassl, but never in silence: :func:`sample_few_shot`
warns (:class:`FewShotWarning`) naming those classes and their counts, and :func:`short_classes` gives them
for the run's record.

Subsets are cached as JSON under ``<cache>/fewshot/<dataset>/`` (``<cache>`` = ``$VLPROMPT_CACHE`` or
``~/.cache/vlprompt``), never in the data folder. The file name holds a hash of the split content, k, the seed
and the algorithm, so an edited split or another k can never read a stale subset; a corrupted or tampered
file is ignored (with a warning) and rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import tempfile
import warnings
from typing import Sequence

import numpy as np
import torch

from vlprompt.data.base import DatasetSplits, Datum
from vlprompt.errors import ConfigError

ALGORITHM = "dassl-generate_fewshot_dataset/v1"
CACHE_FORMAT = "vlprompt-fewshot/1"
MAX_VAL_SHOTS = 4


class FewShotWarning(UserWarning):
    """Some classes have fewer training images than the requested shots; they train on all they have."""


def seed_everything(seed: int) -> None:
    """Dassl's ``set_random_seed``: Python ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fewshot_indices(labels: Sequence[int], shots: int) -> list[int]:
    """Dassl's per-class draw on the current ``random`` state, as indices into ``labels``."""
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    chosen: list[int] = []
    for group in groups.values():
        chosen.extend(random.sample(group, shots) if len(group) >= shots else group)
    return chosen


def short_classes(splits: DatasetSplits, shots: int) -> dict[str, int]:
    """``{class name: training images}`` of the classes of ``splits`` with fewer than ``shots`` training images.

    On a k-shot subset these are the counts actually used. Empty when ``shots`` < 1 (everything is kept) or
    there is no training list (test-only datasets). Two labels sharing a name are listed as ``name (label L)``.
    """
    if shots < 1 or not splits.train:
        return {}
    counts = [0] * splits.num_classes
    for item in splits.train:
        counts[item.label] += 1
    shared = {name for name in splits.classnames if splits.classnames.count(name) > 1}
    return {
        (f"{name} (label {label})" if name in shared else name): count
        for label, (name, count) in enumerate(zip(splits.classnames, counts))
        if count < shots
    }


def shortfall_message(splits: DatasetSplits, shots: int, short: dict[str, int], show: int = 10) -> str:
    """One line: how many classes train on fewer than ``shots`` images, and the first ``show`` counts."""
    listed = ", ".join(f"{name} {count}" for name, count in list(short.items())[:show])
    more = f", ... ({len(short) - show} more)" if len(short) > show else ""
    return (f"{splits.name}: {len(short)} of {splits.num_classes} classes have fewer than {shots} training "
            f"images and train on all they have ({listed}{more})")


def default_cache_dir() -> str:
    """``$VLPROMPT_CACHE/fewshot``, else ``~/.cache/vlprompt/fewshot``."""
    base = os.environ.get("VLPROMPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlprompt")
    return os.path.join(base, "fewshot")


def cache_key(splits: DatasetSplits, shots: int, seed: int) -> str:
    """sha256 over everything that determines the subset: the train (and sampled val) items, k, seed."""
    digest = hashlib.sha256(f"{ALGORITHM}\n{shots}\n{seed}\n{splits.sample_val}\n".encode())
    for which in ("train", "val") if splits.sample_val else ("train",):
        digest.update(f"[{which}]\n".encode())
        digest.update("".join(f"{d.path}\t{d.label}\t{d.classname}\n" for d in splits.split(which)).encode())
    return digest.hexdigest()


def cache_file(splits: DatasetSplits, shots: int, seed: int, cache_dir: str | None = None) -> str:
    """Where the subset of (``splits``, ``shots``, ``seed``) is cached."""
    folder = os.path.join(cache_dir or default_cache_dir(), re.sub(r"[^\w.-]", "_", splits.name))
    return os.path.join(folder, f"shot_{shots}-seed_{seed}-{cache_key(splits, shots, seed)[:20]}.json")


def items_to_json(items: Sequence[Datum]) -> list[dict]:
    return [{"path": d.path, "label": d.label, "classname": d.classname} for d in items]


def sample_few_shot(
    splits: DatasetSplits, shots: int, seed: int, cache_dir: str | None = None, *, use_cache: bool = True
) -> DatasetSplits:
    """The k-shot subset of ``splits`` for run seed ``seed`` (test untouched).

    Seeds ``random``, NumPy and torch with ``seed`` first, as Dassl does before building a dataset; ``shots``
    < 1 keeps every item. ``cache_dir`` overrides the default cache folder; ``use_cache=False`` neither reads
    nor writes it. After a cache hit the Python ``random`` state is the freshly seeded one (the draw is not
    replayed), as with Dassl's cached pickles; the NumPy and torch states are the same either way.
    Classes with fewer than ``shots`` training images keep them all and are named in a :class:`FewShotWarning`.
    """
    if isinstance(shots, bool) or not isinstance(shots, int):
        raise ConfigError(f"shots must be an integer, got {shots!r}")
    seed_everything(seed)
    if shots < 1:
        return splits
    path = cache_file(splits, shots, seed, cache_dir) if use_cache else None
    chosen = _read_cache(path, splits, shots, seed) if path and os.path.exists(path) else None
    if chosen is None:
        chosen = {"train": fewshot_indices([d.label for d in splits.train], shots)}
        if splits.sample_val:
            chosen["val"] = fewshot_indices([d.label for d in splits.val], min(shots, MAX_VAL_SHOTS))
        if path:
            _write_cache(path, splits, shots, seed, chosen)
    subset = dataclasses.replace(
        splits,
        train=[splits.train[i] for i in chosen["train"]],
        val=[splits.val[i] for i in chosen["val"]] if "val" in chosen else splits.val,
    )
    short = short_classes(subset, shots)
    if short:
        warnings.warn(shortfall_message(subset, shots, short), FewShotWarning, stacklevel=2)
    return subset


def _read_cache(path: str, splits: DatasetSplits, shots: int, seed: int) -> dict[str, list[int]] | None:
    """The cached indices, or None (with a warning) if the file is unreadable or does not match ``splits``."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        if data["format"] != CACHE_FORMAT or data["key"] != cache_key(splits, shots, seed):
            raise ValueError("key mismatch")
        chosen = {}
        for which in ("train", "val") if splits.sample_val else ("train",):
            source = splits.split(which)
            indices = [entry["index"] for entry in data[which]]
            for index, entry in zip(indices, data[which]):
                item = source[index] if isinstance(index, int) and 0 <= index < len(source) else None
                if item is None or (item.path, item.label, item.classname) != (
                    entry["path"], entry["label"], entry["classname"]
                ):
                    raise ValueError(f"entry {entry!r} is not item {index} of {which}")
            chosen[which] = indices
        if data["checksum"] != _checksum(chosen):
            raise ValueError("checksum mismatch (truncated or edited)")
        return chosen
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"ignoring corrupted few-shot cache file {path} ({error}); sampling again", stacklevel=3)
        return None


def _checksum(chosen: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


def _write_cache(path: str, splits: DatasetSplits, shots: int, seed: int, chosen: dict[str, list[int]]) -> None:
    data = {
        "format": CACHE_FORMAT,
        "key": cache_key(splits, shots, seed),
        "dataset": splits.name,
        "shots": shots,
        "seed": seed,
        "checksum": _checksum(chosen),
    }
    for which, indices in chosen.items():
        source = splits.split(which)
        data[which] = [dict(index=i, **items_to_json([source[i]])[0]) for i in indices]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1)
        os.replace(tmp, path)  # atomic: concurrent runs (DDP ranks) never see half a file
    except OSError as error:
        warnings.warn(f"could not write the few-shot cache {path} ({error}); continuing without it", stacklevel=3)


def subsample_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Base-to-new class selection (CoOp ``OxfordPets.subsample_classes``).

    The labels present in train, sorted (all labels when train is empty, e.g. test-only sets); ``m =
    ceil(n / 2)``; "base" keeps the first m, "new" the rest, "all" everything. Train, val and test are
    filtered by the same selection and relabelled 0..; ``classnames`` follow.
    """
    if which not in ("all", "base", "new"):
        raise ConfigError(f"subsample_classes: which must be 'all', 'base' or 'new', got {which!r}")
    if which == "all":
        return splits
    labels = sorted({d.label for d in splits.train}) or list(range(splits.num_classes))
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if which == "base" else labels[m:]
    relabel = {old: new for new, old in enumerate(selected)}

    def keep(items: list[Datum]) -> list[Datum]:
        return [Datum(d.path, relabel[d.label], d.classname) for d in items if d.label in relabel]

    return dataclasses.replace(
        splits,
        train=keep(splits.train),
        val=keep(splits.val),
        test=keep(splits.test),
        classnames=[splits.classnames[old] for old in selected],
    )
