"""Frozen image features, computed once per run for the methods that train on them.

The linear probe, CLIP-Adapter and Tip-Adapter(-F) never change the CLIP image tower, so each image's feature
can be computed once instead of at every step. Such a method declares what it needs in ``feature_needs``
(:class:`~vlprompt.methods.base.FeatureNeeds`: how many passes over the training images, with or without the
training augmentation); the engine then, through :func:`prepare_features`:

1. encodes the few-shot training images ``views`` times (pass ``p`` draws image ``i``'s augmentation under a seed
   of (run seed, ``p``, ``i``), so the features are the same in every process and on every resume) and the
   validation images once with the test transform;
2. stores them in the run folder, ``features.safetensors`` (float16) with ``features.json`` saying what was
   cached (backbone, images, passes, augmentation, file); a resumed run reads them back instead of encoding again;
3. trains on :class:`FeatureDataset` items — one of the cached views per image and epoch — instead of images.

Features are rounded to float16 before any use, so a fresh and a resumed run see exactly the same values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlprompt.engine.checkpoint import atomic_write_text
from vlprompt.engine.trainer import SeededItems, augmentation_seeds, autocast
from vlprompt.errors import ConfigError

log = logging.getLogger("vlprompt")

FEATURES_FILE = "features.safetensors"
RECORD_FILE = "features.json"
FEATURE_PASS_STAGE = 1 << 20  # the "stage" of the augmentation seeds of feature passes: no training stage uses it


@dataclass
class CachedFeatures:
    """Image features of one run (not normalised; float32 values that are exact float16 numbers).

    ``train``: ``(V, N, D)`` — V passes over the N few-shot training images; ``train_labels``: ``(N,)``;
    ``val``: ``(M, D)`` and ``val_labels``: ``(M,)`` — the validation images, test transform; ``record``: what
    ``features.json`` says.
    """

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    record: dict[str, Any]

    def train_dataset(self) -> "FeatureDataset":
        return FeatureDataset(self.train, self.train_labels)


class FeatureDataset(Dataset):
    """Items ``(feature (D,), label)``: one of the V cached views of image ``i``, drawn from torch's random state.

    The trainer draws every item under a seed of (run seed, stage, epoch, index) (:class:`SeededItems`), so the
    view an epoch uses is reproducible, exactly as a random augmentation of the image would be.
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor):
        self.views, self.labels = views, labels

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int):
        view = int(torch.randint(self.views.shape[0], ())) if self.views.shape[0] > 1 else 0
        return self.views[view, index], int(self.labels[index])


@torch.no_grad()
def encode_images(clip, dataset: Dataset, keys: Sequence, *, batch_size: int, device: torch.device,
                  precision: str, num_workers: int = 0) -> torch.Tensor:
    """``(len(keys), D)`` float32 image features of ``dataset[key]`` for each key, in order."""
    from vlprompt.data import collate_skip_corrupt

    loader = DataLoader(_Keyed(dataset, keys), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_corrupt)
    context = autocast(device, precision)
    out = []
    for batch in loader:
        if batch is not None:
            with context:
                out.append(clip.encode_image(batch[0].to(device)).features.float().cpu())
    features = torch.cat(out) if out else torch.zeros(0, clip.embed_dim)
    if len(features) != len(keys):  # a feature per image or none: labels and views must stay aligned
        raise ConfigError(f"{len(keys) - len(features)} image(s) the cached features need could not be read "
                          "(see the warnings above); fix or remove them first")
    return features


class _Keyed(Dataset):
    def __init__(self, dataset: Dataset, keys: Sequence):
        self.dataset, self.keys = dataset, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, position: int):
        return self.dataset[self.keys[position]]


def prepare_features(needs, clip, train_items: list, val_items: list, *, train_transform, test_transform,
                     seed: int, folder: str | None, batch_size: int, device: torch.device, precision: str,
                     num_workers: int = 0, write: bool = True) -> CachedFeatures:
    """The :class:`CachedFeatures` of a run: read from ``folder`` if it holds those of the same images, passes
    and backbone, else encoded (and written there when ``write``)."""
    from vlprompt.data import ImageDataset

    identity = {
        "backbone": clip.name,
        "train_images": len(train_items),
        "val_images": len(val_items),
        "views": needs.views,
        "augmented": needs.augment,
        "seed": seed,
        "images_sha256": _items_digest(train_items, val_items),
        "train_transform": repr(train_transform) if needs.augment else None,
        "test_transform": repr(test_transform),
    }
    path = os.path.join(folder, FEATURES_FILE) if folder else None
    cached = _read(path, identity) if path else None
    if cached is not None:
        log.info("image features read from %s (%d x %d training, %d validation)", path, needs.views,
                 len(train_items), len(val_items))
        return cached

    options = dict(batch_size=batch_size, device=device, precision=precision, num_workers=num_workers)
    if needs.augment:
        train_set = SeededItems(ImageDataset(train_items, train_transform))
        views = [encode_images(clip, train_set,
                               list(enumerate(augmentation_seeds(seed, (FEATURE_PASS_STAGE, p), len(train_items)))),
                               **options) for p in range(needs.views)]
    else:  # the passes would all be equal: one un-augmented view
        views = [encode_images(clip, ImageDataset(train_items, test_transform), range(len(train_items)), **options)]
    val = encode_images(clip, ImageDataset(val_items, test_transform), range(len(val_items)), **options)
    features = CachedFeatures(
        train=torch.stack(views).half().float(),
        train_labels=torch.tensor([d.label for d in train_items], dtype=torch.long),
        val=val.half().float(),
        val_labels=torch.tensor([d.label for d in val_items], dtype=torch.long),
        record={**identity, "file": FEATURES_FILE, "dtype": "float16", "dim": int(val.shape[-1] if len(val)
                                                                                else views[0].shape[-1])},
    )
    log.info("image features computed: %d pass(es)%s over %d training images, %d validation images",
             len(views), " with the training augmentation" if needs.augment else "", len(train_items),
             len(val_items))
    if path and write:
        _write(path, features)
    return features


def _items_digest(train_items: list, val_items: list) -> str:
    text = "\n".join(f"{d.path}\t{d.label}" for d in [*train_items, None, *val_items] if d is not None)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write(path: str, features: CachedFeatures) -> None:
    from safetensors.torch import save_file

    tensors = {"train": features.train.half().contiguous(), "train_labels": features.train_labels,
               "val": features.val.half().contiguous(), "val_labels": features.val_labels}
    temporary = path + ".tmp"
    save_file(tensors, temporary)
    os.replace(temporary, path)
    atomic_write_text(os.path.join(os.path.dirname(path), RECORD_FILE),
                      json.dumps(features.record, indent=1) + "\n")


def _read(path: str, identity: dict) -> CachedFeatures | None:
    record_path = os.path.join(os.path.dirname(path), RECORD_FILE)
    if not (os.path.isfile(path) and os.path.isfile(record_path)):
        return None
    with open(record_path) as handle:
        record = json.load(handle)
    if {k: record.get(k) for k in identity} != identity:
        log.info("%s holds other images or passes; encoding again", path)
        return None
    from safetensors.torch import load_file

    tensors = load_file(path)
    return CachedFeatures(train=tensors["train"].float(), train_labels=tensors["train_labels"],
                          val=tensors["val"].float(), val_labels=tensors["val_labels"], record=record)
