"""Transforms, image loading, and skipping corrupt images without crashing an epoch."""

from __future__ import annotations

import pytest
import torch
from conftest_data import image_bytes, write_files
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from vlprompt.data import CorruptImageWarning, Datum, ImageDataset, build_transform, collate_skip_corrupt

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def make_items(tmp_path, n=6, corrupt=()):
    items = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        data = b"definitely not a JPEG" if i in corrupt else image_bytes("JPEG", size=40)
        write_files([str(path)], data)
        items.append(Datum(str(path), i % 3, f"c{i % 3}"))
    return items


def test_test_transform_is_resize_center_crop():
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    tensor = build_transform(False, 32, MEAN, STD)(image)
    reference = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(MEAN, STD)])(image)
    assert tensor.shape == (3, 32, 32) and torch.equal(tensor, reference)
    pixel = torch.tensor([10, 200, 30]) / 255
    assert torch.allclose(tensor[:, 16, 16], (pixel - torch.tensor(MEAN)) / torch.tensor(STD), atol=1e-5)


def test_train_transform_components():
    transform = build_transform(True, 24, MEAN, STD)
    crop, flip = transform.transforms[1], transform.transforms[2]
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (24, 24) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    torch.manual_seed(0)
    first = transform(Image.new("RGB", (50, 40), 90))
    assert first.shape == (3, 24, 24) and first.dtype == torch.float32


@pytest.mark.parametrize("mode, suffix", [("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg")])
def test_any_mode_becomes_rgb(tmp_path, mode, suffix):
    path = tmp_path / f"img.{suffix}"
    Image.new(mode, (8, 8)).save(path)
    image, label = ImageDataset([Datum(str(path), 2, "x")], build_transform(False, 8, MEAN, STD))[0]
    assert image.shape == (3, 8, 8) and label == 2
    assert build_transform(True, 8, MEAN, STD)(Image.open(path)).shape == (3, 8, 8)


def test_corrupt_and_missing_images_are_skipped(tmp_path):
    items = make_items(tmp_path, corrupt={1})
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(image_bytes("JPEG", size=64)[:200])
    items += [Datum(str(truncated), 0, "c0"), Datum(str(tmp_path / "gone.jpg"), 1, "c1")]
    dataset = ImageDataset(items, build_transform(False, 16, MEAN, STD))
    with pytest.warns(CorruptImageWarning, match="1.jpg"):
        assert dataset[1] is None
    with pytest.warns(CorruptImageWarning, match="truncated.jpg"):
        assert dataset[6] is None
    with pytest.warns(CorruptImageWarning, match="gone.jpg"):
        assert dataset[7] is None
    assert dataset.skipped == [items[1].path, str(truncated), str(tmp_path / "gone.jpg")]
    assert dataset[0][0].shape == (3, 16, 16)


def test_collate_skip_corrupt():
    image = torch.zeros(3, 4, 4)
    images, labels = collate_skip_corrupt([(image, 1), None, (image + 1, 2)])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [1, 2]
    assert collate_skip_corrupt([None, None]) is None


def test_dataloader_with_workers_reports_skips(tmp_path):
    items = make_items(tmp_path, n=8, corrupt={2, 5})
    dataset = ImageDataset(items, build_transform(False, 16, MEAN, STD))
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_skip_corrupt)
    batches = list(loader)  # the workers warn on their stderr; the flags reach the main process
    assert [len(labels) for _, labels in batches] == [3, 3]
    assert torch.cat([labels for _, labels in batches]).tolist() == [d.label for i, d in enumerate(items)
                                                                     if i not in (2, 5)]
    assert sorted(dataset.skipped) == sorted([items[2].path, items[5].path])  # seen from the main process

