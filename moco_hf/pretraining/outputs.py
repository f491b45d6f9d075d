"""What a run records and writes: kNN measurements, checkpoints, the model folder with its card, results and
curves."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..batch_norm_calibration import average_batch_norm_statistics, calibrate_batch_norm, describe_random_baseline
from ..checkpointing import (
    TrainerState,
    save_checkpoint,
)
from ..data import close_loader, default_dataset_name
from ..errors import RunError, first_line
from ..hub_upload import SNAPSHOT_PREFIX
from ..model_card import EvaluationResult, TrainingSummary, describe_hardware, render_model_card, shareable_name
from ..plotting import plot_knn_curve, plot_training_curves
from .data_plan import build_loader, next_batch
from .run import Run

logger = logging.getLogger("moco_hf.pretrain")


def record_knn(run: Run, state: TrainerState, model: torch.nn.Module | None = None,
               encoder: str | None = None) -> float | None:  # fmt: skip
    """kNN top-1 of `model` (default: the model in training) now (None with the monitor off), added to the history
    and the trackers; `encoder` names a measured encoder that is not the trained one (the starting point)."""
    if run.knn is None:
        return None
    accuracies = {f"knn_top1_{feature}": value for feature, value in run.knn(model or run.moco).items()}
    accuracy = accuracies[f"knn_top1_{run.knn.feature}"]
    state.knn_history.append(
        {
            "step": state.completed_steps,
            "knn_top1": accuracy,
            **accuracies,
            "train_seconds": run.training_seconds(),
            **({"encoder": encoder} if encoder else {}),
        }
    )
    run.accelerator.log({"knn_top1": accuracy, **accuracies}, step=state.completed_steps)
    return accuracy


def record_initial_knn(run: Run, state: TrainerState) -> float | None:
    """kNN top-1 of the starting point: a warm start as loaded; a random encoder with its BatchNorm statistics
    calibrated on the first training images (a copy is: training starts from the model as built, and a random
    encoder's uncalibrated statistics would credit pretraining with the calibration)."""
    if run.args.model_name_or_path:
        return record_knn(run, state, encoder=f"initial (loaded from {shareable_name(run.args.model_name_or_path)})")
    baseline = copy.deepcopy(run.moco)
    data = build_loader(run.plan, run.two_crops, run.args, run.accelerator, start_step=0)
    try:

        def query_views() -> Iterator[torch.Tensor]:
            while True:
                yield run.two_crops.on_device(next_batch(data), run.accelerator.device)[0]

        world = run.accelerator.num_processes
        share = -(-run.args.batch_norm_calibration_images // world)  # each process calibrates on its own images
        images = calibrate_batch_norm(baseline.encoder_q, query_views(), share, run.accelerator.autocast)
    finally:
        close_loader(data)
    average_batch_norm_statistics(baseline.encoder_q, lambda statistics: run.accelerator.reduce(statistics, "mean"))
    images *= world
    return record_knn(run, state, baseline, describe_random_baseline(images))


def save_model(run: Run, state: TrainerState, folder: Path) -> None:
    """`save_pretrained` plus a model card with the run's settings and results so far."""
    try:
        run.moco.save_pretrained(folder)
    except Exception as error:  # OSError, SafetensorError: the disk is full or not writable
        raise RunError(
            f"could not write the model to {folder}: {first_line(error) or type(error).__name__}. The checkpoints "
            "are intact; free some space and resume with `resume_from_checkpoint` latest to save it."
        ) from error
    summary = training_summary(run, state)
    summary.save(folder)  # `moco-hf export` carries it over to the encoder's card
    card_repo_id = run.publisher.repo_id if run.publisher else run.repo_id  # the Hub may add the user's namespace
    # Its snippets load the model from where it is: the Hub repo when pushed, else the run's `model/` as the user
    # named it (relative to where the run started); an absolute path would publish this machine's directories.
    local = run.output_dir / "model"
    location = card_repo_id if run.publisher or local.is_absolute() else str(local)
    render_model_card(run.config, card_repo_id, "model", summary, location=location).save(folder / "README.md")


def training_summary(run: Run, state: TrainerState) -> TrainingSummary:
    config, knn = run.config, run.knn
    card_dataset = run.args.dataset_name or default_dataset_name()
    last = state.knn_history[-1] if state.knn_history else None
    initial = initial_knn(state)
    results = [
        EvaluationResult(f"kNN top-1 (k={knn.k_used}, T={knn.temperature})",
                         run.args.eval_dataset_name or card_dataset, knn.query_description, last["knn_top1"],
                         initial["knn_top1"] if initial else None, initial["encoder"] if initial else None)
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
        if run.publisher.busy:  # as transformers.Trainer does: one push at a time, so snapshots cannot pile up
            logger.info("The previous upload to the Hub is not done: step %d is not pushed.", state.completed_steps)
            return
        snapshot = run.output_dir / f"{SNAPSHOT_PREFIX}{path.name}"  # uploads read it while training goes on
        save_model(run, state, snapshot)
        run.publisher.upload(snapshot, f"Training in progress, step {state.completed_steps}", remove_after=True)


def write_results(run: Run, state: TrainerState, accuracy: float | None, pushed: bool | None) -> dict[str, Any]:
    """`results.json`, the kNN curve (JSON and PNG, against epochs) and the training curves. `pushed`: whether the
    model reached the Hub (None without `push_to_hub`)."""
    history, epochs = state.knn_history, state.completed_steps / run.plan.steps_per_epoch
    initial = initial_knn(state)
    results = {
        "knn_top1": accuracy,
        "knn_top1_initial": initial["knn_top1"] if initial else None,
        "knn_initial_encoder": initial["encoder"] if initial else None,
        "knn_gain": accuracy - initial["knn_top1"] if initial and accuracy is not None else None,
        "knn_k": run.knn.k_used if run.knn else None,
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
        "command": run.command,
        "hub_model_id": run.publisher.repo_id if run.publisher else None,
        "pushed_to_hub": pushed,
    }
    (run.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    if history:
        curve = [{**point, "epoch": point["step"] / run.plan.steps_per_epoch} for point in history]
        (run.output_dir / "knn_curve.json").write_text(json.dumps(curve, indent=2))
        plot_knn_curve(curve, run.output_dir / "knn_curve.png", f"{run.config.backbone}, {results['knn_split']}")
    plot_training_curves(run.metrics_path, history, run.output_dir / "training_curves.png")
    return results


def initial_knn(state: TrainerState) -> dict[str, Any] | None:
    """The history's point of the starting encoder (with the "encoder" that names it), if it was measured."""
    history = state.knn_history
    if not history or history[0]["step"] != 0:
        return None
    return {"encoder": "random init (BatchNorm not calibrated)", **history[0]}  # a checkpoint of an older version


def finish(run: Run, state: TrainerState) -> dict[str, Any]:
    """The final kNN, checkpoint, model with its card, results, curves and Hub push; returns the results (an empty
    dict on processes other than the main one)."""
    accuracy = record_knn(run, state)
    checkpoint(run, state)  # after the final kNN, so that a resume keeps its point of the curve
    if not run.accelerator.is_main_process:
        return {}
    model_folder = run.output_dir / "model"
    save_model(run, state, model_folder)
    pushed = None
    if run.publisher is not None:
        run.publisher.upload(model_folder, f"End of training, step {state.completed_steps}")
        pushed = run.publisher.finish(run.args.hub_wait_seconds)
    results = write_results(run, state, accuracy, pushed)
    if state.skipped_images:
        logger.warning("%d images could not be decoded and were skipped.", state.skipped_images)
    model = f"after {state.completed_steps} steps. Model: {model_folder}"
    if run.knn is None:
        print(f"Trained {model} (kNN monitor off)")
    else:
        initial = results["knn_top1_initial"]
        print(
            f"kNN top-1 (k={run.knn.k_used}) on {run.knn.query_description}: "
            + (f"{results['knn_initial_encoder']} {initial:.2f}% -> " if initial is not None else "")
            + f"MoCo {accuracy:.2f}%"
            + (f" ({results['knn_gain']:+.2f})" if initial is not None else "")
            + f" {model}"
        )
    if run.publisher is not None:
        print(run.publisher.status_line(bool(pushed), model_folder))
    return results
