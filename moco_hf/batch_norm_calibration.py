"""A fair random baseline: the BatchNorm statistics of an untrained encoder, calibrated on training images.

A new encoder's BatchNorm layers hold running statistics of mean 0 and variance 1, which no real activation has; in
eval mode such an encoder computes features that any train-mode forward pass would already improve. Comparing a
pretrained encoder with that one credits pretraining with what is only BatchNorm calibration (several kNN points on
CIFAR-10). So every "random init" figure of moco-hf first replaces those statistics by their average over
train-mode forward passes (no gradients, no weight changes) on `BATCH_NORM_CALIBRATION_IMAGES` augmented training
images, as `torch.optim.swa_utils.update_bn` does for averaged weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .presets import BATCH_NORM_CALIBRATION_IMAGES


def batch_norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [layer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]


def calibrate_batch_norm(
    encoder: nn.Module,
    batches: Iterable[torch.Tensor],
    num_images: int = BATCH_NORM_CALIBRATION_IMAGES,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> int:
    """Replace the running statistics of every BatchNorm layer of `encoder` by their average over train-mode forward
    passes on the first `num_images` images of `batches` (whole batches of (N, C, H, W) tensors, so the last one may
    pass it), then leave `encoder` in eval mode. Weights are not touched. Returns the number of images used (0 for an
    encoder without BatchNorm, which is left as it is)."""
    encoder.eval()  # folds SplitBatchNorm's per-group statistics, so that the reset below starts from one set
    if not batch_norm_layers(encoder):
        return 0
    used = 0

    def first_images() -> Iterator[torch.Tensor]:
        nonlocal used
        for images in batches:
            if used >= num_images:
                return
            used += images.shape[0]
            yield images

    with torch.no_grad():
        update_bn(
            first_images(), _Autocast(encoder, autocast)
        )  # resets the statistics, then a cumulative average over the batches
    encoder.eval()
    return used


class _Autocast(nn.Module):
    def __init__(self, module: nn.Module, autocast: Callable[[], AbstractContextManager]) -> None:
        super().__init__()
        self.module, self.autocast = module, autocast

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.module(images)


def average_batch_norm_statistics(encoder: nn.Module, mean_across_processes) -> None:
    """Replace each BatchNorm layer's running statistics by their mean over processes (`mean_across_processes`, e.g.
    `lambda t: accelerator.reduce(t, "mean")`), so that every process encodes its share with the same encoder."""
    for layer in batch_norm_layers(encoder):
        for name in ("running_mean", "running_var"):
            statistics = getattr(layer, name)
            if statistics is not None:
                statistics.copy_(mean_across_processes(statistics))


def describe_random_baseline(images: int) -> str:
    """How results name the calibrated random encoder."""
    return f"random init (BatchNorm calibrated on {images} images)" if images else "random init (no BatchNorm)"
