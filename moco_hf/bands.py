"""Images as bands: any number of channels at their own bit depth, for models whose `num_channels` is not 3 (grey,
16-bit medical or microscopy images, 13-band Sentinel-2 tiles) and for images held as arrays.

An image becomes a float32 `(C, H, W)` tensor of its stored values: integers divided by the largest value of their
type (uint8 by 255, uint16 by 65535, so a 16-bit image keeps its 65536 levels), floats as they are. They are
read from image files (PNG and JPEG through Pillow; TIFF, with any number of bands, through tifffile) or from
`datasets` columns holding arrays (`Array2D`, `Array3D`, numpy), whose axis order `band_layout` gives. Per-band mean
and std then normalise them (`band_statistics` computes them from training images when the user gives none).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps

from .errors import first_line
from .image_files import loaded
from .presets import MAX_CHANNELS

TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # little/big-endian TIFF and BigTIFF
STATISTICS_IMAGES = 256  # training images whose pixels give the per-band mean and std when none are given


def file_bands(content: bytes) -> np.ndarray:
    """An image file's pixels as a `(C, H, W)` array of its stored type. TIFF files (any band count, integer or
    float) through tifffile, which says where the band axis is; the others through Pillow (upright, as
    `datasets.Image` decodes them), bands last."""
    if content[:4] in TIFF_SIGNATURES:
        import tifffile  # imported here: only TIFF files need it

        with tifffile.TiffFile(io.BytesIO(content)) as tiff:
            series = tiff.series[0]
            refuse_bomb(series.shape, series.axes)
            array, axes = series.asarray(), series.axes
        return to_channels_first(array, "channels_last" if axes.endswith("S") else "channels_first")
    image = ImageOps.exif_transpose(loaded(PILImage.open(io.BytesIO(content))))
    if image.mode == "P":  # palette indices are not values
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return to_channels_first(np.asarray(image), "channels_last")


def refuse_bomb(shape: tuple[int, ...], axes: str) -> None:
    """Pillow's decompression-bomb rule for TIFF files, which tifffile decodes whatever their size: more than twice
    `PIL.Image.MAX_IMAGE_PIXELS` pixels (per band), or more bands than a model can take, is refused before decoding
    (a small compressed file can claim gigabytes)."""
    pixels = math.prod(size for axis, size in zip(axes, shape, strict=True) if axis in "YX")
    bands = math.prod(shape) // max(1, pixels)
    limit = PILImage.MAX_IMAGE_PIXELS  # None: the user turned Pillow's rule off, and so it is here
    if (limit is not None and pixels > 2 * limit) or bands > MAX_CHANNELS:
        raise ValueError(f"a TIFF image of shape {tuple(shape)} ({axes}) is over the decompression-bomb limits "
                         f"(2 x {limit} pixels, {MAX_CHANNELS} bands): refused unread")  # fmt: skip


def to_channels_first(array: np.ndarray, layout: str, num_channels: int | None = None) -> np.ndarray:
    """`array` as `(C, H, W)`: a 2-D array is one band; a 3-D one is read in `layout`, where "auto" takes the end
    axis of `num_channels` length as the bands (the last one when both have it), else the shorter end axis."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise ValueError(f"an array of shape {tuple(array.shape)}, not an image (2 or 3 axes)")
    if layout == "auto":
        first, last = array.shape[0], array.shape[-1]
        bands_first = first == num_channels != last or (num_channels not in (first, last) and first < last)
        layout = "channels_first" if bands_first else "channels_last"
    return array if layout == "channels_first" else array.transpose(2, 0, 1)


def scaled_bands(array: np.ndarray) -> torch.Tensor:
    """Pixels as float32: integers divided by their type's largest value, booleans as 0/1, floats unchanged."""
    values = array.astype(np.float32)
    if array.dtype.kind in "ui":
        values /= np.float32(np.iinfo(array.dtype).max)
    return torch.from_numpy(np.ascontiguousarray(values))


def decode_bands(value: Any, num_channels: int, layout: str) -> tuple[torch.Tensor | None, str | None]:
    """A stored image (`datasets.Image(decode=False)` bytes, an array, or a PIL image) as a `(num_channels, H, W)`
    float tensor (`scaled_bands`), or None and the reason: undecodable, another band count, NaN or infinite values."""
    try:
        array = stored_bands(value, num_channels, layout)
    except Exception as error:  # a corrupt file must never stop a run: it is counted by the caller
        return None, f"{type(error).__name__}: {first_line(error)}"
    if array.shape[0] != num_channels:
        return None, f"{array.shape[0]} band(s) (shape {tuple(array.shape)}), not the model's {num_channels}"
    if min(array.shape[1:]) < 1:
        return None, f"an empty image of shape {tuple(array.shape)}"
    bands = scaled_bands(array)
    if not torch.isfinite(bands).all():
        return None, "NaN or infinite values"
    return bands, None


def stored_bands(value: Any, num_channels: int, layout: str) -> np.ndarray:
    """The `(C, H, W)` array of a stored image, in its stored type (see `decode_bands`)."""
    if isinstance(value, dict):  # `datasets.Image(decode=False)`: the file's bytes (the caller reads a path's)
        if not value.get("bytes"):
            raise ValueError(f"no image bytes or path (value {str(value)[:60]})")
        return file_bands(value["bytes"])
    if isinstance(value, PILImage.Image):
        return to_channels_first(np.asarray(loaded(value)), "channels_last")
    if value is None:
        raise ValueError("no image (None)")
    return to_channels_first(np.asarray(value), layout, num_channels)


def band_statistics(images: Iterable[torch.Tensor], count: int = STATISTICS_IMAGES) -> tuple[list[float], list[float]]:
    """Per-band mean and std over every pixel of the first `count` images `(C, H, W)` (float64 sums)."""
    total, squares, pixels = None, None, 0
    for index, image in enumerate(images):
        if index == count:
            break
        values = image.double().flatten(1)
        total = values.sum(1) if total is None else total + values.sum(1)
        squares = (values**2).sum(1) if squares is None else squares + (values**2).sum(1)
        pixels += values.shape[1]
    if total is None:
        raise ValueError("no image to compute the per-band statistics from")
    mean = total / pixels
    std = (squares / pixels - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)  # a constant band: no division by 0
    return mean.tolist(), std.tolist()
