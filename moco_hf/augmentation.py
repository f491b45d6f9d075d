"""The papers' two-crop augmentations, built from torchvision transforms v2.

Each view maps a PIL image (or a uint8 tensor) to one normalised `(3, size, size)` float tensor; `TwoCropsTransform`
makes the query and the key view of the same image. One builder, `moco_view`, makes every recipe from a `ViewRecipe`:

* v1 (official `main_moco.py`): crop scale (0.2, 1), grayscale p=0.2 then colour jitter (0.4, 0.4, 0.4, 0.4), flip;
* v2 (`--aug-plus`): colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur p=0.5, flip;
* v3 (BYOL's asymmetric pair): crop scale (0.08, 1), jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2; view 1
  always blurred and never solarized, view 2 blurred with p=0.1 and solarized with p=0.2;
* cifar10-demo (the official CIFAR-10 demo notebook): crop scale (0.08, 1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8,
  grayscale p=0.2, no blur, flip (the demo flips before the jitter; colour ops and a flip commute);
* multiband (images that are not RGB): v2 without saturation, hue and grayscale: brightness and contrast (0.4, 0.4)
  p=0.8 on all bands at once, blur p=0.5, flip. Band images take `moco_hf.batched_augmentation`'s path (per image
  or per batch), whose colour operations take any band count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .presets import check_augmentation_channels, evaluation_resize

Transform = Callable[[object], torch.Tensor]


@dataclass(frozen=True)
class ViewRecipe:
    """The random transforms of one view, as the papers give them (probabilities and torchvision's ranges)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    grayscale_first: bool = False  # v1 turns grey before the jitter
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    flip_p: float = 0.5


V1_VIEW = ViewRecipe(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_first=True, blur_p=0.0)
V3_VIEW = ViewRecipe(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
CIFAR10_DEMO_VIEW = ViewRecipe(crop_scale=(0.08, 1.0), blur_p=0.0)
# v2's view without what only RGB has (saturation, hue, grayscale): any number of bands.
MULTIBAND_VIEW = ViewRecipe(jitter=(0.4, 0.4, 0.0, 0.0), grayscale_p=0.0)
RECIPES: dict[str, tuple[ViewRecipe, ViewRecipe]] = {  # (query view, key view)
    "v1": (V1_VIEW, V1_VIEW),
    "v2": (ViewRecipe(), ViewRecipe()),
    "v3": (replace(V3_VIEW, blur_p=1.0), replace(V3_VIEW, blur_p=0.1, solarize_p=0.2)),
    "cifar10-demo": (CIFAR10_DEMO_VIEW, CIFAR10_DEMO_VIEW),
    "multiband": (MULTIBAND_VIEW, MULTIBAND_VIEW),
}


def _maybe(transform: v2.Transform, p: float) -> list[v2.Transform]:
    """`transform` applied with probability `p` (no wrapper when it always or never applies)."""
    if p <= 0:
        return []
    return [transform] if p >= 1 else [v2.RandomApply([transform], p=p)]


def blur_kernel_size(size: int) -> int:
    """An odd kernel about 10% of the crop (23 px at 224, as SimCLR; 3 px at 32)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def moco_view(recipe: ViewRecipe, size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """One view of `recipe` at crop size `size`, normalised with `mean`/`std`."""
    jitter = _maybe(v2.ColorJitter(*recipe.jitter), recipe.jitter_p)
    grayscale = [v2.RandomGrayscale(p=recipe.grayscale_p)]
    colour = grayscale + jitter if recipe.grayscale_first else jitter + grayscale
    return v2.Compose(
        [
            v2.ToImage(),  # uint8 tensors from here on: faster than PIL for every op below
            v2.RandomResizedCrop(size, scale=recipe.crop_scale, antialias=True),
            *colour,
            *_maybe(v2.GaussianBlur(blur_kernel_size(size), sigma=recipe.blur_sigma), recipe.blur_p),
            *_maybe(v2.RandomSolarize(threshold=128, p=1.0), recipe.solarize_p),
            v2.RandomHorizontalFlip(p=recipe.flip_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


# Evaluation resizes images up to this aspect ratio to `evaluation_resize` on the short side; longer ones have their
# long side capped at this many times it (the centre crop is then padded), so that a very thin image (20,000,000 x 1
# pixels is under PIL's limit) costs no more memory than a 4:1 panorama.
MAX_EVALUATION_ASPECT = 4


def resize_short_side(image: torch.Tensor, size: int, max_aspect: int) -> torch.Tensor:
    """`image` `(C, H, W)` resized (antialiased) as `v2.Resize(size, max_size=max_aspect * size)` does, except that
    the short side keeps at least one pixel (torchvision's would round a very thin image's to 0 and fail)."""
    height, width = image.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_aspect * size:
        new_short, new_long = max(1, int(max_aspect * size * new_short / new_long)), max_aspect * size
    return TF.resize(image, [new_short, new_long] if height <= width else [new_long, new_short], antialias=True)


def evaluation_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the short side to `evaluation_resize(size)` (the long side at most `MAX_EVALUATION_ASPECT` times it)
    and centre-crop `size`; then normalise."""
    resize = evaluation_resize(size)
    return v2.Compose(
        [
            v2.ToImage(),
            partial(resize_short_side, size=resize, max_aspect=MAX_EVALUATION_ASPECT),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class TwoCropsTransform:
    """The query view and the key view of one image: two draws of the same augmentation (v1, v2), or one draw of
    each of two (v3's asymmetric pair)."""

    def __init__(self, transform: Transform, key_transform: Transform | None = None) -> None:
        self.transform = transform
        self.key_transform = key_transform or transform

    def __call__(self, image: object) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.key_transform(image)

    def loader_item(self, image: object, seed: int) -> dict[str, torch.Tensor]:
        """In a loader worker: both finished views, drawn from `seed` (the per-image path; `OnDeviceTwoCrops` is the
        batched one)."""
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
            torch.manual_seed(seed)
            query, key = self(image)
        return {"query": query, "key": key}

    @staticmethod
    def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch of `loader_item`s, moved to `device`."""
        return batch["query"].to(device, non_blocking=True), batch["key"].to(device, non_blocking=True)

    def __repr__(self) -> str:
        return f"TwoCropsTransform({self.transform}, {self.key_transform})"


def build_two_crops(
    recipe: str,
    size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> TwoCropsTransform:
    """The two-crop transform of recipe `"v1"`, `"v2"`, `"v3"` or `"cifar10-demo"` at crop size `size`."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown augmentation {recipe!r}; choose one of {sorted(RECIPES)}.")
    check_augmentation_channels(recipe, len(mean))
    query_view, key_view = RECIPES[recipe]
    query = moco_view(query_view, size, mean, std)
    return TwoCropsTransform(query, None if key_view == query_view else moco_view(key_view, size, mean, std))
