#!/usr/bin/env python
"""MoCo pretraining of a timm backbone on any image dataset, with Accelerate (an HF-examples-style command over
the `moco_hf` library: data in `moco_hf.data`, augmentation in `moco_hf.augmentation`, checkpoints in
`moco_hf.checkpointing`, schedules in `moco_hf.schedules`, the kNN monitor in `moco_hf.knn`).

One process:          python training/pretrain.py --backbone resnet18 --image_size 32 --max_train_steps 500
Several (GPUs):       accelerate launch --multi_gpu --num_processes 8 training/pretrain.py --preset v2 ...
Two CPU processes:    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
                          --dynamo_backend no training/pretrain.py ...
Arguments may also come from a YAML or JSON file: python training/pretrain.py config.yaml

With no --dataset_name it trains on CIFAR-10 (../shared/data/cifar10 when present, else the Hub's uoft-cs/cifar10)
and reports the weighted kNN accuracy of the encoder before and after training.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, set_seed
from datasets import Dataset
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from moco_hf import MocoConfig, MocoModel
from moco_hf.augmentation import build_two_crops
from moco_hf.batched_augmentation import BatchedTwoCrops
from moco_hf.checkpointing import (
    MATCHING_CONFIG_FIELDS,
    OutputDirLock,
    TrainerState,
    check_output_dir,
    load_checkpoint,
    remove_incomplete_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    set_aside_newer_checkpoints,
)
from moco_hf.configuration_moco import LR_SCHEDULES, OPTIMIZERS, PRESET_NAMES, PRESETS, SHUFFLE_BN_MODES
from moco_hf.data import (
    HUB_CIFAR10,
    GlobalOrder,
    MicroBatchKeys,
    TwoCropBatches,
    TwoCropPipeline,
    TwoCropRows,
    as_iterable,
    close_loader,
    dataset_rows,
    default_dataset_name,
    find_image_column,
    init_loader_worker,
    keep_batch,
    load_image_dataset,
    shard_for_process,
    take_rows,
    usable_workers,
)
from moco_hf.errors import DataError, RunError, UsageError, first_line
from moco_hf.hub_upload import HubPublisher
from moco_hf.image_processing import image_processor_for
from moco_hf.knn import KNN_FEATURES, KnnMonitor, KnnSplits
from moco_hf.model_card import EvaluationResult, TrainingSummary, describe_hardware, render_model_card
from moco_hf.optimization import build_optimizer
from moco_hf.plotting import plot_knn_curve, plot_training_curves
from moco_hf.schedules import learning_rate_scheduler, momentum_at
from moco_hf.warm_start import load_pretrained_weights

logger = logging.getLogger("moco_hf.pretrain")


@dataclass
class ModelArguments:
    preset: Literal[PRESET_NAMES] = field(default="v2", metadata={"help": "Paper recipe (v3-vit: v3 for ViTs)."})
    backbone: str | None = field(default=None, metadata={"help": "timm model name (preset's, else resnet18)."})
    backbone_kwargs: str | None = field(default=None, metadata={"help": "JSON, e.g. '{\"img_size\": 32}'."})
    dim: int | None = field(default=None, metadata={"help": "Embedding dimension (preset: 128)."})
    queue_size: int | None = field(default=None, metadata={"help": "K, negatives in the queue (preset: 65536)."})
    momentum: float | None = field(default=None, metadata={"help": "Key encoder momentum m (preset: 0.999)."})
    softmax_temperature: float | None = field(default=None, metadata={"help": "T (preset: v1 0.07, v2 0.2)."})
    mlp: bool | None = field(default=None, metadata={"help": "MLP projection head (preset: v1 no, v2 yes)."})
    shuffle_bn: Literal[SHUFFLE_BN_MODES] | None = field(default=None, metadata={"help": "Preset: auto."})
    projector_layers: int | None = field(default=None, metadata={"help": "Layers of the MLP head (v3 ViT: 3)."})
    symmetric_loss: bool | None = field(default=None, metadata={"help": "Both views as queries (preset: v3)."})
    freeze_patch_embed: bool | None = field(default=None, metadata={"help": "v3 ViT trick: frozen patch embed."})
    num_splits: int | None = field(default=None, metadata={"help": "BatchNorm groups of 'split' (preset: 8)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from these weights: a saved MocoModel (folder or Hub id), or a timm model with "
                  "pretrained weights (e.g. 'resnet50.a1_in1k', 'hf-hub:timm/...', an exported encoder folder) for "
                  "both backbones (domain-adaptive pretraining)."},
    )  # fmt: skip
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the Hub model's own code to load."})
    cifar_stem: bool | None = field(
        default=None, metadata={"help": "ResNets on 32 px: 3x3/1 first conv, no max-pool (preset: off)."}
    )
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm in the query encoder (many processes)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id or local path (default: CIFAR-10)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N images only."})
    train_split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected if unique)."})
    streaming: bool = field(default=False, metadata={"help": "Iterate without materialising the dataset."})
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Shuffle buffer of --streaming (otherwise every epoch is fully shuffled)."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Crop size: 32 for CIFAR-size images (preset's, else 224 for ImageNet)."}
    )
    image_mean: list[float] | None = field(default=None, metadata={"help": "Per-channel mean (preset's, else "
                                                                    "ImageNet's)."})  # fmt: skip
    image_std: list[float] | None = field(default=None, metadata={"help": "Per-channel std (preset's, else "
                                                                  "ImageNet's)."})  # fmt: skip
    dataloader_num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process."})
    augment_on_device: bool = field(
        default=True,
        metadata={"help": "Crop, jitter, blur and flip whole batches on the training device (workers only decode and "
                  "draw parameters); false: each image in the workers (torchvision v2)."},
    )  # fmt: skip
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Labelled data for kNN (default: same)."})
    eval_train_split: str = field(default="train", metadata={"help": "kNN memory bank split."})
    eval_split: str = field(default="test", metadata={"help": "kNN query split."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected)."})
    knn_max_train_samples: int | None = field(default=10_000, metadata={"help": "Bank size cap (None: all)."})
    knn_max_eval_samples: int | None = field(default=2_000, metadata={"help": "Query count cap (None: all)."})
    knn_k: int = field(default=200, metadata={"help": "Neighbours of the weighted kNN."})
    knn_temperature: float = field(default=0.1, metadata={"help": "Temperature of the kNN weights."})
    knn_feature: Literal[KNN_FEATURES] = field(
        default="backbone",
        metadata={"help": "The kNN accuracy reported: backbone (pooled features that transfer) or head (projection "
                  "output, the official CIFAR demo's). Both are recorded in knn_curve.json."},
    )  # fmt: skip


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/moco", metadata={"help": "Where checkpoints and the model go."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Images per process and micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimizer step. Each micro-batch still momentum-updates the key encoder and "
            "enqueues its keys; the learning rate scales with the effective batch."
        },
    )
    learning_rate: float | None = field(default=None, metadata={"help": "Default: preset lr x global batch / 256."})
    lr_scheduler_type: Literal[LR_SCHEDULES] | None = field(default=None, metadata={"help": "Preset: v1 step."})
    optimizer: Literal[OPTIMIZERS] | None = field(default=None, metadata={"help": "Preset: v1/v2 sgd, v3 lars."})
    weight_decay: float | None = field(default=None, metadata={"help": "Preset: v1/v2 1e-4, v3 1e-6."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warmup steps."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Warmup as a fraction of all steps."})
    num_train_epochs: float = field(default=200, metadata={"help": "Passes over the data (fractions allowed)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Overrides num_train_epochs."})
    stop_after_epochs: float | None = field(
        default=None,
        metadata={"help": "Stop (evaluate and save) after this many epochs, leaving the schedules on "
                  "--num_train_epochs / --max_train_steps: the first epochs of a longer run; resume to go on."},
    )  # fmt: skip
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Wall-time budget: stop, evaluate and save once training has run this long."}
    )
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        default=None, metadata={"help": "Default: the launcher's (accelerate config)."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds the model, the data order and every augmentation."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save every N steps (and at the end)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    with_tracking: bool = field(default=False, metadata={"help": "Log to trackers (--report_to, else tensorboard)."})
    report_to: str | None = field(
        default=None, metadata={"help": "tensorboard | wandb | all | ... (turns tracking on; 'none': off)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log metrics.jsonl and trackers every N steps."})
    eval_every: float | None = field(default=None, metadata={"help": "kNN every N epochs (always at the end)."})
    knn_monitor: bool = field(default=True, metadata={"help": "Measure kNN accuracy during and after training."})
    knn_at_start: bool = field(default=True, metadata={"help": "kNN of the initial (random) encoder first."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per kNN forward pass."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile both backbones."})
    channels_last: bool = field(default=False, metadata={"help": "NHWC memory format (faster convs on GPUs)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the model (and its card) to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id (default: the output dir's name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repo as private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Push to this branch (default: main)."})
    create_pr: bool = field(default=False, metadata={"help": "Push as a pull request instead of a commit."})
    hub_wait_seconds: float = field(
        default=600, metadata={"help": "At the end, wait at most this long for uploads (they never hold training)."}
    )
    hub_strategy: Literal["end", "every_save"] = field(
        default="end", metadata={"help": "end: push the final model; every_save: also at each checkpoint."}
    )


# ---- setup ------------------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """From the command line (no abbreviations: a typo must not pick another flag) or one YAML/JSON file."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments), allow_abbrev=False)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    try:
        return parser.parse_args_into_dataclasses(argv)
    except ValueError as error:  # HfArgumentParser's "Some specified arguments are not used"
        raise UsageError(f"{first_line(error)} (see --help).") from error


# What the command uses where neither a flag nor the preset says (MocoConfig's own defaults are ResNet-50's).
COMMAND_DEFAULTS = {"backbone": "resnet18", "image_size": 224, "image_mean": list(IMAGENET_DEFAULT_MEAN),
                    "image_std": list(IMAGENET_DEFAULT_STD)}  # fmt: skip


def build_config(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> MocoConfig:
    """The preset's recipe, with every field given on the command line taking precedence."""
    overrides = {name: value for name, value in COMMAND_DEFAULTS.items() if name not in PRESETS[model_args.preset]}
    if model_args.backbone_kwargs is not None:
        overrides["backbone_kwargs"] = json.loads(model_args.backbone_kwargs)
    for name in ("backbone", "cifar_stem", "num_splits", "dim", "queue_size", "momentum", "softmax_temperature",
                 "mlp", "shuffle_bn", "projector_layers", "symmetric_loss", "freeze_patch_embed"):  # fmt: skip
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    # The preprocessing the encoder expects, recorded for exports and model cards.
    for name in ("image_size", "image_mean", "image_std"):
        if getattr(data_args, name) is not None:
            overrides[name] = getattr(data_args, name)
    for name, config_name in (("optimizer", "optimizer"), ("lr_scheduler_type", "lr_schedule"),
                              ("weight_decay", "weight_decay")):  # fmt: skip
        if getattr(train_args, name) is not None:
            overrides[config_name] = getattr(train_args, name)
    try:
        return MocoConfig.from_preset(model_args.preset, **overrides)
    except ValueError as error:  # the config names the field and what it accepts
        raise UsageError(first_line(error)) from error


def trackers(train_args: TrainArguments) -> str | None:
    """`--report_to` turns tracking on by itself (as in transformers); `--with_tracking` alone means tensorboard."""
    if train_args.report_to == "none":
        return None
    return train_args.report_to or ("tensorboard" if train_args.with_tracking else None)


def build_accelerator(train_args: TrainArguments) -> Accelerator:
    return Accelerator(
        # With no accelerator, `accelerate launch --multi_gpu` processes form a gloo group only if told they are on
        # the CPU; otherwise each would train alone.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=trackers(train_args),
        project_dir=train_args.output_dir,
        # The queue and key encoder are identical on every rank by construction; broadcasting them each step
        # (DDP's default) would copy K x dim floats per step for nothing.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


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


def plan_data(data_args: DataArguments, train_args: TrainArguments, accelerator: Accelerator) -> DataPlan:
    """Load the training split, plan who reads what (a global order, or shards of a stream) and count the steps."""
    dataset_name = data_args.dataset_name or default_dataset_name()
    train_set = load_image_dataset(dataset_name, data_args.train_split, data_args.streaming,
                                   data_args.dataset_config_name, data_args.cache_dir)  # fmt: skip
    if data_args.max_train_samples is not None:
        train_set = take_rows(train_set, 0, data_args.max_train_samples)
    world, micro_batch = accelerator.num_processes, train_args.per_device_train_batch_size
    global_batch = micro_batch * world * train_args.gradient_accumulation_steps
    rows = dataset_rows(train_set)
    if data_args.max_train_samples is not None:  # a stream's `take` keeps the whole split's length in its info
        rows = min(rows or data_args.max_train_samples, data_args.max_train_samples)
    if micro_batch < 2:
        raise UsageError("--per_device_train_batch_size must be at least 2: BatchNorm cannot normalise one image.")
    if rows is not None and rows < global_batch:
        raise DataError(
            f"the global batch ({micro_batch} per process x {world} processes x "
            f"{train_args.gradient_accumulation_steps} accumulation) is larger than the dataset ({rows} images); "
            "lower --per_device_train_batch_size or --gradient_accumulation_steps."
        )
    if train_args.max_train_steps is None and rows is None:
        raise UsageError("the stream's length is unknown: pass --max_train_steps.")
    steps_per_epoch = max(1, (rows or 0) // global_batch)  # an epoch is whole steps; the rest waits for the next
    total_steps = train_args.max_train_steps
    if total_steps is None:
        total_steps = max(1, round(train_args.num_train_epochs * steps_per_epoch))
    image_column = find_image_column(train_set, data_args.image_column)
    if isinstance(train_set, Dataset):  # random access: every process reads its part of one global order
        order = GlobalOrder(len(train_set), global_batch, train_args.seed)
        return DataPlan(dataset_name, train_set, order, image_column, micro_batch, global_batch, total_steps,
                        steps_per_epoch, max(0, data_args.dataloader_num_workers))  # fmt: skip
    stream = as_iterable(train_set, num_shards=max(1, world * max(1, data_args.dataloader_num_workers)))
    stream = shard_for_process(stream, accelerator.process_index, world)
    stream = stream.shuffle(seed=train_args.seed, buffer_size=data_args.shuffle_buffer_size)
    return DataPlan(dataset_name, stream, None, image_column, micro_batch, global_batch, total_steps,
                    steps_per_epoch if rows is not None else total_steps,
                    usable_workers(stream, data_args.dataloader_num_workers))  # fmt: skip


def build_augmentation(config: MocoConfig, data_args: DataArguments) -> TwoCropPipeline:
    """The recipe's two crops: batched on the training device, or per image in the loader workers."""
    build = BatchedTwoCrops if data_args.augment_on_device else build_two_crops
    return build(config.augmentation, config.image_size, config.image_mean, config.image_std)


def build_loader(plan: DataPlan, two_crops: TwoCropPipeline, train_args: TrainArguments, accelerator: Accelerator,
                 start_step: int) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The endless iterator of this process's two-crop micro-batches, from training step `start_step` on."""
    options = {"num_workers": plan.num_workers, "worker_init_fn": init_loader_worker,
               "pin_memory": accelerator.device.type == "cuda",
               # Its own generator: the loader draws its workers' base seed from it, not from the global RNG that
               # a checkpoint restores (which would then differ from an uninterrupted run's).
               "generator": torch.Generator().manual_seed(train_args.seed)}  # fmt: skip
    if plan.order is not None:
        keys = MicroBatchKeys(plan.order, plan.micro_batch, accelerator.process_index, accelerator.num_processes,
                              train_args.gradient_accumulation_steps, start_step)  # fmt: skip
        dataset = TwoCropRows(plan.source, plan.image_column, two_crops, plan.order)
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=keys, collate_fn=keep_batch, **options))
    skip_batches = start_step * train_args.gradient_accumulation_steps
    batches = TwoCropBatches(plan.source, plan.image_column, two_crops, plan.micro_batch, train_args.seed,
                             accelerator.process_index, skip_batches)  # fmt: skip
    data = iter(torch.utils.data.DataLoader(batches, batch_size=None, **options))
    for _ in range(batches.batches_to_drop(plan.num_workers)):
        next_batch(data)
    return data


def build_model(config: MocoConfig, model_args: ModelArguments, train_args: TrainArguments, world: int,
                device: torch.device) -> MocoModel:  # fmt: skip
    if model_args.sync_bn and world > 1 and device.type != "cuda":
        raise UsageError(
            "--sync_bn needs CUDA GPUs (PyTorch's DDP runs SyncBatchNorm on GPU modules only); processes on the "
            "CPU keep the paper's remedy, the key batch shuffle across processes (--shuffle_bn ddp, the default)."
        )
    try:
        model = MocoModel(config)
    except ValueError as error:  # a setting that does not fit the backbone, e.g. --cifar_stem on a ViT
        raise UsageError(first_line(error)) from error
    if model_args.model_name_or_path:
        source = load_pretrained_weights(model, model_args.model_name_or_path, model_args.trust_remote_code)
        logger.info("Initialised from %s.", source)
    if model_args.sync_bn and world > 1:
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
    elif model_args.sync_bn:
        logger.warning("--sync_bn with one process: there is nothing to synchronise.")
    if train_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if train_args.torch_compile:
        model.encoder_q.backbone.compile()
        model.encoder_k.backbone.compile()
    return model


def uses_sync_batch_norm(model: MocoModel) -> bool:
    return any(isinstance(module, torch.nn.SyncBatchNorm) for module in model.encoder_q.modules())


def warmup_steps(train_args: TrainArguments, total_steps: int) -> int:
    if train_args.warmup_ratio is not None:
        if not 0 <= train_args.warmup_ratio < 1:
            raise UsageError(f"--warmup_ratio must be in [0, 1), got {train_args.warmup_ratio}.")
        return int(train_args.warmup_ratio * total_steps)
    return train_args.num_warmup_steps


def resume(train_args: TrainArguments, output_dir: Path, accelerator: Accelerator, settings: dict) -> TrainerState:
    """The state to start from: a checkpoint's when resuming (and an intact one exists), else a fresh one."""
    if not train_args.resume_from_checkpoint:
        return TrainerState(settings=settings)
    checkpoint = resolve_checkpoint(train_args.resume_from_checkpoint, output_dir)
    if checkpoint is None:
        logger.info("No checkpoint in %s yet: starting from scratch.", output_dir / "checkpoints")
        return TrainerState(settings=settings)
    state = load_checkpoint(accelerator, checkpoint, settings)
    if accelerator.is_main_process and checkpoint.parent.resolve() == (output_dir / "checkpoints").resolve():
        for moved in set_aside_newer_checkpoints(checkpoint, output_dir):
            logger.warning("Rolled back to %s: the newer checkpoint is kept as %s.", checkpoint.name, moved)
    logger.info("Resumed from %s at step %d.", checkpoint, state.completed_steps)
    return state


def run_settings(config: MocoConfig, plan: DataPlan, data_args: DataArguments, train_args: TrainArguments,
                 learning_rate: float, num_processes: int) -> dict[str, Any]:  # fmt: skip
    """What a checkpoint records of the run, for `check_resume_settings`."""
    return {
        "data_order": "global" if plan.order is not None else "stream",
        "global_batch_size": plan.global_batch,
        "per_device_train_batch_size": plan.micro_batch,
        "num_processes": num_processes,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "seed": train_args.seed,
        "learning_rate": learning_rate,
        "dataloader_num_workers": data_args.dataloader_num_workers,
        "total_steps": plan.total_steps,
        **{name: getattr(config, name) for name in MATCHING_CONFIG_FIELDS},
    }


def build_knn_monitor(
    config: MocoConfig,
    data_args: DataArguments,
    train_args: TrainArguments,
    dataset_name: str,
    accelerator: Accelerator,
) -> KnnMonitor:
    splits = KnnSplits(
        dataset_name=data_args.eval_dataset_name or dataset_name,
        bank_split=data_args.eval_train_split,
        query_split=data_args.eval_split,
        max_bank_samples=data_args.knn_max_train_samples,
        max_query_samples=data_args.knn_max_eval_samples,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        config_name=data_args.dataset_config_name if data_args.eval_dataset_name is None else None,
        streaming=data_args.streaming,
        cache_dir=data_args.cache_dir,
    )
    return KnnMonitor(splits, accelerator, config.image_size, config.image_mean, config.image_std, data_args.knn_k,
                      data_args.knn_temperature, train_args.per_device_eval_batch_size,
                      data_args.knn_feature)  # fmt: skip


# ---- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop and the saves read; built once by `train`, never changed by the loop."""

    args: TrainArguments
    data_args: DataArguments
    config: MocoConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: DataPlan
    two_crops: TwoCropPipeline
    knn: KnnMonitor | None
    learning_rate: float
    output_dir: Path
    repo_id: str
    publisher: HubPublisher | None
    lock: OutputDirLock | None  # the main process's hold on output_dir
    session_start: float = field(default_factory=time.perf_counter)
    seconds_before: float = 0.0  # training time of the runs this one resumes

    @property
    def moco(self) -> MocoModel:
        return self.accelerator.unwrap_model(self.model)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def training_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.session_start


class StopSignal:
    """Records SIGTERM/SIGINT; the loop stops at the end of the step in progress and saves a checkpoint of a
    consistent state. A second signal interrupts at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum)


@contextmanager
def stop_on_signals() -> Iterator[StopSignal]:
    """Handle SIGTERM and SIGINT with a `StopSignal` while training; the previous handlers come back after."""
    stop = StopSignal()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def next_batch(data: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """The next two-crop batch; a data error reported by a loader worker becomes a one-line `DataError`."""
    batch = next(data)
    if "error" in batch:
        raise DataError(batch["error"])
    return batch


def record_knn(run: Run, state: TrainerState) -> float | None:
    """kNN top-1 now (None with the monitor off), added to the history and the trackers."""
    if run.knn is None:
        return None
    accuracies = {f"knn_top1_{feature}": value for feature, value in run.knn(run.moco).items()}
    accuracy = accuracies[f"knn_top1_{run.knn.feature}"]
    state.knn_history.append({"step": state.completed_steps, "knn_top1": accuracy, **accuracies,
                              "train_seconds": run.training_seconds()})  # fmt: skip
    run.accelerator.log({"knn_top1": accuracy, **accuracies}, step=state.completed_steps)
    return accuracy


def save_model(run: Run, state: TrainerState, folder: Path) -> None:
    """`save_pretrained` plus a model card with the run's settings and results so far."""
    try:
        run.moco.save_pretrained(folder)
    except Exception as error:  # OSError, SafetensorError: the disk is full or not writable
        raise RunError(
            f"could not write the model to {folder}: {first_line(error) or type(error).__name__}. The checkpoints "
            "are intact; free some space and resume with --resume_from_checkpoint latest to save it."
        ) from error
    image_processor_for(run.config).save_pretrained(folder)  # for AutoImageProcessor, the pipeline and the widget
    summary = training_summary(run, state)
    summary.save(folder)  # `moco-hf export` carries it over to the encoder's card
    card_repo_id = run.publisher.repo_id if run.publisher else run.repo_id  # the Hub may add the user's namespace
    render_model_card(run.config, card_repo_id, "model", summary).save(folder / "README.md")


def training_summary(run: Run, state: TrainerState) -> TrainingSummary:
    config, knn = run.config, run.knn
    card_dataset = run.data_args.dataset_name or HUB_CIFAR10  # the default data is a copy of this Hub dataset
    last = state.knn_history[-1] if state.knn_history else None
    results = [
        EvaluationResult(f"kNN top-1 (k={knn.k}, T={knn.temperature})",
                         run.data_args.eval_dataset_name or card_dataset, knn.query_description, last["knn_top1"])
    ] if last and last["step"] > 0 else []  # fmt: skip
    optimizer = (
        f"{config.optimizer.upper()} (momentum {config.sgd_momentum}, weight decay {config.weight_decay})"
        if config.optimizer != "adamw"
        else f"AdamW (weight decay {config.weight_decay})"
    )
    return TrainingSummary(
        dataset=card_dataset,
        hyperparameters={
            "steps": state.completed_steps,
            "epochs": round(state.completed_steps / run.plan.steps_per_epoch, 2),
            "global batch size": run.plan.global_batch,
            "optimizer": optimizer,
            "learning rate": f"{run.learning_rate:.4g} ({config.lr_schedule} schedule)",
            "crop size": config.image_size,
            "mixed precision": run.accelerator.mixed_precision,
        },
        results=results,
        training_time=f"{run.training_seconds() / 60:.1f} min",
        hardware=describe_hardware(run.accelerator.num_processes, run.accelerator.device),
        skipped_images=state.skipped_images,
    )


def checkpoint(run: Run, state: TrainerState) -> None:
    """A checkpoint of the state now; with `--hub_strategy every_save`, also a background push of the model."""
    state.training_seconds = run.training_seconds()
    path = save_checkpoint(run.accelerator, run.moco, run.output_dir, state, run.args.checkpoints_total_limit)
    logger.info("Saved checkpoint %s", path)
    if run.publisher is not None and run.args.hub_strategy == "every_save":
        snapshot = run.output_dir / f".hub-upload-{path.name}"  # uploads read it while training goes on
        save_model(run, state, snapshot)
        run.publisher.upload(snapshot, f"Training in progress, step {state.completed_steps}", remove_after=True)


class MetricsWindow:
    """Sums of the loss, contrastive accuracy and images over the steps since the last log line."""

    def __init__(self) -> None:
        self.start, self.images, self.loss, self.top1, self.steps = time.perf_counter(), 0, 0.0, 0.0, 0
        self.lr = math.nan

    def add(self, loss: float, top1: float, images: int, lr: float) -> None:
        """One micro-batch's loss, contrastive top-1 and images, trained at learning rate `lr`."""
        self.loss, self.top1, self.images, self.steps = self.loss + loss, self.top1 + top1, self.images + images, \
            self.steps + 1  # fmt: skip
        self.lr = lr

    def metrics(self, run: Run, state: TrainerState) -> dict[str, float]:
        """The `metrics.jsonl` row of this window."""
        step = state.completed_steps
        return {
            "step": step,
            "epoch": step / run.plan.steps_per_epoch,
            "loss": self.loss / self.steps,
            "contrastive_top1": 100.0 * self.top1 / self.steps,
            "lr": self.lr,  # the last step's (the scheduler already holds the next one's)
            "images_per_second": self.images / (time.perf_counter() - self.start),
            "queue_fill": min(1.0, step * run.plan.global_batch / max(1, run.config.queue_size)),
            "skipped_images": state.skipped_images,
        }


def log_metrics(run: Run, metrics: dict[str, float], progress: tqdm) -> None:
    progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.3g}",
                         img_s=f"{metrics['images_per_second']:.0f}")  # fmt: skip
    run.accelerator.log(metrics, step=metrics["step"])
    if run.accelerator.is_main_process:
        with run.metrics_path.open("a") as stream:
            stream.write(json.dumps(metrics) + "\n")


def training_step(run: Run, state: TrainerState, data: Iterator[dict[str, Any]], window: MetricsWindow) -> None:
    """One optimizer step: `gradient_accumulation_steps` micro-batches, each a full MoCo step (key encoder
    momentum update, keys enqueued)."""
    accelerator, moco = run.accelerator, run.moco
    moco.key_momentum = momentum_at(state.completed_steps, run.plan.total_steps, run.config.momentum,
                                    run.config.momentum_schedule)  # fmt: skip
    lr = run.scheduler.get_last_lr()[0]
    for _ in range(run.args.gradient_accumulation_steps):
        batch = next_batch(data)
        state.skipped_images += batch["skipped"]
        query, key = run.two_crops.on_device(batch, accelerator.device)
        if run.args.channels_last:
            query, key = (t.contiguous(memory_format=torch.channels_last) for t in (query, key))
        with accelerator.accumulate(run.model):
            with accelerator.autocast():
                output = run.model(pixel_values=query, key_pixel_values=key)
            accelerator.backward(output.loss)
            if accelerator.sync_gradients and run.args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(moco.encoder_q.parameters(), run.args.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        loss = output.loss.item()
        if not math.isfinite(loss):
            raise RunError(
                f"the loss became {loss} at step {state.completed_steps + 1}; training stopped. The last "
                "checkpoint is intact; lower --learning_rate or set --max_grad_norm and resume from it."
            )
        top1 = (output.logits.argmax(dim=1) == output.labels).float().mean().item()
        window.add(loss, top1, query.shape[0] * accelerator.num_processes, lr)
    state.completed_steps += 1


def out_of_time(run: Run) -> bool:
    """True once `--max_train_minutes` of training (this session and the ones it resumes) have passed; every
    process takes rank 0's answer, so that all stop at the same step."""
    if run.args.max_train_minutes is None:
        return False
    elapsed = run.training_seconds() >= 60 * run.args.max_train_minutes
    over = torch.tensor([float(elapsed)], device=run.accelerator.device)
    return bool(broadcast(over, from_process=0).item())


def train_loop(run: Run, state: TrainerState, data: Iterator[dict[str, Any]], stop: StopSignal) -> None:
    """Steps until `total_steps` (or `--stop_after_epochs`), the wall-time budget or a stop signal, logging, kNN
    monitoring and checkpointing on the way."""
    args, plan = run.args, run.plan
    eval_every_steps = int(args.eval_every * plan.steps_per_epoch) if args.eval_every and run.knn else None
    stop_step = plan.total_steps
    if args.stop_after_epochs is not None:
        stop_step = min(stop_step, round(args.stop_after_epochs * plan.steps_per_epoch))
    progress = tqdm(total=stop_step, initial=state.completed_steps,
                    disable=not run.accelerator.is_local_main_process, desc="MoCo")  # fmt: skip
    run.model.train()
    window = MetricsWindow()
    try:
        while state.completed_steps < stop_step:
            training_step(run, state, data, window)
            progress.update(1)
            if stop.received:
                return
            step, last = state.completed_steps, state.completed_steps == stop_step
            over_budget = out_of_time(run)
            if step % args.logging_steps == 0 or last or over_budget:
                log_metrics(run, window.metrics(run, state), progress)
                window = MetricsWindow()
            if eval_every_steps and step % eval_every_steps == 0 and not last and not over_budget:
                logger.info("step %d: kNN top-1 %.2f%%", step, record_knn(run, state))
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                checkpoint(run, state)
            if over_budget:
                logger.warning("--max_train_minutes %s reached at step %d: stopping.", args.max_train_minutes, step)
                return
    finally:
        progress.close()  # so that an error message starts on its own line


def write_results(run: Run, state: TrainerState, accuracy: float | None) -> dict[str, Any]:
    """`results.json`, the kNN curve (JSON and PNG, against epochs) and the training curves."""
    history, epochs = state.knn_history, state.completed_steps / run.plan.steps_per_epoch
    results = {
        "knn_top1": accuracy,
        "knn_top1_initial": history[0]["knn_top1"] if history and history[0]["step"] == 0 else None,
        "knn_dataset": run.knn.dataset_name if run.knn else None,
        "knn_split": run.knn.query_description if run.knn else None,
        "knn_feature": run.knn.feature if run.knn else None,
        "steps": state.completed_steps,
        "epochs": epochs,
        "global_batch_size": run.plan.global_batch,
        "train_seconds": run.training_seconds(),
        "seconds_per_epoch": run.training_seconds() / max(epochs, 1e-9),
        "skipped_images": state.skipped_images,
        "device": describe_hardware(run.accelerator.num_processes, run.accelerator.device),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (run.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    if history:
        curve = [{**point, "epoch": point["step"] / run.plan.steps_per_epoch} for point in history]
        (run.output_dir / "knn_curve.json").write_text(json.dumps(curve, indent=2))
        plot_knn_curve(curve, run.output_dir / "knn_curve.png", f"{run.config.backbone}, {results['knn_split']}")
    plot_training_curves(run.metrics_path, history, run.output_dir / "training_curves.png")
    return results


def finish(run: Run, state: TrainerState) -> None:
    """The final kNN, checkpoint, model with its card, results, curves and Hub push."""
    accuracy = record_knn(run, state)
    if not (run.args.checkpointing_steps and state.completed_steps % run.args.checkpointing_steps == 0):
        checkpoint(run, state)
    if not run.accelerator.is_main_process:
        return
    save_model(run, state, run.output_dir / "model")
    if run.publisher is not None:
        run.publisher.upload(run.output_dir / "model", f"End of training, step {state.completed_steps}")
    results = write_results(run, state, accuracy)
    if state.skipped_images:
        logger.warning("%d images could not be decoded and were skipped.", state.skipped_images)
    if run.publisher is not None and run.publisher.finish(run.args.hub_wait_seconds):
        print(f"Pushed to the Hub: {run.publisher.repo_id}")
    model = f"after {state.completed_steps} steps. Model: {run.output_dir / 'model'}"
    if run.knn is None:
        print(f"Trained {model} (kNN monitor off)")
        return
    initial = results["knn_top1_initial"]
    print(
        f"kNN top-1 (k={run.knn.k}) on {run.knn.query_description}: "
        + (f"random init {initial:.2f}% -> " if initial is not None else "")
        + f"MoCo {accuracy:.2f}% {model}"
    )


# ---- main -------------------------------------------------------------------------------------------------------


def setup(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> tuple[Run, TrainerState]:
    """Accelerator, config, data, model, optimizer, schedule, monitor and Hub repo; the state to start from."""
    output_dir = Path(train_args.output_dir)
    accelerator = build_accelerator(train_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger("moco_hf").setLevel(logging.WARNING)
    set_seed(train_args.seed)
    config = build_config(model_args, data_args, train_args)
    plan = plan_data(data_args, train_args, accelerator)
    model = build_model(config, model_args, train_args, accelerator.num_processes, accelerator.device)
    if 0 < config.queue_size < plan.global_batch:
        logger.warning("The queue (K=%d) is smaller than the global batch (%d): each step keeps only the newest %d "
                       "keys as negatives.", config.queue_size, plan.global_batch, config.queue_size)  # fmt: skip
    learning_rate = train_args.learning_rate or config.base_learning_rate * plan.global_batch / 256
    optimizer = build_optimizer(model, config, learning_rate)
    scheduler = learning_rate_scheduler(optimizer, config.lr_schedule, plan.total_steps,
                                        warmup_steps(train_args, plan.total_steps), plan.steps_per_epoch)  # fmt: skip
    lock = None
    if accelerator.is_main_process:
        check_output_dir(output_dir, model)
        lock = OutputDirLock(output_dir)  # held until the process ends
        remove_incomplete_checkpoints(output_dir)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    settings = run_settings(config, plan, data_args, train_args, learning_rate, accelerator.num_processes)
    state = resume(train_args, output_dir, accelerator, settings)
    knn = build_knn_monitor(config, data_args, train_args, plan.dataset_name, accelerator) \
        if train_args.knn_monitor else None  # fmt: skip
    if train_args.create_pr and train_args.hub_revision:
        raise UsageError("--create_pr opens a pull request against the default branch; drop --hub_revision.")
    repo_id = train_args.hub_model_id or output_dir.resolve().name  # also the model card's title
    publisher = None
    if train_args.push_to_hub and accelerator.is_main_process:
        publisher = HubPublisher(repo_id, train_args.hub_token, train_args.hub_private_repo, train_args.hub_revision,
                                 train_args.create_pr)  # fmt: skip
    run = Run(train_args, data_args, config, accelerator, model, optimizer, scheduler, plan,
              build_augmentation(config, data_args), knn, learning_rate, output_dir, repo_id, publisher, lock,
              seconds_before=state.training_seconds)  # fmt: skip
    write_run_config(run, model_args)
    return run, state


def write_run_config(run: Run, model_args: ModelArguments) -> None:
    run_config = {**asdict(model_args), **asdict(run.data_args), **asdict(run.args)}
    run_config |= {
        # What the run used, resolved: the launcher's precision, the default data's path, the scaled lr.
        "mixed_precision": run.accelerator.mixed_precision,
        "dataset_name": run.plan.dataset_name,
        "learning_rate": run.learning_rate,
        "total_steps": run.plan.total_steps,
        "num_processes": run.accelerator.num_processes,
    }
    if run.accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
    if trackers(run.args):
        run.accelerator.init_trackers("moco", config={k: str(v) for k, v in run_config.items()})


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> int:
    """Setup, then the loop, then the saves; returns the exit status (128 + signal when stopped by one)."""
    run, state = setup(model_args, data_args, train_args)
    accelerator, plan = run.accelerator, run.plan
    with stop_on_signals() as stop:
        if run.knn is not None and train_args.knn_at_start and state.completed_steps == 0:
            logger.info("kNN top-1 of the initial (random) encoder: %.2f%%", record_knn(run, state))
        logger.info(
            "Training %s (%s) for %d steps: %d processes x %d images x %d accumulation = %d per step, lr %.4g, "
            "%d loader workers per process, shuffle_bn=%s, query encoder BatchNorm: %s, augmentation on %s.",
            run.config.backbone, model_args.preset, plan.total_steps, accelerator.num_processes, plan.micro_batch,
            train_args.gradient_accumulation_steps, plan.global_batch, run.learning_rate, plan.num_workers,
            run.moco.resolve_shuffle_bn(),
            f"synchronised across {accelerator.num_processes} processes" if uses_sync_batch_norm(run.moco)
            else "per process", accelerator.device if data_args.augment_on_device else "the loader workers",
        )  # fmt: skip
        data = build_loader(plan, run.two_crops, train_args, accelerator, state.completed_steps)
        try:
            train_loop(run, state, data, stop)
        finally:
            close_loader(data)
        if stop.received:
            logger.warning("%s received: saving a checkpoint at step %d before exiting.", stop.received.name,
                           state.completed_steps)  # fmt: skip
            checkpoint(run, state)
            return 128 + stop.received
    finish(run, state)
    accelerator.end_training()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return train(*parse_arguments(sys.argv[1:] if argv is None else argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
