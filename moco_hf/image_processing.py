"""The image processor saved with a trained MocoModel, so that `AutoImageProcessor`, the
`image-feature-extraction` pipeline and the Hub widget preprocess images as the encoder was evaluated."""

from __future__ import annotations

from transformers import BitImageProcessor
from transformers.image_utils import PILImageResampling

from .configuration_moco import MocoConfig


def evaluation_resize(size: int) -> int:
    """The short side evaluation resizes to before the centre crop: size / 0.875 (the ImageNet convention), or the
    crop size itself for CIFAR-sized images."""
    return size if size <= 64 else round(size / 0.875)


def image_processor_for(config: MocoConfig) -> BitImageProcessor:
    """`evaluation_transform` as a transformers image processor: RGB, short side resized (bilinear) to
    `evaluation_resize(image_size)`, centre crop `image_size`, scaled to [0, 1], normalised with the config's
    mean/std."""
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
