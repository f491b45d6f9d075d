"""Training checkpoints that survive being killed at any moment, and exact resume from them.

A checkpoint is Accelerate's state (model with queue and key encoder, optimizer, scheduler, RNG states) plus
`trainer_state.json` (`TrainerState`), written into a hidden staging folder and renamed when complete, so that a
killed save never looks like a checkpoint. Accelerate's own `ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)` writes straight into the final folder, which loses that guarantee; the rotation is therefore done
here, after the rename.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from .configuration_moco import MAY_CHANGE_ON_RESUME, MocoConfig
from .errors import DataError, RunError, UsageError, first_line

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


def numerical_fault_advice(output_dir: Path) -> str:
    """What to do after a non-finite loss or weights: resume from the last checkpoint, or start again."""
    found = checkpoint_dirs(output_dir)
    if not found:
        return "No checkpoint was saved before it; lower `learning_rate` or set `max_grad_norm` and start again."
    return (f"The last checkpoint, {found[-1].name}, is intact; lower `learning_rate` or set `max_grad_norm` and "
            "resume from it.")  # fmt: skip


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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, settings: dict) -> TrainerState:
    """Restore Accelerate's state from `checkpoint` (every pickle checked first) and return its `TrainerState`, once
    `settings` (this run's) agree with the checkpoint's: see `check_resume_settings`."""
    state = read_trainer_state(checkpoint)
    check_resume_settings(state.settings, settings, checkpoint)
    refuse_unsafe_pickles(checkpoint)
    accelerator.load_state(str(checkpoint))
    state.settings = settings
    return state


# Settings a resumed run must share with its checkpoint: the optimizer and scheduler state hold the old learning
# rate, and the weights have the old shapes.
# Everything that shapes the model, the loss, the data or the optimisation must be the same on resume: a change would
# silently mix two runs (and config.json would describe the whole run with the new values). What may change, with a
# warning where it costs bit-exactness: the total length (extend or shorten a run), the process / batch layout at the
# same global batch, loader workers, logging, checkpointing, evaluation and Hub settings.
MATCHING_CONFIG_FIELDS = tuple(name for name in MocoConfig.field_names() if name not in MAY_CHANGE_ON_RESUME)
# The settings that select rows first: when one of them changed, it is the cause to name, not the fingerprint.
MATCHING_DATA_SETTINGS = ("dataset_config_name", "train_split", "max_train_samples", "dataset_fingerprint")
MUST_MATCH = ("seed", *MATCHING_DATA_SETTINGS, *MATCHING_CONFIG_FIELDS)
# The peak learning rate may change (lowered after a divergence, as `numerical_fault_advice` says): the schedule goes
# on from the checkpoint's step with the new peak (`continue_schedule_with_peak`), and the change is logged.
# How the global batch is laid out. A dataset read in `GlobalOrder` only needs the same global batch; a stream
# (and a checkpoint from before the global order) counts its position in each process's own micro-batches.
BATCH_LAYOUT = ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps")


def check_resume_settings(saved: dict, current: dict, checkpoint: Path) -> None:
    """Refuse (one line naming the setting) what the checkpoint cannot continue with; warn about what only costs
    bit-exactness (another process count or batch layout for the same global batch, another worker count)."""
    global_order = saved.get("data_order") == current.get("data_order") == "global"
    for name in (("global_batch_size",) if global_order else BATCH_LAYOUT) + MUST_MATCH:  # the cause before the lr
        if name == "dataset_fingerprint" and name in saved and saved[name] != current.get(name):
            raise UsageError(
                f"the dataset {current.get('dataset')!r} ({current.get(name)}) is not the one checkpoint "
                f"{checkpoint.name} was trained on, {saved.get('dataset')!r} ({saved[name]}): resume with that data, "
                "or start a new run in another `output_dir`."
            )
        if name in saved and saved[name] != current.get(name):
            raise UsageError(
                f"`{name}` is {current.get(name)!r} but checkpoint {checkpoint.name} was trained with {saved[name]!r}: "
                f"{resume_advice(name, saved)}"
            )
    old_rate, new_rate = saved.get("learning_rate"), current.get("learning_rate")
    if old_rate is not None and old_rate != new_rate:
        logger.warning("Resuming %s with `learning_rate` %s (it was trained with %s): the schedule goes on from its "
                       "step with the new peak.", checkpoint.name, new_rate, old_rate)  # fmt: skip
    layout = {name: (saved.get(name), current.get(name)) for name in BATCH_LAYOUT}
    if global_order and any(old != new for old, new in layout.values()):
        logger.warning(
            "Resuming %s on %s (checkpoint: %s): the same images from the same position, but bit-exactness "
            "holds only for the checkpoint's layout (BatchNorm sees other groups of images).", checkpoint.name,
            describe_layout(current), describe_layout(saved),
        )  # fmt: skip
    workers = "dataloader_num_workers"
    if not global_order and workers in saved and saved[workers] != current.get(workers):
        logger.warning(
            "--%s is %s but the checkpoint was written with %s: training continues from the same data position, "
            "but the augmentation draws differ, so the run is no longer bit-identical to an uninterrupted one.",
            workers, current.get(workers), saved[workers],
        )  # fmt: skip


def describe_layout(settings: dict) -> str:
    return (f"{settings.get('num_processes')} processes x {settings.get('per_device_train_batch_size')} images x "
            f"{settings.get('gradient_accumulation_steps')} accumulation")  # fmt: skip


def resume_advice(name: str, saved: dict) -> str:
    if name == "global_batch_size":
        return ("keep processes x `per_device_train_batch_size` x `gradient_accumulation_steps` equal to "
                f"{saved[name]} (e.g. on half the processes, double one of the other two).")  # fmt: skip
    if name in BATCH_LAYOUT:
        return ("a streamed dataset counts its position per process: resume with the same value (a dataset read "
                "without `streaming` can change the process count at the same global batch).")  # fmt: skip
    return "resume with the same value, or start a new run in another `output_dir`."


def read_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState.from_dict(json.loads((checkpoint / STATE_FILE).read_text()))


LOCK_FILE = ".lock"
# What a finished or interrupted run leaves in its output folder (the trackers' folder aside).
RUN_FILES = ("checkpoints", "model", "metrics.jsonl", "results.json", "run_config.json", "knn_curve.json",
             "knn_curve.png", "training_curves.png")  # fmt: skip


def clear_or_refuse_previous_run(output_dir: Path, overwrite: bool) -> None:
    """Before a fresh run (not a resume): a folder holding another run's checkpoints, model or metrics is refused,
    or, with `overwrite`, emptied of that run's files. Mixing them would overwrite some of the old run's steps,
    let the limit rotate away the new run's own (the old run's later steps count as newer), point `latest` at the
    other run and append to its metrics."""
    found = [name for name in ("checkpoints", "model", "metrics.jsonl")
             if (output_dir / name).is_file() or any((output_dir / name).glob("*"))]  # fmt: skip
    if not found:
        return
    if not overwrite:
        raise UsageError(
            f"`output_dir` {str(output_dir)!r} holds another run ({', '.join(found)}): continue it with "
            "`resume_from_checkpoint` latest, or replace it with `overwrite_output_dir` (or choose another folder)."
        )
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.warning("Removed the previous run's checkpoints, model and metrics from %s (`overwrite_output_dir`).",
                   output_dir)  # fmt: skip


def refuse_symbolic_links(output_dir: Path) -> None:
    """The run writes, replaces and deletes only regular files and folders of its own: an entry it would touch that
    is a symbolic link (planted to make it overwrite or delete a file elsewhere) is refused in one line, before any
    write. The output folder itself may be a link (a folder on another disk)."""
    entries = [output_dir / name for name in (LOCK_FILE, *RUN_FILES)]
    for folder in (output_dir / "checkpoints", output_dir / "model"):
        if folder.is_dir() and not folder.is_symlink():
            entries += [*folder.iterdir(), *(folder / ABANDONED_DIR).glob("*")]
    for entry in entries:
        if entry.is_symlink():
            raise UsageError(
                f"{entry} is a symbolic link (to {os.readlink(entry)}): a run writes only its own files inside "
                "`output_dir`, never through a link; remove the link or choose another folder."
            )


def check_output_dir(output_dir: Path, model: torch.nn.Module, limit: int | None) -> None:
    """Fail before training when the output folder holds a symbolic link where the run writes, cannot be written or
    cannot hold one checkpoint (counting the space of those that the next save rotates away first, with
    `limit`)."""
    refuse_symbolic_links(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"`output_dir` {str(output_dir)!r} is not writable: {error.strerror or error}.") from error
    # A checkpoint holds every tensor of the model, plus SGD's momentum for the query encoder's parameters.
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = model_bytes + sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rotated = sum(path.stat().st_size for old in checkpoints_to_rotate(output_dir, limit) for path in old.rglob("*"))
    free = shutil.disk_usage(output_dir).free + rotated
    if free < needed:
        raise UsageError(
            f"`output_dir` {str(output_dir)!r} has {free / 2**20:.0f} MiB free, but one checkpoint needs about "
            f"{needed / 2**20:.0f} MiB; free some space, choose another folder or lower `checkpoints_total_limit` "
            "(the checkpoints beyond it, but the newest, are deleted before the next one is written)."
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
    """`--resume_from_checkpoint`: "latest" (the newest intact checkpoint, None if there is none; damaged ones are
    skipped with a warning) or a path (refused with one line when damaged)."""
    if value == "latest":
        for candidate in reversed(checkpoint_dirs(output_dir)):
            damage = checkpoint_damage(candidate)
            if damage is None:
                return candidate
            logger.warning("Skipping checkpoint %s: %s; trying the one before.", candidate, damage)
        return None
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"`resume_from_checkpoint` {value!r} is not a complete checkpoint (no {STATE_FILE}).")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise UsageError(f"checkpoint {path} cannot be trusted: {damage}. Resume from another one (or 'latest').")
    return path


def set_aside_newer_checkpoints(checkpoint: Path, output_dir: Path) -> list[Path]:
    """Rolling back to `checkpoint`: the run's newer checkpoints move to `checkpoints/abandoned/`, so that the
    limit rotates the new ones and `latest` means this run's newest. Returns the new places."""
    step = int(checkpoint.name[len(CHECKPOINT_PREFIX) :])
    newer = [p for p in checkpoint_dirs(output_dir) if int(p.name[len(CHECKPOINT_PREFIX) :]) > step]
    moved = []
    for path in newer:
        target = output_dir / "checkpoints" / ABANDONED_DIR / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    return moved


class OutputDirLock:
    """An exclusive lock on `output_dir/.lock`, held while a run lives: a second run there is refused at once. The
    kernel releases it when the holder dies, however it dies, so a killed run never leaves a stale lock."""

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link planted after `check_output_dir` still cannot redirect the PID written below.
        descriptor = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self.file = os.fdopen(descriptor, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UsageError(
                f"another run (pid {holder}) is writing to `output_dir` {str(output_dir)!r}; wait for it to end "
                "or choose another folder."
            ) from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        """Let another run write there (a run in the same process, e.g. a resume from Python)."""
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
