"""The two-crop augmentations of `moco_hf.augmentation`, applied to a whole batch at once on the training device.

Per-image augmentation in loader workers cannot feed a GPU (a few hundred images per second per core). Here the
work is split where it is cheap to split:

* in the loader workers, `OnDeviceTwoCrops.loader_item` turns each decoded image into uint8 pixels and draws both
  views' random parameters with the laws of torchvision's samplers, from the image's own seed (`moco_hf.data`):
  they stay a pure function of (seed, epoch, process, worker, position) and a resumed run sees the same data;
* on the device, `OnDeviceTwoCrops.on_device` applies them with per-image values in a few batched kernels: crop and
  resize (`roi_align`), colour jitter in each image's own random order, grayscale, Gaussian blur, solarize, flip,
  normalise. The arithmetic is torchvision's for float images; `tests/test_batched_augmentation.py` checks each op
  against `torchvision.transforms.v2.functional` image by image. One difference: the crop is resampled from the
  whole image, so its edge pixels blend with their neighbours outside the crop instead of being clamped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image as PILImage
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import pil_to_tensor, resize

from .augmentation import RECIPES, TwoCropsTransform, ViewRecipe, blur_kernel_size
from .presets import check_augmentation_channels

# One row of floats per image and view; `ViewParameters` reads the columns by name.
PARAM_COLUMNS = ("top", "left", "height", "width", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
                 "order_0", "order_1", "order_2", "order_3", "grayscale", "blur_sigma", "solarize")  # fmt: skip
COLUMN = {name: index for index, name in enumerate(PARAM_COLUMNS)}
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


class ViewSampler:
    """Draws the random parameters of one view of one image, with the laws of torchvision's samplers
    (`RandomResizedCrop`, `ColorJitter`, `GaussianBlur` and `RandomApply`'s coin), transcribed onto a
    `random.Random` seeded per image: torch's global RNG costs ~0.1 ms per image to fork and seed."""

    def __init__(self, recipe: ViewRecipe) -> None:
        self.recipe = recipe
        self.log_ratio = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's default ratio

    def crop_box(self, rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width): `RandomResizedCrop.make_params`."""
        area = height * width
        for _ in range(10):
            target_area = area * rng.uniform(*self.recipe.crop_scale)
            aspect_ratio = math.exp(rng.uniform(*self.log_ratio))
            crop_width = round(math.sqrt(target_area * aspect_ratio))
            crop_height = round(math.sqrt(target_area / aspect_ratio))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, \
                    crop_width  # fmt: skip
        in_ratio = width / height  # ten misses: the central crop, its ratio clamped to [3/4, 4/3]
        crop_width = width if in_ratio <= 4 / 3 else round(height * 4 / 3)
        crop_height = height if in_ratio >= 3 / 4 else round(width * 4 / 3)
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def __call__(self, rng: random.Random, height: int, width: int) -> list[float]:
        """The parameter row (`PARAM_COLUMNS`) of a view of a `height` x `width` image."""
        recipe = self.recipe
        jitter, factors, order = 0.0, [1.0, 1.0, 1.0, 0.0], [0, 1, 2, 3]
        if rng.random() < recipe.jitter_p:
            brightness, contrast, saturation, hue = recipe.jitter
            order = rng.sample(range(4), 4)
            factors = [rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
                       rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
                       rng.uniform(max(0.0, 1 - saturation), 1 + saturation), rng.uniform(-hue, hue)]  # fmt: skip
            jitter = 1.0
        gray = float(rng.random() < recipe.grayscale_p)
        blur_sigma = rng.uniform(*recipe.blur_sigma) if rng.random() < recipe.blur_p else 0.0
        solarize = float(rng.random() < recipe.solarize_p)
        flip = float(rng.random() < recipe.flip_p)
        return [*self.crop_box(rng, height, width), flip, jitter, *factors, *order, gray, blur_sigma, solarize]


class ViewParameters:
    """A batch of parameter rows `(B, len(PARAM_COLUMNS))`, read by column name."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __getattr__(self, name: str) -> torch.Tensor:
        if name not in COLUMN:
            raise AttributeError(name)
        return self.rows[:, COLUMN[name]]

    def flag(self, name: str) -> torch.Tensor:
        return self.rows[:, COLUMN[name]] > 0.5

    @property
    def jitter_factors(self) -> torch.Tensor:
        return self.rows[:, COLUMN["brightness"] : COLUMN["order_0"]]

    @property
    def jitter_order(self) -> torch.Tensor:
        return self.rows[:, COLUMN["order_0"] : COLUMN["grayscale"]].long()


# ---- batched image operations (float images `(B, C, H, W)`, in [0, 1] where `bounded`; per-image factors `(B,)`) ----


def per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """`(B, 1, H, W)` luma of RGB images; the mean of the bands of any other count."""
    if images.shape[1] != 3:
        return images.mean(dim=1, keepdim=True)
    red, green, blue = images.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue).unsqueeze(1)


def blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor, bounded: bool) -> torch.Tensor:
    """torchvision's blend; values stay in [0, 1] only for `bounded` (8-bit) images: bands keep their range."""
    ratio = per_image(factors)
    blended = ratio * images + (1.0 - ratio) * other
    return blended.clamp_(0.0, 1.0) if bounded else blended


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor, bounded: bool = True) -> torch.Tensor:
    return blend(images, torch.zeros_like(images), factors, bounded)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor, bounded: bool = True) -> torch.Tensor:
    return blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factors, bounded)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor, bounded: bool = True) -> torch.Tensor:
    return blend(images, grayscale(images), factors, bounded)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """Hue, saturation, value in [0, 1] (Pillow's and torchvision's formulas)."""
    red, green, _ = images.unbind(dim=1)
    smallest, value = torch.aminmax(images, dim=1)
    channel_range = value - smallest
    grey = channel_range == 0
    saturation = channel_range / torch.where(grey, torch.ones_like(value), value)
    divisor = torch.where(grey, torch.ones_like(channel_range), channel_range)
    red_c, green_c, blue_c = ((value.unsqueeze(1) - images) / divisor.unsqueeze(1)).unbind(dim=1)
    hue = torch.where(value == red, blue_c - green_c,
                      torch.where(value == green, 2.0 + red_c - blue_c, 4.0 + green_c - red_c))  # fmt: skip
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.stack(((hue / 6.0 + 1.0) % 1.0, saturation, value), dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = images.unbind(dim=1)
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long() % 6
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    candidates = torch.stack((value, p, q, t), dim=1)  # (B, 4, H, W)
    # Which of v, p, q, t each of r, g, b takes, in each of the six hue sectors.
    table = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=images.device)
    return candidates.gather(1, table[:, sector].permute(1, 0, 2, 3))


def adjust_hue(images: torch.Tensor, factors: torch.Tensor, bounded: bool = True) -> torch.Tensor:
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + factors.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue  # torchvision's fn_idx numbering
)  # fmt: skip


def color_jitter(
    images: torch.Tensor, params: ViewParameters, strengths: Sequence[float], bounded: bool
) -> torch.Tensor:
    """Each jittered image gets its adjustments in its own random order (torchvision's `fn_idx`); one of strength 0
    is left out, as torchvision's `ColorJitter` leaves it."""
    applies, order, factors = params.flag("jitter"), params.jitter_order, params.jitter_factors
    for position in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            chosen = applies & (order[:, position] == op_index)
            if strengths[op_index] > 0 and chosen.any():
                images[chosen] = op(images[chosen], factors[chosen, op_index], bounded)
    return images


def random_grayscale(images: torch.Tensor, params: ViewParameters) -> torch.Tensor:
    chosen = params.flag("grayscale")
    if chosen.any():
        images[chosen] = grayscale(images[chosen]).expand(-1, 3, -1, -1)
    return images


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image with its own sigma: a separable depthwise convolution, reflect-padded as torchvision."""
    count, channels, height, width = images.shape
    offsets = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size, device=images.device)
    kernels = torch.exp(-0.5 * (offsets / sigmas.view(-1, 1)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B * C, K)
    pad = kernel_size // 2
    planes = F.pad(images.reshape(1, count * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, kernels.view(-1, 1, kernel_size, 1), groups=count * channels)
    planes = F.conv2d(planes, kernels.view(-1, 1, 1, kernel_size), groups=count * channels)
    return planes.view(count, channels, height, width)


def random_gaussian_blur(images: torch.Tensor, params: ViewParameters, kernel_size: int) -> torch.Tensor:
    chosen = params.blur_sigma > 0
    if chosen.any():
        images[chosen] = gaussian_blur(images[chosen], params.blur_sigma[chosen], kernel_size)
    return images


def resized_crops(images: torch.Tensor, params: ViewParameters, size: int) -> torch.Tensor:
    """Crop `(top, left, height, width)` of each image, bilinearly resized to `size` x `size` (several samples per
    output pixel where the crop is larger, which anti-aliases the downscaling)."""
    top, left = params.top, params.left
    boxes = torch.stack((torch.arange(len(top), device=top.device, dtype=top.dtype), left, top,
                         left + params.width, top + params.height), dim=1)  # fmt: skip
    return roi_align(images, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class BatchedView:
    """One view of a recipe for a batch: `(B, C, H, W)` images (uint8 RGB, or float bands) and their parameter rows
    in, `(B, C, size, size)` normalised float images out."""

    def __init__(self, recipe: ViewRecipe, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.recipe, self.size = recipe, size
        self.blur_kernel_size = blur_kernel_size(size)
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        params = ViewParameters(rows)
        bounded = images.dtype == torch.uint8
        views = resized_crops(images.float().div_(255.0) if bounded else images.float(), params, self.size)
        jitter = partial(color_jitter, params=params, strengths=self.recipe.jitter, bounded=bounded)
        if self.recipe.grayscale_first:
            views = jitter(random_grayscale(views, params))
        else:
            views = random_grayscale(jitter(views), params)
        views = random_gaussian_blur(views, params, self.blur_kernel_size)
        solarized = per_image(params.flag("solarize")) & (views >= 128 / 255)  # RandomSolarize(threshold=128)
        views = torch.where(solarized, 1.0 - views, views)
        views = torch.where(per_image(params.flag("flip")), views.flip(-1), views)
        return (views - self.mean.to(views.device)) / self.std.to(views.device)


class OnDeviceTwoCrops:
    """A recipe's query and key views, parameters drawn per image in the loader and applied per batch on the device.

    Images whose short side exceeds `max_short_side` (default: twice the crop), or whose long side exceeds twice
    that, are first shrunk in the worker (aspect ratio kept), so that large photos travel as small tensors; crops
    are then drawn from the shrunk image. The long-side bound caps a batch, padded to its largest height and width,
    at B x C x (2 * max_short_side)^2 pixels whatever the images' shapes: a very thin image (20,000,000 x 1 is under
    PIL's pixel limit) would otherwise make every image of its batch that long. Images are RGB PIL images (sent as
    uint8) or float `(C, H, W)` bands (`moco_hf.bands`), whose values keep their range.
    """

    def __init__(self, recipe: str, size: int, mean: Sequence[float], std: Sequence[float],
                 max_short_side: int | None = None) -> None:  # fmt: skip
        if recipe not in RECIPES:
            raise ValueError(f"Unknown augmentation {recipe!r}; choose one of {sorted(RECIPES)}.")
        check_augmentation_channels(recipe, len(mean))
        query_view, key_view = RECIPES[recipe]
        self.samplers = (ViewSampler(query_view), ViewSampler(key_view))
        self.views = (BatchedView(query_view, size, mean, std), BatchedView(key_view, size, mean, std))
        self.max_short_side = max_short_side or 2 * size

    def shrink(self, image: PILImage.Image | torch.Tensor) -> torch.Tensor:
        """The image's pixels `(C, H, W)`, shrunk (bilinear, antialiased) to the bounds."""
        height, width = image.shape[-2:] if isinstance(image, torch.Tensor) else (image.height, image.width)
        scale = min(self.max_short_side / min(height, width), 2 * self.max_short_side / max(height, width))
        new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if isinstance(image, torch.Tensor):
            return image if scale >= 1 else resize(image, [new_size[1], new_size[0]], antialias=True)
        if scale < 1:
            image = image.resize(new_size, PILImage.Resampling.BILINEAR, reducing_gap=2.0)
        return pil_to_tensor(image)

    def loader_item(self, image: PILImage.Image | torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """In a loader worker: the pixels `(C, H, W)` and both views' parameter rows, drawn from `seed`."""
        pixels = self.shrink(image)
        rng, (height, width) = random.Random(seed), pixels.shape[-2:]
        rows = [sampler(rng, height, width) for sampler in self.samplers]
        return {"image": pixels, "query_params": torch.tensor(rows[0]), "key_params": torch.tensor(rows[1])}

    def on_device(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The `(B, C, size, size)` query and key views of a collated batch of `loader_item`s, made on `device`."""
        images = batch["image"].to(device, non_blocking=True)
        return tuple(
            view(images, batch[name].to(device, non_blocking=True))
            for view, name in zip(self.views, ("query_params", "key_params"), strict=True)
        )


class PerImageTwoCrops:
    """`OnDeviceTwoCrops` applied to one image at a time in the loader workers: the per-image path for band images
    (torchvision's colour transforms take 1 or 3 channels only). From the same seed, the same views as on the device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.batched = OnDeviceTwoCrops(*args, **kwargs)

    def loader_item(self, image: PILImage.Image | torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        item = {name: value.unsqueeze(0) for name, value in self.batched.loader_item(image, seed).items()}
        query, key = self.batched.on_device(item, torch.device("cpu"))
        return {"query": query[0], "key": key[0]}

    def query_view(self, image: PILImage.Image | torch.Tensor, seed: int) -> torch.Tensor:
        return self.loader_item(image, seed)["query"]

    on_device = staticmethod(TwoCropsTransform.on_device)
