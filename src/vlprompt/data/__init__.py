"""Datasets of the CoOp protocol (15 standard + custom), few-shot sampling, base/new classes, transforms.

Typical use::

    splits = build_dataset("oxford_pets", "~/data")                 # exact CoOp train/val/test
    splits = sample_few_shot(splits, shots=16, seed=1)               # Dassl's subset for seed 1
    splits = subsample_classes(splits, "base")                       # base-to-new: first ceil(C/2) classes
    dataset = ImageDataset(splits.train, build_transform(True, 224, mean, std))
"""

from vlprompt.lazy import lazy_exports

# Imported on first use (see vlprompt.lazy), so that importing the package does not import torch.
lazy_exports(__name__, {
    "Counts": "base",
    "DatasetInfo": "base",
    "DatasetSplits": "base",
    "Datum": "base",
    "Layout": "base",
    "git_blob_sha1": "base",
    "sample_few_shot": "fewshot",
    "subsample_classes": "fewshot",
    "CorruptImageWarning": "loading",
    "ImageDataset": "loading",
    "collate_skip_corrupt": "loading",
    "available_datasets": "registry",
    "build_dataset": "registry",
    "dataset_info": "registry",
    "build_transform": "transforms",
})

__all__ = [
    "Counts",
    "CorruptImageWarning",
    "DatasetInfo",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "Layout",
    "available_datasets",
    "build_dataset",
    "build_transform",
    "collate_skip_corrupt",
    "dataset_info",
    "git_blob_sha1",
    "sample_few_shot",
    "subsample_classes",
]
