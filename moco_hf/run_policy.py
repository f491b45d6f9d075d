"""What a run may do with its output folder and its checkpoints: the folder is its own (one run at a time, the lock;
no symbolic links followed; never mixed with another run's files), which checkpoint a resume starts from (the newest
intact one; newer ones set aside on a rollback), what it must share with it (the settings compared on resume), and
that its pickles cannot run code. How checkpoints are written and checked lives in `checkpointing`."""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from .checkpointing import (
    ABANDONED_DIR,
    CHECKPOINT_PREFIX,
    STATE_FILE,
    TrainerState,
    checkpoint_damage,
    checkpoint_dirs,
    checkpoints_to_rotate,
    read_trainer_state,
)
from .configuration_moco import MAY_CHANGE_ON_RESUME, MocoConfig
from .errors import DataError, UsageError, first_line

logger = logging.getLogger(__name__)


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
