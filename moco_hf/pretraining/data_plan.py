"""The run's data: what each process reads, its two-crop augmentation and the endless loader of micro-batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset

from ..augmentation import build_two_crops
from ..bands import band_statistics
from ..batched_augmentation import OnDeviceTwoCrops, PerImageTwoCrops
from ..configuration_moco import MocoConfig
from ..data import (
    GlobalOrder,
    ImageReader,
    MapStyleBatches,
    MicroBatchKeys,
    StreamBatches,
    TwoViewAugmentation,
    as_iterable,
    dataset_fingerprint,
    dataset_rows,
    default_dataset_name,
    find_image_column,
    init_loader_worker,
    keep_batch,
    load_image_dataset,
    shard_for_process,
    take_rows,
    usable_images,
    usable_workers,
)
from ..errors import DataError, UsageError
from .arguments import MocoTrainingArguments


@dataclass
class DataPlan:
    """The run's data and its arithmetic: what this process reads, batch sizes and step counts."""

    dataset_name: str
    source: Any  # a map-style `datasets.Dataset` (read in `order`), or this process's shuffled stream
    order: GlobalOrder | None  # None for a stream: it has no random access
    image_column: str
    micro_batch: int
    global_batch: int
    total_steps: int
    steps_per_epoch: int
    num_workers: int
    fingerprint: str  # `dataset_fingerprint`: resume checks the data, not the path it was reached by
    reader: ImageReader  # RGB images, or float bands (`num_channels` other than 3, or arrays)
    statistics: tuple[list[float], list[float]] | None  # per-band mean and std of band images given none


def plan_data(args: MocoTrainingArguments, accelerator: Accelerator, num_channels: int = 3) -> DataPlan:
    """Load the training split, plan who reads what (a global order, or shards of a stream) and count the steps. For
    band images: the first readable image is checked to have `num_channels` bands, and the per-band mean and std not
    given are computed from the first `STATISTICS_IMAGES` usable ones."""
    dataset_name = args.dataset_name or default_dataset_name()
    train_set = load_image_dataset(dataset_name, args.train_split, args.streaming,
                                   args.dataset_config_name, args.cache_dir)  # fmt: skip
    if args.max_train_samples is not None:
        train_set = take_rows(train_set, 0, args.max_train_samples)
    world, micro_batch = accelerator.num_processes, args.per_device_train_batch_size
    global_batch = micro_batch * world * args.gradient_accumulation_steps
    rows = dataset_rows(train_set)
    if args.max_train_samples is not None:  # a stream's `take` keeps the whole split's length in its info
        rows = min(rows or args.max_train_samples, args.max_train_samples)
    if rows is not None and rows < global_batch:
        raise DataError(
            f"the global batch ({micro_batch} per process x {world} processes x "
            f"{args.gradient_accumulation_steps} accumulation) is larger than the dataset ({rows} images); "
            "lower `per_device_train_batch_size` or `gradient_accumulation_steps`."
        )
    if args.max_train_steps is None and rows is None:
        raise UsageError("the stream's length is unknown: pass `max_train_steps`.")
    steps_per_epoch = max(1, (rows or 0) // global_batch)  # an epoch is whole steps; the rest waits for the next
    total_steps = args.max_train_steps
    if total_steps is None:
        total_steps = max(1, round(args.num_train_epochs * steps_per_epoch))
    image_column = find_image_column(train_set, args.image_column)
    fingerprint = dataset_fingerprint(train_set, image_column, rows)
    reader = ImageReader.for_column(train_set, image_column, num_channels, args.band_layout)
    reader.check_band_count(train_set, image_column)
    statistics = None
    if num_channels != 3 and not (args.image_mean and args.image_std):  # from the first images: the same everywhere
        statistics = band_statistics(image for _, image in usable_images(train_set, image_column, reader))
    if isinstance(train_set, Dataset):  # random access: every process reads its part of one global order
        order = GlobalOrder(len(train_set), global_batch, args.seed)
        return DataPlan(dataset_name, train_set, order, image_column, micro_batch, global_batch, total_steps,
                        steps_per_epoch, max(0, args.dataloader_num_workers), fingerprint, reader,
                        statistics)  # fmt: skip
    stream = as_iterable(train_set, num_shards=max(1, world * max(1, args.dataloader_num_workers)))
    stream = shard_for_process(stream, accelerator.process_index, world)
    stream = stream.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
    return DataPlan(dataset_name, stream, None, image_column, micro_batch, global_batch, total_steps,
                    steps_per_epoch if rows is not None else total_steps,
                    usable_workers(stream, args.dataloader_num_workers), fingerprint, reader, statistics)  # fmt: skip


def build_augmentation(config: MocoConfig, args: MocoTrainingArguments, bands: bool = False) -> TwoViewAugmentation:
    """The recipe's two crops: batched on the training device, or per image in the loader workers (torchvision's
    transforms for RGB images, the batched operations one image at a time for `bands`)."""
    build = OnDeviceTwoCrops if args.augment_on_device else PerImageTwoCrops if bands else build_two_crops
    return build(config.augmentation, config.image_size, config.image_mean, config.image_std)


def build_loader(plan: DataPlan, two_crops: TwoViewAugmentation, args: MocoTrainingArguments, accelerator: Accelerator,
                 start_step: int) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The endless iterator of this process's two-crop micro-batches, from training step `start_step` on."""
    options = {"num_workers": plan.num_workers, "worker_init_fn": init_loader_worker,
               "pin_memory": accelerator.device.type == "cuda",
               # Its own generator: the loader draws its workers' base seed from it, not from the global RNG that
               # a checkpoint restores (which would then differ from an uninterrupted run's).
               "generator": torch.Generator().manual_seed(args.seed)}  # fmt: skip
    if plan.order is not None:
        keys = MicroBatchKeys(plan.order, plan.micro_batch, accelerator.process_index, accelerator.num_processes,
                              args.gradient_accumulation_steps, start_step)  # fmt: skip
        dataset = MapStyleBatches(plan.source, plan.image_column, two_crops, plan.order, plan.reader)
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=keys, collate_fn=keep_batch, **options))
    skip_batches = start_step * args.gradient_accumulation_steps
    batches = StreamBatches(plan.source, plan.image_column, two_crops, plan.micro_batch, args.seed,
                             accelerator.process_index, skip_batches, plan.reader)  # fmt: skip
    data = iter(torch.utils.data.DataLoader(batches, batch_size=None, **options))
    for _ in range(batches.batches_to_drop(plan.num_workers)):
        next_batch(data)
    return data


def next_batch(data: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next two-crop batch; a data error reported by a loader worker becomes a one-line `DataError`."""
    batch = next(data)
    if "error" in batch:
        raise DataError(batch["error"])
    return batch
