"""The image processor saved with a trained MocoModel, so that `AutoImageProcessor`, the
`image-feature-extraction` pipeline and the Hub widget preprocess images as the encoder was evaluated."""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import BaseImageProcessor, BatchFeature, BitImageProcessor
from transformers.image_utils import PILImageResampling

from .configuration_moco import MocoConfig
from .presets import evaluation_resize


def image_processor_for(config: MocoConfig) -> BaseImageProcessor:
    """`evaluation_transform` as a transformers image processor: for RGB models, transformers' own (RGB, short side
    resized (bilinear) to `evaluation_resize(image_size)`, centre crop `image_size`, scaled to [0, 1], normalised
    with the config's mean/std); for any other band count, `MocoBandImageProcessor`, which does the same on bands."""
    if config.num_channels != 3:
        return MocoBandImageProcessor(config.num_channels, config.image_size, config.image_mean, config.image_std)
    size = config.image_size
    return BitImageProcessor(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": evaluation_resize(size)},
        resample=PILImageResampling.BILINEAR,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


class MocoBandImageProcessor(BaseImageProcessor):
    """The evaluation transform of a model whose `num_channels` is not 3, on images of any bit depth: arrays
    `(C, H, W)` or `(H, W, C)` (`input_data_format` "channels_first"/"channels_last", else the axis of
    `num_channels` length), single-band PIL images, or a batch of them; integers divided by their type's largest
    value (`moco_hf.bands`), the short side resized to `evaluation_resize(size)`, centre crop `size`, each band
    normalised with `image_mean`/`image_std`. Returns `pixel_values` `(N, num_channels, size, size)`."""

    model_input_names = ["pixel_values"]

    def __init__(self, num_channels: int = 1, size: int = 224, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.num_channels, self.size = num_channels, size
        self.image_mean = list(image_mean or [0.0] * num_channels)
        self.image_std = list(image_std or [1.0] * num_channels)

    def preprocess(self, images: Any, input_data_format: str | None = None, return_tensors: str | None = "pt",
                   **kwargs: Any) -> BatchFeature:  # fmt: skip
        import torch

        from .augmentation import evaluation_transform  # torchvision's transforms: needed here only
        from .bands import scaled_bands, stored_bands

        batch = isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4)
        layout = str(getattr(input_data_format, "value", input_data_format) or "auto")
        transform = evaluation_transform(self.size, self.image_mean, self.image_std)
        pixel_values = []
        for image in images if batch else [images]:
            if isinstance(image, torch.Tensor):
                image = image.numpy()
            bands = stored_bands(image, self.num_channels, layout)
            if bands.shape[0] != self.num_channels:
                raise ValueError(
                    f"an image of {bands.shape[0]} band(s) (shape {tuple(bands.shape)}); this model "
                    f"takes {self.num_channels} (pass `input_data_format` if the axes are misread)."
                )
            pixel_values.append(transform(scaled_bands(bands)))
        return BatchFeature({"pixel_values": torch.stack(pixel_values)}, tensor_type=return_tensors)
