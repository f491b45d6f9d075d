"""Training checkpoints that survive being killed at any moment, and exact resume from them.

A checkpoint is Accelerate's state (model with queue and key encoder, optimizer, scheduler, RNG states) plus
`trainer_state.json` (`TrainerState`), written into a hidden staging folder and renamed when complete, so that a
killed save never looks like a checkpoint. Accelerate's own `ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)` writes straight into the final folder, which loses that guarantee; the rotation is therefore done
here, after the rename.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from .errors import RunError, first_line

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"  # sha256 and size of every other file; written last, before the rename
ABANDONED_DIR = "abandoned"  # checkpoints newer than the one a run rolled back to


@dataclass
class TrainerState:
    """What the loop needs besides Accelerate's state to resume exactly where it stopped."""

    completed_steps: int = 0
    skipped_images: int = 0
    knn_history: list[dict] = field(default_factory=list)  # [{"step": int, "knn_top1": float}, ...]
    training_seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # what the run was started with; a resume must agree

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
    """Save `checkpoints/step_<completed_steps>` (staged, synced to disk, then renamed) and keep the newest `limit`.

    Refuses to save non-finite weights: the last good checkpoint stays the newest one. With a `limit`, the
    checkpoints beyond the newest `max(limit - 1, 1)` go before the new one is written, so that the disk never holds
    more than `max(limit, 2)` of them (the newest stays until its successor is complete).
    """
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.completed_steps}"
    staging = final.with_name(f".tmp-{final.name}")
    bad = non_finite_tensors(model)
    if bad:
        raise RunError(
            f"the weights became non-finite at step {state.completed_steps} ({bad[0]} and {len(bad) - 1} more); "
            f"nothing was saved. {numerical_fault_advice(output_dir)}"
        )
    try:
        if accelerator.is_main_process:
            for old in checkpoints_to_rotate(output_dir, limit):
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            write_manifest(staging)
            sync_to_disk(staging)  # a power loss after the rename finds the files complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_path(final.parent)  # the rename itself (not the other checkpoints' files again)
            if limit is not None:
                for old in checkpoint_dirs(output_dir)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
    except Exception as error:  # disk full, quota, permissions (OSError, SafetensorError...), a peer that died
        shutil.rmtree(staging, ignore_errors=True)
        reason = first_line(error) or type(error).__name__
        advice = "free some space (or lower `checkpoints_total_limit`) and resume" if is_disk_full(error) else \
            "resume"  # fmt: skip
        raise RunError(
            f"could not write checkpoint {final.name} in {final.parent}: {reason}. Earlier checkpoints are intact; "
            f"{advice} with `resume_from_checkpoint` latest."
        ) from error
    accelerator.wait_for_everyone()
    return final


def numerical_fault_advice(output_dir: Path) -> str:
    """What to do after a non-finite loss or weights: resume from the last checkpoint, or start again."""
    found = checkpoint_dirs(output_dir)
    if not found:
        return "No checkpoint was saved before it; lower `learning_rate` or set `max_grad_norm` and start again."
    return (f"The last checkpoint, {found[-1].name}, is intact; lower `learning_rate` or set `max_grad_norm` and "
            "resume from it.")  # fmt: skip


def checkpoints_to_rotate(output_dir: Path, limit: int | None) -> list[Path]:
    """The checkpoints the next save deletes before writing (see `save_checkpoint`)."""
    return [] if limit is None else checkpoint_dirs(output_dir)[: -max(limit - 1, 1)]


def is_disk_full(error: BaseException) -> bool:
    """A write that failed for lack of space or quota (OSError's errno, or the text of a library's own error)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(words in str(error) for words in ("No space left", "Disk quota exceeded"))


def sync_to_disk(folder: Path) -> None:
    """fsync every file of `folder` and the folder itself (its entries), so that a rename after it is durable."""
    for path in [*folder.rglob("*"), folder]:
        if path.is_file() or path.is_dir():
            fsync_path(path)


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """`manifest.json`: the sha256 and size of every file of a checkpoint folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {str(p.relative_to(folder)): {"sha256": file_digest(p), "bytes": p.stat().st_size} for p in files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def checkpoint_damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a missing, truncated or altered file), None when it is intact."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as error:
        return f"{MANIFEST_FILE} is missing or unreadable ({first_line(error) or type(error).__name__})"
    if not isinstance(manifest, dict) or not all(map(is_manifest_entry, manifest.values())):
        return f"{MANIFEST_FILE} is malformed (not a size and sha256 for each file)"
    unlisted = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    unlisted = [name for name in unlisted if name not in manifest]
    if unlisted or not manifest:
        return f"{unlisted[0] if unlisted else 'every file'} is not listed in {MANIFEST_FILE}"
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"] or file_digest(path) != expected["sha256"]:
            return f"{name} is damaged (its size or sha256 differs from {MANIFEST_FILE})"
    return None


def is_manifest_entry(entry: object) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)


def read_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))


def remove_incomplete_checkpoints(output_dir: Path) -> None:
    """Staging folders left by a run killed while saving: never complete, never resumed from."""
    for staging in (output_dir / "checkpoints").glob(".tmp-*"):
        logger.warning("Removing %s, an incomplete checkpoint of an interrupted run.", staging)
        shutil.rmtree(staging, ignore_errors=True)
