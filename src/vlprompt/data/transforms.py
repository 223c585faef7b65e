"""Image pre-processing of the CoOp protocol (Dassl transforms); size, mean and std come from the backbone."""

from __future__ import annotations

from typing import Sequence

from PIL import Image
from torchvision import transforms as T

BICUBIC = T.InterpolationMode.BICUBIC


class ToRGB:
    """Convert any PIL image (grey, palette, RGBA, CMYK) to RGB; a class so DataLoader workers can pickle it."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def build_transform(train: bool, image_size: int, mean: Sequence[float], std: Sequence[float],
                    crop_scale: Sequence[float] = (0.08, 1.0)) -> T.Compose:
    """PIL image -> normalised ``(3, image_size, image_size)`` float tensor.

    train: RandomResizedCrop(image_size, scale crop_scale (Dassl's INPUT.RRCROP_SCALE, default (0.08, 1)),
           ratio (3/4, 4/3), bicubic) -> RandomHorizontalFlip(0.5)
    test:  Resize(image_size, bicubic; the shorter side) -> CenterCrop(image_size)
    then ToTensor ([0, 1]) -> Normalize(mean, std).
    """
    if train:
        geometry = [
            T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
        ]
    else:
        geometry = [T.Resize(image_size, interpolation=BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))])
