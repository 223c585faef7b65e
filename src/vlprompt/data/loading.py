"""Reading images for training and evaluation without ever crashing mid-epoch on a corrupt file.

:class:`ImageDataset` returns ``None`` for an image it cannot decode, warns with the path and records it in
a shared-memory flag array (visible from the main process even when DataLoader workers did the reading);
:func:`collate_skip_corrupt` drops those ``None`` items from the batch::

    loader = DataLoader(ImageDataset(splits.test, transform), batch_size=..., collate_fn=collate_skip_corrupt)
    for batch in loader:
        if batch is None:          # every image of this batch was unreadable
            continue
        images, labels = batch     # (B, 3, H, W) float, (B,) int64
    print(loader.dataset.skipped)  # paths skipped so far
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from vlprompt.data.base import Datum

# What PIL raises for a missing, truncated or undecodable file (UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class CorruptImageWarning(UserWarning):
    """An image could not be read and was skipped."""


class ImageDataset(Dataset):
    """``items[i]`` -> ``(transform(RGB image), label)``, or ``None`` if the image cannot be read."""

    def __init__(self, items: Sequence[Datum], transform: Callable | None = None):
        self.items = list(items)
        self.transform = transform
        # Shared memory, so flags set inside DataLoader worker processes are seen by the main process.
        self._unreadable = torch.zeros(len(self.items), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            with Image.open(item.path) as file:
                image = file.convert("RGB")  # decodes fully, so truncated files fail here
        except UNREADABLE as error:
            self._unreadable[index] = True
            warnings.warn(f"skipping unreadable image {item.path}: {error}", CorruptImageWarning, stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, item.label

    @property
    def skipped(self) -> list[str]:
        """Paths of the images found unreadable so far (in any process)."""
        return [self.items[i].path for i in torch.nonzero(self._unreadable).flatten().tolist()]


def collate_skip_corrupt(batch: list):
    """``default_collate`` over the readable items; ``None`` when none of the batch could be read.

    The skipped paths are recorded by :class:`ImageDataset` (``dataset.skipped``) and reported as a
    :class:`CorruptImageWarning` when they are read.
    """
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None
