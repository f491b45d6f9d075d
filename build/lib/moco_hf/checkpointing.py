"""Training checkpoints that survive being killed at any moment, and exact resume from them.

A checkpoint is Accelerate's state (model with queue and key encoder, optimizer, scheduler, RNG states) plus
`trainer_state.json` (`TrainerState`), written into a hidden staging folder and renamed when complete, so that a
killed save never looks like a checkpoint. Accelerate's own `ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)` writes straight into the final folder, which loses that guarantee; the rotation is therefore done
here, after the rename.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from .errors import DataError, RunError, UsageError, first_line

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop needs besides Accelerate's state to resume exactly where it stopped."""

    completed_steps: int = 0
    skipped_images: int = 0
    knn_history: list[dict] = field(default_factory=list)  # [{"step": int, "knn_top1": float}, ...]
    training_seconds: float = 0.0

    @classmethod
    def from_dict(cls, values: dict) -> TrainerState:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__ if name in values})


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress lives in a hidden `.tmp-` folder until renamed)."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers (queue included) holding NaN or Inf."""
    return [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]


def save_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, output_dir: Path, state: TrainerState, limit: int | None
) -> Path:
    """Save `checkpoints/step_<completed_steps>` (staged, then renamed) and keep the newest `limit` checkpoints.

    Refuses to save non-finite weights: the last good checkpoint stays the newest one.
    """
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.completed_steps}"
    staging = final.with_name(f".tmp-{final.name}")
    bad = non_finite_tensors(model)
    if bad:
        raise RunError(
            f"the weights became non-finite at step {state.completed_steps} ({bad[0]} and {len(bad) - 1} more); "
            "nothing was saved over the last good checkpoint. Lower --learning_rate or set --max_grad_norm and "
            "resume from it."
        )
    try:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> TrainerState:
    """Restore Accelerate's state from `checkpoint` (every pickle checked first) and return its `TrainerState`."""
    refuse_unsafe_pickles(checkpoint)
    accelerator.load_state(str(checkpoint))
    return TrainerState.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))


def check_output_dir(output_dir: Path, model: torch.nn.Module) -> None:
    """Fail before training when the output folder cannot be written or cannot hold one checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--output_dir {str(output_dir)!r} is not writable: {error.strerror or error}.") from error
    # A checkpoint holds every tensor of the model, plus SGD's momentum for the query encoder's parameters.
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = model_bytes + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UsageError(
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
    """`--resume_from_checkpoint`: "latest" (the newest complete checkpoint, None if there is none) or a path."""
    if value == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {value!r} is not a complete checkpoint (no {STATE_FILE}).")
    return path
