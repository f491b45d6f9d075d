#!/usr/bin/env python
"""Two-crop augmentation throughput: our `datasets` stream (`StreamBatches`) against a plain torchvision
`ImageFolder` + `TwoCropsTransform`, the same MoCo v2 augmentation, the same real CIFAR-10 images.

    python -m benchmarks.data_throughput --num_images 10240 --workers 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from moco_hf.augmentation import build_two_crops
from moco_hf.data import StreamBatches, as_iterable, load_image_dataset

from .common import CIFAR10, write_results

CIFAR_MEAN, CIFAR_STD = (0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)


def images_per_second(loader: torch.utils.data.DataLoader, num_batches: int, batch_size: int) -> float:
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(num_batches - 1):
        next(batches)
    return (num_batches - 1) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=10240)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    two_crops = build_two_crops("v2", args.image_size, CIFAR_MEAN, CIFAR_STD)
    dataset = load_image_dataset(CIFAR10, "train", streaming=False).select(range(args.num_images))
    num_batches = args.num_images // args.batch_size

    with tempfile.TemporaryDirectory() as folder:
        for index, row in enumerate(dataset):  # the same images as PNG files in class folders
            class_dir = Path(folder) / str(row["label"])
            class_dir.mkdir(exist_ok=True)
            row["image"].save(class_dir / f"{index}.png")
        rows = []
        for workers in args.workers:
            stream = as_iterable(dataset, num_shards=max(1, workers))
            ours = torch.utils.data.DataLoader(
                StreamBatches(stream, "image", two_crops, args.batch_size, seed=0), batch_size=None,
                num_workers=workers,
            )  # fmt: skip
            image_folder = torchvision.datasets.ImageFolder(folder, transform=two_crops)
            theirs = torch.utils.data.DataLoader(
                image_folder, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True
            )
            ours_rate = images_per_second(ours, num_batches, args.batch_size)
            theirs_rate = images_per_second(theirs, num_batches, args.batch_size)
            for pipeline, rate in (
                ("moco-hf StreamBatches (parquet stream)", ours_rate),
                ("torchvision ImageFolder + TwoCropsTransform (PNG files)", theirs_rate),
            ):
                rows.append({"workers": workers, "pipeline": pipeline, "images_per_s": rate,
                             "per_worker": rate / workers, "ratio_vs_imagefolder": rate / theirs_rate})  # fmt: skip
    write_results(
        "data_throughput",
        vars(args),
        rows,
        ["workers", "pipeline", "images_per_s", "per_worker", "ratio_vs_imagefolder"],
        notes="Images/s of two 32x32 MoCo v2 crops per image, after the first batch (worker start-up excluded).",
    )


if __name__ == "__main__":
    main()
