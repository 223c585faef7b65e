"""Datasets of the CoOp protocol (15 standard + custom), few-shot sampling, base/new classes, transforms.

Typical use::

    splits = build_dataset("oxford_pets", "~/data")                 # exact CoOp train/val/test
    splits = sample_few_shot(splits, shots=16, seed=1)               # Dassl's subset for seed 1
    splits = subsample_classes(splits, "base")                       # base-to-new: first ceil(C/2) classes
    dataset = ImageDataset(splits.train, build_transform(True, 224, mean, std))
"""

from vlprompt.data.base import Counts, DatasetInfo, DatasetSplits, Datum, Layout, git_blob_sha1
from vlprompt.data.fewshot import sample_few_shot, subsample_classes
from vlprompt.data.loading import CorruptImageWarning, ImageDataset, collate_skip_corrupt
from vlprompt.data.registry import available_datasets, build_dataset, dataset_info
from vlprompt.data.transforms import build_transform

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
