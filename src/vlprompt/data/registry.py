"""The dataset registry: names -> :class:`~vlprompt.data.base.DatasetInfo` (a table, not import side effects)."""

from __future__ import annotations

from vlprompt.data.base import DatasetInfo, DatasetSplits
from vlprompt.data.custom import CUSTOM_DATASETS
from vlprompt.data.standard import STANDARD_DATASETS
from vlprompt.data.toy import TOY_DATASETS
from vlprompt.errors import ConfigError

REGISTRY: dict[str, DatasetInfo] = {
    info.name: info for info in STANDARD_DATASETS + CUSTOM_DATASETS + TOY_DATASETS
}


def available_datasets() -> list[str]:
    """The 15 standard dataset names (CoOp order), then ``custom_folder``, ``custom_csv``, ``split_json``, then the
    bundled toy-world datasets (``toy_objects``, …)."""
    return list(REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name`` (layouts, expected counts, split source, download hint)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(REGISTRY)}") from None


def build_dataset(name: str, root: str, **options) -> DatasetSplits:
    """Read dataset ``name`` under the data root ``root`` into train/val/test lists.

    Standard datasets live in ``root/<dataset folder>/`` (CoOp or torchvision layout, see docs/datasets.md)
    and take ``check_files`` (default True: every image listed in the split must exist). Custom datasets take
    their own options (see :mod:`vlprompt.data.custom`); an unknown option is a :class:`ConfigError`.
    """
    return dataset_info(name).build(root, **options)
