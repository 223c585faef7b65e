"""Evaluation: the class side is computed once per class set, then test images are streamed through the method.

``method.encode_classes()`` (text features, token sets — whatever the method needs) does not depend on the image,
so it is computed once under ``no_grad`` and passed to every ``method(images, class_side)`` call. Unreadable
images are skipped and counted, never fatal.

Under ``torchrun`` each rank classifies a contiguous shard of the test set and the per-class counts (and the
unreadable images) are gathered, so every rank returns the single-process result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm  # not tqdm.auto: its asyncio class iterates the loader once more on its own

from vlprompt.engine import distributed
from vlprompt.engine.trainer import autocast, log


@dataclass
class EvalResult:
    """Top-1 accuracy (percent) over ``total`` readable test images of ``len(classnames)`` classes.

    ``per_class_accuracy[k]`` is the accuracy on the images of class ``k`` (None if it has no test image);
    ``skipped`` lists the unreadable images that were left out.
    """

    accuracy: float
    correct: int
    total: int
    classnames: list[str]
    per_class_accuracy: list[float | None]
    per_class_total: list[int]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped_images"] = len(self.skipped)
        return data


@torch.no_grad()
def evaluate(
    method,
    test_set: Dataset,
    *,
    batch_size: int = 100,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Top-1 and per-class accuracy of ``method`` (its current class names) on ``test_set``.

    ``test_set`` yields ``(image, label)`` with labels indexing ``method.classnames`` (or None for an unreadable
    image, as :class:`~vlprompt.data.ImageDataset` does).
    """
    from vlprompt.data import collate_skip_corrupt

    device = torch.device(device) if isinstance(device, str) else device
    world = distributed.world()
    started = time.perf_counter()
    num_classes = len(method.classnames)
    correct_per_class = torch.zeros(num_classes, dtype=torch.long)
    total_per_class = torch.zeros(num_classes, dtype=torch.long)
    method.eval()
    context = autocast(device, precision)
    with context:
        class_side = method.encode_classes()
    shard = test_set if world.size == 1 else Subset(test_set, distributed.shard(len(test_set)))
    # A private generator: the loader's worker seeds are not drawn from the global random state.
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator(), collate_fn=collate_skip_corrupt, pin_memory=device.type == "cuda")
    with tqdm(total=len(loader), desc=desc, unit="batch", leave=False, disable=not progress or not world.main,
              dynamic_ncols=True) as bar:
        for batch in loader:
            bar.update()
            if batch is None:
                continue
            images, labels = batch
            with context:
                logits = method(images.to(device, non_blocking=True), class_side)
            hits = (logits.argmax(dim=-1).cpu() == labels).long()
            correct_per_class.index_add_(0, labels, hits)
            total_per_class.index_add_(0, labels, torch.ones_like(labels))
    if world.size > 1:
        correct_per_class, total_per_class = distributed.all_reduce_sum(torch.stack([correct_per_class,
                                                                                    total_per_class]))
    correct, total = int(correct_per_class.sum()), int(total_per_class.sum())
    # each rank read its own shard; shards are contiguous, so rank order is the dataset's order
    skipped = [path for part in distributed.gather_objects(list(getattr(test_set, "skipped", []))) for path in part]
    if skipped:
        log.warning("%s: %d unreadable image(s) skipped, e.g. %s", desc, len(skipped), skipped[0])
    per_class = [100.0 * c / t if t else None for c, t in zip(correct_per_class.tolist(), total_per_class.tolist())]
    return EvalResult(
        accuracy=100.0 * correct / total if total else float("nan"),
        correct=correct,
        total=total,
        classnames=list(method.classnames),
        per_class_accuracy=per_class,
        per_class_total=total_per_class.tolist(),
        skipped=skipped,
        seconds=round(time.perf_counter() - started, 3),
    )
