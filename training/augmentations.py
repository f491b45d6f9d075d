"""The papers' two-crop augmentations, built from torchvision transforms v2.

Each recipe maps a PIL image to one normalised `(3, size, size)` float tensor; `TwoCropsTransform` applies it twice
to make the query and the key view of the same image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[object], torch.Tensor]


def _finish(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def moco_v1_augmentation(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """MoCo v1 (the official `main_moco.py` without `--aug-plus`)."""
    return v2.Compose(
        [
            v2.ToImage(),  # uint8 tensors from here on: faster than PIL for every op below
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomHorizontalFlip(),
            *_finish(mean, std),
        ]
    )


def _blur_kernel(size: int) -> int:
    """An odd kernel about 10% of the crop (23 px at 224, as SimCLR; 3 px at 32)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def moco_v2_augmentation(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """MoCo v2 (`--aug-plus`): colour jitter with p=0.8 and Gaussian blur with p=0.5 (sigma in [0.1, 2])."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
            *_finish(mean, std),
        ]
    )


def moco_v3_augmentations(size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[v2.Compose, v2.Compose]:
    """MoCo v3 (BYOL's asymmetric pair): view 1 always blurred, never solarized; view 2 blurred with p=0.1,
    solarized with p=0.2. Crops of scale (0.08, 1)."""

    def view(blur: float, solarize: float) -> v2.Compose:
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur),
                v2.RandomSolarize(threshold=128, p=solarize),
                v2.RandomHorizontalFlip(),
                *_finish(mean, std),
            ]
        )

    return view(blur=1.0, solarize=0.0), view(blur=0.1, solarize=0.2)


def evaluation_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the short side to size/0.875 and centre-crop (no resize when the image already has `size`)."""
    resize = size if size <= 64 else round(size / 0.875)
    return v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *_finish(mean, std)])


AUGMENTATIONS: dict[str, Callable[[int, Sequence[float], Sequence[float]], v2.Compose]] = {
    "v1": moco_v1_augmentation,
    "v2": moco_v2_augmentation,
}


class TwoCropsTransform:
    """The query view and the key view of one image: two draws of the same augmentation (v1, v2), or one draw of
    each of two (v3's asymmetric pair)."""

    def __init__(self, transform: Transform, key_transform: Transform | None = None) -> None:
        self.transform = transform
        self.key_transform = key_transform or transform

    def __call__(self, image: object) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.key_transform(image)

    def __repr__(self) -> str:
        return f"TwoCropsTransform({self.transform}, {self.key_transform})"


def build_two_crops(
    recipe: str, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> TwoCropsTransform:
    """The two-crop transform of recipe `"v1"`, `"v2"` or `"v3"` at crop size `size`."""
    if recipe == "v3":
        return TwoCropsTransform(*moco_v3_augmentations(size, mean, std))
    if recipe not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {recipe!r}; choose one of {sorted([*AUGMENTATIONS, 'v3'])}.")
    return TwoCropsTransform(AUGMENTATIONS[recipe](size, mean, std))
