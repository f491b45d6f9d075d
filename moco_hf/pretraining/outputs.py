"""What a run records and writes: kNN measurements, checkpoints, the model folder with its card, results and
curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..checkpointing import (
    TrainerState,
    save_checkpoint,
)
from ..data import (
    HUB_CIFAR10,
)
from ..errors import RunError, first_line
from ..hub_upload import SNAPSHOT_PREFIX
from ..model_card import EvaluationResult, TrainingSummary, describe_hardware, render_model_card
from ..plotting import plot_knn_curve, plot_training_curves
from .run import Run

logger = logging.getLogger("moco_hf.pretrain")


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
            "are intact; free some space and resume with `resume_from_checkpoint` latest to save it."
        ) from error
    summary = training_summary(run, state)
    summary.save(folder)  # `moco-hf export` carries it over to the encoder's card
    card_repo_id = run.publisher.repo_id if run.publisher else run.repo_id  # the Hub may add the user's namespace
    render_model_card(run.config, card_repo_id, "model", summary).save(folder / "README.md")


def training_summary(run: Run, state: TrainerState) -> TrainingSummary:
    config, knn = run.config, run.knn
    card_dataset = run.args.dataset_name or HUB_CIFAR10  # the default data is a copy of this Hub dataset
    last = state.knn_history[-1] if state.knn_history else None
    results = [
        EvaluationResult(f"kNN top-1 (k={knn.k}, T={knn.temperature})",
                         run.args.eval_dataset_name or card_dataset, knn.query_description, last["knn_top1"])
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
            f"kNN top-1 (k={run.knn.k}) on {run.knn.query_description}: "
            + (f"random init {initial:.2f}% -> " if initial is not None else "")
            + f"MoCo {accuracy:.2f}% {model}"
        )
    if run.publisher is not None:
        print(run.publisher.status_line(bool(pushed), model_folder))
    return results
