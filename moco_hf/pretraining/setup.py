"""Everything a run needs before its first step: accelerator, config, data, model, optimizer, schedules, kNN
monitor, checkpoint to resume and Hub repo."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from ..checkpointing import TrainerState, remove_incomplete_checkpoints
from ..configuration_moco import MocoConfig
from ..errors import DataError, UsageError, first_line
from ..hub_upload import HubPublisher, remove_snapshots
from ..knn import KnnMonitor, KnnSplits
from ..modeling_moco import MocoModel
from ..optimization import build_optimizer
from ..run_policy import (
    MATCHING_CONFIG_FIELDS,
    MATCHING_DATA_SETTINGS,
    OutputDirLock,
    check_output_dir,
    clear_or_refuse_previous_run,
    load_checkpoint,
    resolve_checkpoint,
    set_aside_newer_checkpoints,
)
from ..schedules import continue_schedule_with_peak, learning_rate_scheduler
from ..warm_start import load_pretrained_weights
from .arguments import MocoTrainingArguments, build_config, recorded_settings, trackers, warmup_steps
from .data_plan import DataPlan, build_augmentation, plan_data
from .run import Run

logger = logging.getLogger("moco_hf.pretrain")


def build_accelerator(args: MocoTrainingArguments) -> Accelerator:
    # Accelerate keeps one precision and accumulation setting per process: a new run in the same Python process
    # (a notebook, a test) may choose others. The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        # With no accelerator, `accelerate launch --multi_gpu` processes form a gloo group only if told they are on
        # the CPU; otherwise each would train alone.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers(args),
        project_dir=args.output_dir,
        # The queue and key encoder are identical on every rank by construction; broadcasting them each step
        # (DDP's default) would copy K x dim floats per step for nothing.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


def processes_asked_of_the_launcher() -> int | None:
    """`--num_processes` of the `accelerate launch` that started this process, read from the launcher's command line
    (Linux); None when there is none to read. Its one-process launcher keeps the number to itself."""
    try:
        words = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(word == "launch" or word.endswith((".launch", "accelerate-launch")) for word in words):
        return None  # `accelerate launch`, `python -m accelerate.commands.launch` or `accelerate-launch`
    for index, word in enumerate(words):
        value = word.split("=", 1)[1] if word.startswith("--num_processes=") else None
        if word == "--num_processes" and index + 1 < len(words):
            value = words[index + 1]
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def warn_if_fewer_processes_than_asked(accelerator: Accelerator) -> None:
    if not accelerator.is_main_process:
        return
    asked = processes_asked_of_the_launcher()
    if asked is not None and asked > accelerator.num_processes:
        logger.warning(
            "accelerate launch was asked for %d processes, but %d runs: without GPUs, `accelerate launch` starts "
            "several CPU processes only with --multi_gpu (e.g. accelerate launch --multi_gpu --num_processes %d "
            "--num_machines 1 ...).", asked, accelerator.num_processes, asked,
        )  # fmt: skip


def build_model(config: MocoConfig, args: MocoTrainingArguments, world: int,
                device: torch.device) -> MocoModel:  # fmt: skip
    if args.sync_bn and world > 1 and device.type != "cuda":
        raise UsageError(
            "`sync_bn` needs CUDA GPUs (PyTorch's DDP runs SyncBatchNorm on GPU modules only); processes on the "
            "CPU keep the paper's remedy, the key batch shuffle across processes (`shuffle_bn` ddp, the default)."
        )
    try:
        model = MocoModel(config)
    except ValueError as error:  # a setting that does not fit the backbone, e.g. --cifar_stem on a ViT
        raise UsageError(first_line(error)) from error
    if args.model_name_or_path:
        source = load_pretrained_weights(model, args.model_name_or_path, args.trust_remote_code)
        logger.info("Initialised from %s.", source)
    if args.sync_bn and world > 1:
        model.encoder_q = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder_q)
    elif args.sync_bn:
        logger.warning("--sync_bn with one process: there is nothing to synchronise.")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torch_compile:
        model.encoder_q.backbone.compile(backend=args.torch_compile_backend)
        model.encoder_k.backbone.compile(backend=args.torch_compile_backend)
    return model


def uses_sync_batch_norm(model: MocoModel) -> bool:
    return any(isinstance(module, torch.nn.SyncBatchNorm) for module in model.encoder_q.modules())


def resume(args: MocoTrainingArguments, output_dir: Path, accelerator: Accelerator, settings: dict) -> TrainerState:
    """The state to start from: a checkpoint's when resuming (and an intact one exists), else a fresh one."""
    if not args.resume_from_checkpoint:
        return TrainerState(settings=settings)
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, output_dir)
    if checkpoint is None:
        logger.info("No checkpoint in %s yet: starting from scratch.", output_dir / "checkpoints")
        return TrainerState(settings=settings)
    state = load_checkpoint(accelerator, checkpoint, settings)
    if accelerator.is_main_process and checkpoint.parent.resolve() == (output_dir / "checkpoints").resolve():
        for moved in set_aside_newer_checkpoints(checkpoint, output_dir):
            logger.warning("Rolled back to %s: the newer checkpoint is kept as %s.", checkpoint.name, moved)
    if accelerator.is_main_process:
        drop_metrics_after(output_dir / "metrics.jsonl", state.completed_steps)
    logger.info("Resumed from %s at step %d.", checkpoint, state.completed_steps)
    return state


def drop_metrics_after(metrics_path: Path, step: int) -> None:
    """Forget the `metrics.jsonl` rows of steps after `step` (the resumed run logs those steps again), and a last
    row torn by a kill in mid-write."""
    if not metrics_path.is_file():
        return
    rows = metrics_path.read_text().splitlines(keepends=True)
    kept = [row for row in rows if row.endswith("\n") and json.loads(row).get("step", 0) <= step]
    if len(kept) < len(rows):
        metrics_path.write_text("".join(kept))


def run_settings(config: MocoConfig, plan: DataPlan, args: MocoTrainingArguments,
                 learning_rate: float, num_processes: int) -> dict[str, Any]:  # fmt: skip
    """What a checkpoint records of the run, for `check_resume_settings`."""
    return {
        "data_order": "global" if plan.order is not None else "stream",
        "global_batch_size": plan.global_batch,
        "per_device_train_batch_size": plan.micro_batch,
        "num_processes": num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
        "learning_rate": learning_rate,
        "dataloader_num_workers": args.dataloader_num_workers,
        "total_steps": plan.total_steps,
        "dataset": args.dataset_name or "the default CIFAR-10",  # as given, for the messages
        "dataset_fingerprint": plan.fingerprint,  # what is compared: a path may move with the machine
        **{name: getattr(args, name) for name in MATCHING_DATA_SETTINGS if name != "dataset_fingerprint"},
        **{name: getattr(config, name) for name in MATCHING_CONFIG_FIELDS},
    }


def build_knn_monitor(
    config: MocoConfig, args: MocoTrainingArguments, dataset_name: str, accelerator: Accelerator
) -> KnnMonitor:
    splits = KnnSplits(
        dataset_name=args.eval_dataset_name or dataset_name,
        bank_split=args.eval_train_split,
        query_split=args.eval_split,
        max_bank_samples=args.knn_max_train_samples,
        max_query_samples=args.knn_max_eval_samples,
        image_column=args.image_column,
        label_column=args.label_column,
        config_name=args.dataset_config_name if args.eval_dataset_name is None else None,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
    )
    try:
        return KnnMonitor(splits, accelerator, config.image_size, config.image_mean, config.image_std, args.knn_k,
                          args.knn_temperature, args.per_device_eval_batch_size, args.knn_feature,
                          config.num_channels, args.band_layout)  # fmt: skip
    except DataError as error:
        if args.eval_dataset_name or args.label_column:  # a monitor asked for by name must work
            raise
        # The default monitor on data it cannot measure (unlabelled images, the usual self-supervised case, or too
        # few per class): train without it rather than stop or publish a number that measures nothing.
        logger.warning("Training without the kNN monitor: %s (`knn_monitor` false silences this.)", error)
        return None


def setup(args: MocoTrainingArguments, command: str) -> tuple[Run, TrainerState]:
    """Accelerator, config, data, model, optimizer, schedule, the lock on the output folder, then the rest (see
    `start_run`); the run and the state to start from. `command` is what results.json records."""
    output_dir = Path(args.output_dir)
    accelerator = build_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger("moco_hf").setLevel(logging.WARNING)
    warn_if_fewer_processes_than_asked(accelerator)
    set_seed(args.seed)
    config = build_config(args)
    plan = plan_data(args, accelerator, config.num_channels)
    if plan.statistics is not None:  # band images with no mean and std given: their training data's
        mean, std = plan.statistics
        config.image_mean, config.image_std = args.image_mean or mean, args.image_std or std
    model = build_model(config, args, accelerator.num_processes, accelerator.device)
    if 0 < config.queue_size < plan.global_batch:
        logger.warning("The queue (K=%d) is smaller than the global batch (%d): each step keeps only the newest %d "
                       "keys as negatives.", config.queue_size, plan.global_batch, config.queue_size)  # fmt: skip
    learning_rate = args.learning_rate or config.base_learning_rate * plan.global_batch / 256
    optimizer = build_optimizer(model, config, learning_rate)
    scheduler = learning_rate_scheduler(optimizer, config.lr_schedule, plan.total_steps,
                                        warmup_steps(args, plan.total_steps), plan.steps_per_epoch)  # fmt: skip
    lock = None
    if accelerator.is_main_process:
        check_output_dir(output_dir, model, args.checkpoints_total_limit)
        lock = OutputDirLock(output_dir)  # released when `train` returns, or by the kernel when the process dies
    try:
        if lock is not None and not args.resume_from_checkpoint:  # under the lock: no live run is cleared
            clear_or_refuse_previous_run(output_dir, args.overwrite_output_dir)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        two_crops = build_augmentation(config, args, plan.reader.bands)
        run = Run(args, config, accelerator, model, optimizer, scheduler, plan, two_crops, None, learning_rate,
                  output_dir, command, lock)  # fmt: skip
        return start_run(run)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def start_run(run: Run) -> tuple[Run, TrainerState]:
    """The checkpoint to resume from, the kNN monitor, the Hub repo and `run_config.json`."""
    args, accelerator = run.args, run.accelerator
    if accelerator.is_main_process:
        remove_incomplete_checkpoints(run.output_dir)
        remove_snapshots(run.output_dir)
    settings = run_settings(run.config, run.plan, args, run.learning_rate, accelerator.num_processes)
    state = resume(args, run.output_dir, accelerator, settings)
    if state.completed_steps:  # a resume: the schedule goes on with this run's peak (the same, or a changed one)
        continue_schedule_with_peak(run.optimizer, run.scheduler, run.learning_rate)
    run.seconds_before = state.training_seconds
    if args.knn_monitor:
        run.knn = build_knn_monitor(run.config, args, run.plan.dataset_name, accelerator)
    run.repo_id = args.hub_model_id or run.output_dir.resolve().name  # also the model card's title
    if args.push_to_hub and accelerator.is_main_process:
        run.publisher = HubPublisher(run.repo_id, args.hub_token, args.hub_private_repo, args.hub_revision,
                                     args.create_pr)  # fmt: skip
    write_run_config(run)
    return run, state


def write_run_config(run: Run) -> None:
    run_config = recorded_settings(run.args)
    # Each model setting as built: the flag's value, else the preset's, else the command's default.
    run_config |= {argument.name: getattr(run.config, argument.name) for argument in fields(run.args)
                   if argument.metadata.get("config_field")}  # fmt: skip
    run_config |= {
        "backbone_kwargs": run.config.backbone_kwargs,
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
