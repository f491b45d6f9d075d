#!/usr/bin/env python
"""MoCo pretraining of a timm backbone on any image dataset, with Accelerate.

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
import os
import pickle
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from accelerate.utils import load as accelerate_load
from tqdm.auto import tqdm
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python training/pretrain.py` from a checkout

from moco_hf import MocoConfig, MocoModel
from moco_hf.configuration_moco import PRESETS
from moco_hf.hub import EvaluationResult, TrainingSummary, describe_hardware, render_model_card
from moco_hf.modeling_moco import momentum_at
from training.augmentations import IMAGENET_MEAN, IMAGENET_STD, build_two_crops, evaluation_transform
from training.data import (
    DataError,
    TwoCropBatches,
    as_iterable,
    default_dataset_name,
    find_image_column,
    find_label_column,
    first_line,
    labelled_images,
    load_image_dataset,
    seed_worker_env,
    shard_for_process,
    usable_workers,
)
from training.hub_upload import HubPublisher
from training.knn import extract_features, knn_accuracy
from training.plotting import plot_training_curves

logger = logging.getLogger("moco_hf.pretrain")
CHECKPOINT_PREFIX = "step_"
HUB_STRATEGIES = ("end", "every_save")


@dataclass
class ModelArguments:
    preset: str = field(default="v2", metadata={"help": f"Paper recipe: one of {sorted(PRESETS)}."})
    backbone: str = field(default="resnet18", metadata={"help": "timm model name."})
    backbone_kwargs: str | None = field(default=None, metadata={"help": "JSON, e.g. '{\"img_size\": 32}'."})
    dim: int | None = field(default=None, metadata={"help": "Embedding dimension (preset: 128)."})
    queue_size: int | None = field(default=None, metadata={"help": "K, negatives in the queue (preset: 65536)."})
    momentum: float | None = field(default=None, metadata={"help": "Key encoder momentum m (preset: 0.999)."})
    softmax_temperature: float | None = field(default=None, metadata={"help": "T (preset: v1 0.07, v2 0.2)."})
    mlp: bool | None = field(default=None, metadata={"help": "MLP projection head (preset: v1 no, v2 yes)."})
    shuffle_bn: str | None = field(default=None, metadata={"help": "auto | ddp | split | none (preset: auto)."})
    projector_layers: int | None = field(default=None, metadata={"help": "Layers of the MLP head (v3 ViT: 3)."})
    symmetric_loss: bool | None = field(default=None, metadata={"help": "Both views as queries (preset: v3)."})
    freeze_patch_embed: bool | None = field(default=None, metadata={"help": "v3 ViT trick: frozen patch embed."})
    num_splits: int = field(default=8, metadata={"help": "BatchNorm groups of the 'split' emulation."})
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm in the query encoder (many processes)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub id or local path (default: CIFAR-10)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected if unique)."})
    streaming: bool = field(default=False, metadata={"help": "Iterate without materialising the dataset."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of the stream."})
    image_size: int = field(default=224, metadata={"help": "Crop size: 32 for CIFAR-size images, 224 for ImageNet."})
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    dataloader_num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Labelled data for kNN (default: same)."})
    eval_train_split: str = field(default="train", metadata={"help": "kNN memory bank split."})
    eval_split: str = field(default="test", metadata={"help": "kNN query split."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected)."})
    knn_max_train_samples: int | None = field(default=10_000, metadata={"help": "Bank size cap (None: all)."})
    knn_max_eval_samples: int | None = field(default=2_000, metadata={"help": "Query count cap (None: all)."})
    knn_k: int = field(default=200, metadata={"help": "Neighbours of the weighted kNN."})
    knn_temperature: float = field(default=0.1, metadata={"help": "Temperature of the kNN weights."})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/moco", metadata={"help": "Where checkpoints and the model go."})
    per_device_train_batch_size: int = field(default=256)
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimizer step. Each micro-batch still momentum-updates the key encoder and "
            "enqueues its keys; the learning rate scales with the effective batch."
        },
    )
    learning_rate: float | None = field(default=None, metadata={"help": "Default: preset lr x global batch / 256."})
    lr_scheduler_type: str | None = field(default=None, metadata={"help": "step | cosine (preset: v1 step)."})
    optimizer: str | None = field(default=None, metadata={"help": "sgd | lars | adamw (preset: v1/v2 sgd, v3 lars)."})
    weight_decay: float | None = field(default=None)
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    num_train_epochs: float = field(default=200)
    max_train_steps: int | None = field(default=None, metadata={"help": "Overrides num_train_epochs."})
    mixed_precision: str | None = field(default=None, metadata={"help": "no | bf16 | fp16 (default: launcher's)."})
    seed: int = field(default=0)
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save every N steps (and at the end)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    with_tracking: bool = field(default=False, metadata={"help": "Log to the --report_to trackers."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | wandb | all | ..."})
    logging_steps: int = field(default=10)
    eval_every: float | None = field(default=None, metadata={"help": "kNN every N epochs (always at the end)."})
    knn_at_start: bool = field(default=True, metadata={"help": "kNN of the initial (random) encoder first."})
    torch_compile: bool = field(default=False)
    channels_last: bool = field(default=False)
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the model (and its card) to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id (default: the output dir's name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repo as private."})
    hub_strategy: str = field(
        default="end", metadata={"help": "end: push the final model; every_save: also at each checkpoint."}
    )


# ---- setup ------------------------------------------------------------------------------------------------------


def build_config(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> MocoConfig:
    """The preset's recipe, with every field given on the command line taking precedence."""
    overrides = {
        "backbone": model_args.backbone,
        "backbone_kwargs": json.loads(model_args.backbone_kwargs) if model_args.backbone_kwargs else {},
        "num_splits": model_args.num_splits,
        # The preprocessing the encoder expects, recorded for exports and model cards.
        "image_size": data_args.image_size,
        "image_mean": list(data_args.image_mean),
        "image_std": list(data_args.image_std),
    }
    for name in ("dim", "queue_size", "momentum", "softmax_temperature", "mlp", "shuffle_bn", "projector_layers",
                 "symmetric_loss", "freeze_patch_embed"):  # fmt: skip
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    if train_args.optimizer is not None:
        overrides["optimizer"] = train_args.optimizer
    if train_args.lr_scheduler_type is not None:
        overrides["lr_schedule"] = train_args.lr_scheduler_type
    if train_args.weight_decay is not None:
        overrides["weight_decay"] = train_args.weight_decay
    return MocoConfig.from_preset(model_args.preset, **overrides)


def build_optimizer(model: MocoModel, config: MocoConfig, learning_rate: float) -> torch.optim.Optimizer:
    """timm's optimizer of `config.optimizer` over the trainable parameters (query encoder, predictor).

    SGD (v1/v2) decays every parameter, as the official code; LARS and AdamW (v3) leave biases and normalisation
    weights out of weight decay and (LARS) out of the trust-ratio scaling, as the official v3 code.
    """
    from timm.optim import create_optimizer_v2

    timm_name = {"sgd": "momentum", "lars": "lars", "adamw": "adamw"}[config.optimizer]  # timm's "sgd" is Nesterov
    return create_optimizer_v2(
        model,
        opt=timm_name,
        lr=learning_rate,
        weight_decay=config.weight_decay,
        momentum=config.sgd_momentum,
        filter_bias_and_bn=config.optimizer != "sgd",
    )


def learning_rate_multiplier(schedule: str, total_steps: int):
    """Step: x0.1 at 60% and 80% of training (the seed's epochs 120 and 160 of 200); cosine: half a cosine to 0."""

    def step(current: int) -> float:
        progress = current / max(1, total_steps)
        return 0.1 ** sum(progress >= milestone for milestone in (0.6, 0.8))

    def cosine(current: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(current, total_steps) / max(1, total_steps)))

    return {"step": step, "cosine": cosine}[schedule]


def dataset_rows(dataset) -> int | None:
    """Number of rows, when known without reading the data."""
    if hasattr(dataset, "__len__"):
        return len(dataset)
    splits = dataset.info.splits
    return splits[dataset.split].num_examples if splits and dataset.split in splits else None


# ---- checkpoints ------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress lives in a hidden `.tmp-` folder until renamed)."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    accelerator: Accelerator, model: MocoModel, output_dir: Path, step: int, state: dict, limit: int | None
) -> Path:
    """Accelerate state (model with queue and key encoder, optimizer, scheduler, RNG) plus `trainer_state.json`.

    Written into a temporary folder and renamed when complete, so a killed save never looks like a checkpoint.
    """
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    staging = final.with_name(f".tmp-{final.name}")
    bad = non_finite_tensors(model)
    if bad:
        raise FloatingPointError(
            f"the weights became non-finite at step {step} ({bad[0]} and {len(bad) - 1} more); nothing was saved "
            "over the last good checkpoint. Lower --learning_rate or set --max_grad_norm and resume from it."
        )
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            if limit is not None:
                for old in checkpoint_dirs(output_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
    except Exception as error:  # disk full, quota, permissions (OSError, SafetensorError...): earlier ones intact
        shutil.rmtree(staging, ignore_errors=True)
        reason = first_line(error) or type(error).__name__
        raise RunError(
            f"could not write checkpoint {final.name} in {final.parent}: {reason}. Earlier "
            "checkpoints are intact; free some space (or lower --checkpoints_total_limit) and resume with "
            "--resume_from_checkpoint latest."
        ) from error
    accelerator.wait_for_everyone()
    return final


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers (queue included) holding NaN or Inf."""
    return [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]


def check_output_dir(output_dir: Path, model: torch.nn.Module) -> None:
    """Fail before training when the output folder cannot be written or cannot hold one checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise DataError(f"--output_dir {str(output_dir)!r} is not writable: {error.strerror or error}.") from error
    # A checkpoint holds every tensor of the model, plus SGD's momentum for the query encoder's parameters.
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = model_bytes + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise DataError(
            f"--output_dir {str(output_dir)!r} has {free / 2**20:.0f} MiB free, but one checkpoint needs about "
            f"{needed / 2**20:.0f} MiB; free some space or choose another folder."
        )


def refuse_unsafe_pickles(checkpoint: Path) -> None:
    """Open every pickle of a checkpoint with `weights_only=True` before Accelerate does.

    Accelerate loads them the same way, but it silently skips RNG states it cannot read (the resume would then not
    be exact); here any file that needs code to unpickle stops the run with an explanation.
    """
    for path in sorted([*checkpoint.glob("*.pkl"), *checkpoint.glob("*.bin")]):
        try:
            accelerate_load(path, map_location="cpu")  # weights_only=True, numpy RNG states allowed
        except pickle.UnpicklingError as error:
            raise DataError(
                f"{path} is a pickle that would import or run code, so it was refused (only tensors and plain "
                f"values are loaded from checkpoints): {first_line(error)}"
            ) from error


def remove_incomplete_checkpoints(output_dir: Path) -> None:
    """Staging folders left by a run killed while saving: never complete, never resumed from."""
    for staging in (output_dir / "checkpoints").glob(".tmp-*"):
        logger.warning("Removing %s, an incomplete checkpoint of an interrupted run.", staging)
        shutil.rmtree(staging, ignore_errors=True)


def resolve_checkpoint(value: str, output_dir: Path) -> Path | None:
    if value == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise DataError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint (no trainer_state.json).")
    return path


# ---- kNN monitor ------------------------------------------------------------------------------------------------


class KnnMonitor:
    """Weighted kNN accuracy of the query backbone's features on a labelled train/test split, across processes."""

    def __init__(self, data_args: DataArguments, accelerator: Accelerator, dataset_name: str) -> None:
        self.args, self.accelerator = data_args, accelerator
        self.transform = evaluation_transform(data_args.image_size, data_args.image_mean, data_args.image_std)
        self.splits = {}
        for role, split, limit in (
            ("bank", data_args.eval_train_split, data_args.knn_max_train_samples),
            ("queries", data_args.eval_split, data_args.knn_max_eval_samples),
        ):
            dataset = load_image_dataset(dataset_name, split, data_args.streaming, data_args.dataset_config_name)
            self.image_column = find_image_column(dataset, data_args.image_column)
            self.label_column = find_label_column(dataset, data_args.label_column)
            if limit is not None:
                dataset = (
                    dataset.take(limit) if data_args.streaming else dataset.select(range(min(limit, len(dataset))))
                )
            self.splits[role] = dataset
        label_feature = self.splits["bank"].features[self.label_column]
        self.num_classes = getattr(label_feature, "num_classes", None)

    def _features(self, model: MocoModel, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        accelerator = self.accelerator
        dataset = shard_for_process(
            as_iterable(self.splits[role], accelerator.num_processes),
            accelerator.process_index,
            accelerator.num_processes,
        )
        pairs = labelled_images(dataset, self.image_column, self.label_column, limit=None)

        def encode(images: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return model.get_image_features(images).pooler_output

        features, labels = extract_features(encode, pairs, self.transform, device=accelerator.device)
        gathered = gather_object([(features, labels)])
        return torch.cat([f for f, _ in gathered if f.numel()]), torch.cat([lab for _, lab in gathered])

    @torch.no_grad()
    def __call__(self, model: MocoModel) -> float:
        was_training = model.training
        model.eval()
        bank, bank_labels = self._features(model, "bank")
        queries, query_labels = self._features(model, "queries")
        model.train(was_training)
        num_classes = self.num_classes or int(bank_labels.max()) + 1
        return knn_accuracy(
            bank, bank_labels, queries, query_labels, num_classes, self.args.knn_k, self.args.knn_temperature
        )


# ---- training ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        model_args, data_args, train_args = parser.parse_yaml_file(argv[0])
    elif len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, train_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(argv)
    try:
        return train(model_args, data_args, train_args)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (FloatingPointError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


class RunError(RuntimeError):
    """The run cannot go on (disk full, unreadable checkpoint); the message says what to do."""


class StopRequested(BaseException):
    """SIGTERM/SIGINT arrived: save a checkpoint and exit (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way swallows it)."""


def train(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> int:
    output_dir = Path(train_args.output_dir)
    accelerator = Accelerator(
        # With no accelerator, `accelerate launch --multi_gpu` processes form a gloo group only if told they are on
        # the CPU; otherwise each would train alone.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=train_args.mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=train_args.report_to if train_args.with_tracking else None,
        project_dir=str(output_dir),
        # The queue and key encoder are identical on every rank by construction; broadcasting them each step
        # (DDP's default) would copy K x dim floats per step for nothing.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    set_seed(train_args.seed)
    config = build_config(model_args, data_args, train_args)
    if train_args.hub_strategy not in HUB_STRATEGIES:
        raise DataError(f"--hub_strategy must be one of {HUB_STRATEGIES}, got {train_args.hub_strategy!r}.")
    repo_id = train_args.hub_model_id or output_dir.resolve().name  # also the model card's title
    publisher = None
    if train_args.push_to_hub and accelerator.is_main_process:
        publisher = HubPublisher(repo_id, train_args.hub_token, train_args.hub_private_repo)

    # -- data
    dataset_name = data_args.dataset_name or default_dataset_name()
    card_dataset = data_args.dataset_name or "uoft-cs/cifar10"  # the default data is a copy of this Hub dataset
    limit = data_args.knn_max_eval_samples
    knn_split = data_args.eval_split + (f"[:{limit}]" if limit else "")  # `datasets` slicing: the first N images
    train_set = load_image_dataset(
        dataset_name, data_args.train_split, data_args.streaming, data_args.dataset_config_name
    )
    image_column = find_image_column(train_set, data_args.image_column)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_batch = train_args.per_device_train_batch_size
    global_batch = micro_batch * world * train_args.gradient_accumulation_steps
    rows = dataset_rows(train_set)
    if rows is not None and rows < micro_batch * world:
        raise DataError(
            f"the global batch ({micro_batch} per process x {world} processes) is larger than the dataset "
            f"({rows} images); lower --per_device_train_batch_size."
        )
    if train_args.max_train_steps is not None:
        total_steps = train_args.max_train_steps
    elif rows is not None:
        total_steps = max(1, int(train_args.num_train_epochs * rows // global_batch))
    else:
        raise DataError("the stream's length is unknown: pass --max_train_steps.")
    steps_per_epoch = max(1, (rows or global_batch * total_steps) // global_batch)

    requested_workers = data_args.dataloader_num_workers
    stream = as_iterable(train_set, num_shards=max(1, world * max(1, requested_workers)))
    stream = shard_for_process(stream, rank, world)
    if data_args.streaming or not hasattr(train_set, "__len__"):
        stream = stream.shuffle(seed=train_args.seed, buffer_size=data_args.shuffle_buffer_size)
    else:
        stream = stream.shuffle(seed=train_args.seed, buffer_size=min(data_args.shuffle_buffer_size, rows))
    num_workers = usable_workers(stream, requested_workers)
    two_crops = build_two_crops(config.augmentation, data_args.image_size, data_args.image_mean, data_args.image_std)

    # -- model, optimizer, schedule
    model = MocoModel(config)
    if model_args.sync_bn and world > 1:
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
    if train_args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    learning_rate = train_args.learning_rate or config.base_learning_rate * global_batch / 256
    optimizer = build_optimizer(model, config, learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_multiplier(config.lr_schedule, total_steps))
    if train_args.torch_compile:
        model.encoder_q.backbone.compile()
        model.encoder_k.backbone.compile()
    if accelerator.is_main_process:
        check_output_dir(output_dir, model)
        remove_incomplete_checkpoints(output_dir)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    moco: MocoModel = accelerator.unwrap_model(model)

    # -- resume
    completed_steps, skipped_images, history, trained_seconds = 0, 0, [], 0.0
    if train_args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(train_args.resume_from_checkpoint, output_dir)
        if checkpoint is None:
            logger.info("No checkpoint in %s yet: starting from scratch.", output_dir / "checkpoints")
        else:
            refuse_unsafe_pickles(checkpoint)
            accelerator.load_state(str(checkpoint))
            state = json.loads((checkpoint / "trainer_state.json").read_text())
            completed_steps, skipped_images = state["completed_steps"], state["skipped_images"]
            trained_seconds = state.get("training_seconds", 0.0)
            history = state.get("knn_history", [])
            logger.info("Resumed from %s at step %d.", checkpoint, completed_steps)

    batches = TwoCropBatches(
        stream, image_column, two_crops, micro_batch, train_args.seed, rank,
        skip_batches=completed_steps * train_args.gradient_accumulation_steps,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=lambda _: seed_worker_env(),
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(train_args.seed),  # keeps the global RNG untouched
    )

    run_config = {**asdict(model_args), **asdict(data_args), **asdict(train_args)}
    run_config |= {"dataset_name": dataset_name, "learning_rate": learning_rate, "total_steps": total_steps}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
    if train_args.with_tracking:
        accelerator.init_trackers("moco", config={k: str(v) for k, v in run_config.items()})

    knn = KnnMonitor(data_args, accelerator, data_args.eval_dataset_name or dataset_name)
    if train_args.knn_at_start and completed_steps == 0:
        accuracy = knn(moco)
        history.append({"step": 0, "knn_top1": accuracy})
        logger.info("kNN top-1 of the initial (random) encoder: %.2f%%", accuracy)

    logger.info(
        "Training %s (%s) for %d steps: %d processes x %d images x %d accumulation = %d per step, lr %.4g, "
        "%d loader workers per process, shuffle_bn=%s.",
        config.backbone, model_args.preset, total_steps, world, micro_batch, train_args.gradient_accumulation_steps,
        global_batch, learning_rate, num_workers, moco.resolve_shuffle_bn(),
    )  # fmt: skip

    def request_stop(signum: int, _frame: Any) -> None:
        raise StopRequested(signal.Signals(signum).name)

    previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics_path = output_dir / "metrics.jsonl"
    eval_every_steps = int(train_args.eval_every * steps_per_epoch) if train_args.eval_every else None
    progress = tqdm(
        total=total_steps, initial=completed_steps, disable=not accelerator.is_local_main_process, desc="MoCo"
    )

    session_start = time.perf_counter()

    def training_seconds() -> float:
        return trained_seconds + time.perf_counter() - session_start

    def trainer_state() -> dict:
        return {
            "completed_steps": completed_steps,
            "skipped_images": skipped_images,
            "knn_history": history,
            "training_seconds": training_seconds(),
        }

    def save_model(folder: Path) -> None:
        """`save_pretrained` plus a model card with the run's settings and results so far."""
        try:
            moco.save_pretrained(folder)
        except Exception as error:  # OSError, SafetensorError: the disk is full or not writable
            reason = first_line(error) or type(error).__name__
            raise RunError(
                f"could not write the model to {folder}: {reason}. The checkpoints are intact; "
                "free some space and resume with --resume_from_checkpoint latest to save it."
            ) from error
        results = [
            EvaluationResult(f"kNN top-1 (k={data_args.knn_k}, T={data_args.knn_temperature})",
                             card_dataset, knn_split, history[-1]["knn_top1"])
        ] if history and history[-1]["step"] > 0 else []  # fmt: skip
        summary = TrainingSummary(
            dataset=card_dataset,
            hyperparameters={
                "steps": completed_steps,
                "epochs": round(completed_steps / steps_per_epoch, 2),
                "global batch size": global_batch,
                "optimizer": f"{config.optimizer.upper()} (momentum {config.sgd_momentum}, weight decay "
                f"{config.weight_decay})"
                if config.optimizer != "adamw"
                else f"AdamW (weight decay {config.weight_decay})",
                "learning rate": f"{learning_rate:.4g} ({config.lr_schedule} schedule)",
                "crop size": data_args.image_size,
                "mixed precision": accelerator.mixed_precision,
            },
            results=results,
            training_time=f"{training_seconds() / 60:.1f} min",
            hardware=describe_hardware(world, accelerator.device),
            skipped_images=skipped_images,
        )
        card_repo_id = publisher.repo_id if publisher else repo_id  # the Hub may add the user's namespace
        render_model_card(config, card_repo_id, "model", summary).save(folder / "README.md")

    def checkpoint() -> None:
        path = save_checkpoint(
            accelerator, moco, output_dir, completed_steps, trainer_state(), train_args.checkpoints_total_limit
        )
        logger.info("Saved checkpoint %s", path)
        if publisher is not None and train_args.hub_strategy == "every_save":
            snapshot = output_dir / f".hub-upload-{path.name}"  # uploads read it while training goes on
            save_model(snapshot)
            publisher.upload(snapshot, f"Training in progress, step {completed_steps}", remove_after=True)

    model.train()
    window_start, window_images, window = time.perf_counter(), 0, {"loss": 0.0, "top1": 0.0, "n": 0}
    data = iter(loader)
    for _ in range(batches.batches_to_drop(num_workers)):
        next(data)
    try:
        while completed_steps < total_steps:
            for _ in range(train_args.gradient_accumulation_steps):
                batch = next(data)
                skipped_images += batch["skipped"]
                query = batch["query"].to(accelerator.device, non_blocking=True)
                key = batch["key"].to(accelerator.device, non_blocking=True)
                if train_args.channels_last:
                    query, key = (t.contiguous(memory_format=torch.channels_last) for t in (query, key))
                moco.key_momentum = momentum_at(completed_steps, total_steps, config.momentum, config.momentum_schedule)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        output = model(pixel_values=query, key_pixel_values=key)
                    accelerator.backward(output.loss)
                    if accelerator.sync_gradients and train_args.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(moco.encoder_q.parameters(), train_args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss = output.loss.item()
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {loss} at step {completed_steps + 1}; training stopped. The last "
                        "checkpoint is intact; lower --learning_rate or set --max_grad_norm and resume from it."
                    )
                window["loss"] += loss
                window["top1"] += (output.logits.argmax(dim=1) == output.labels).float().mean().item()
                window["n"] += 1
                window_images += query.shape[0] * world
            completed_steps += 1
            progress.update(1)

            if completed_steps % train_args.logging_steps == 0 or completed_steps == total_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "step": completed_steps,
                    "epoch": completed_steps / steps_per_epoch,
                    "loss": window["loss"] / window["n"],
                    "contrastive_top1": 100.0 * window["top1"] / window["n"],
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_second": window_images / elapsed,
                    "queue_fill": min(1.0, completed_steps * global_batch / max(1, config.queue_size)),
                    "skipped_images": skipped_images,
                }
                progress.set_postfix(
                    loss=f"{metrics['loss']:.3f}",
                    lr=f"{metrics['lr']:.3g}",
                    img_s=f"{metrics['images_per_second']:.0f}",
                )
                accelerator.log(metrics, step=completed_steps)
                if accelerator.is_main_process:
                    with metrics_path.open("a") as stream_out:
                        stream_out.write(json.dumps(metrics) + "\n")
                window_start, window_images, window = time.perf_counter(), 0, {"loss": 0.0, "top1": 0.0, "n": 0}

            if eval_every_steps and completed_steps % eval_every_steps == 0 and completed_steps < total_steps:
                accuracy = knn(moco)
                history.append({"step": completed_steps, "knn_top1": accuracy})
                accelerator.log({"knn_top1": accuracy}, step=completed_steps)
                logger.info("step %d: kNN top-1 %.2f%%", completed_steps, accuracy)
            if train_args.checkpointing_steps and completed_steps % train_args.checkpointing_steps == 0:
                checkpoint()
    except StopRequested as stop:
        logger.warning("%s received: saving a checkpoint at step %d before exiting.", stop, completed_steps)
        checkpoint()
        return 128 + int(getattr(signal.Signals, str(stop)))
    finally:
        progress.close()  # so that an error message starts on its own line
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    accuracy = knn(moco)
    history.append({"step": completed_steps, "knn_top1": accuracy})
    accelerator.log({"knn_top1": accuracy}, step=completed_steps)
    if not (train_args.checkpointing_steps and completed_steps % train_args.checkpointing_steps == 0):
        checkpoint()
    if accelerator.is_main_process:
        save_model(output_dir / "model")
        if publisher is not None:
            publisher.upload(output_dir / "model", f"End of training, step {completed_steps}")
        results = {
            "knn_top1_initial": history[0]["knn_top1"] if history and history[0]["step"] == 0 else None,
            "knn_top1_final": accuracy,
            "skipped_images": skipped_images,
            "steps": completed_steps,
            "global_batch_size": global_batch,
        }
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        plot_training_curves(metrics_path, history, output_dir / "training_curves.png")
        if skipped_images:
            logger.warning("%d images could not be decoded and were skipped.", skipped_images)
        initial = results["knn_top1_initial"]
        if publisher is not None and publisher.finish():
            print(f"Pushed to the Hub: {publisher.repo_id}")
        print(
            f"kNN top-1 (k={data_args.knn_k}) on {data_args.eval_split}: "
            + (f"random init {initial:.2f}% -> " if initial is not None else "")
            + f"MoCo {accuracy:.2f}% after {completed_steps} steps. Model: {output_dir / 'model'}"
        )
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
