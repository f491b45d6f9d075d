"""`train`: a whole MoCo pretraining run from Python; `main`: the same from the command line."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..checkpointing import TrainerState, checkpoint_dirs
from ..data import (
    close_loader,
)
from ..errors import RunError, TrainingStopped, first_line
from .arguments import MocoTrainingArguments, command_line
from .data_plan import build_loader
from .loop import train_loop
from .outputs import checkpoint, finish, record_initial_knn
from .run import Run, is_peer_lost, peer_timeout, stop_on_signals
from .setup import setup, uses_sync_batch_norm

logger = logging.getLogger("moco_hf.pretrain")


def train(args: MocoTrainingArguments, command: str | None = None) -> dict[str, Any]:
    """A whole pretraining run: setup, the loop, the final kNN, checkpoint, model folder, results and curves.

    Returns what `results.json` holds (kNN accuracy, steps, epochs, seconds, ...; an empty dict on processes other
    than the main one). Raises `UsageError`/`DataError` for settings or data that cannot work, `RunError` when the
    run cannot go on (its checkpoints stay intact), and `TrainingStopped` after SIGTERM/SIGINT and a checkpoint.
    `command` is what results.json records as the way the run was started (default: the equivalent command line).
    """
    run, state = setup(args, command or shlex.join(command_line(args)))
    try:
        with stop_on_signals() as stop:
            if run.knn is not None and args.knn_at_start and state.completed_steps == 0:
                accuracy = record_initial_knn(run, state)
                logger.info("kNN top-1 of the %s: %.2f%%", state.knn_history[0]["encoder"], accuracy)
            log_plan(run)
            data = build_loader(run.plan, run.two_crops, args, run.accelerator, state.completed_steps)
            with peer_timeout(args.peer_timeout_seconds), peers_lost_as_run_error(run, state):
                try:
                    train_loop(run, state, data, stop)
                finally:
                    close_loader(data)
                if stop.received:
                    logger.warning("%s received%s: saving a checkpoint at step %d before exiting.",
                                   stop.received.name, " by another process" if stop.by_peer else "",
                                   state.completed_steps)  # fmt: skip
                    checkpoint(run, state)
                    raise TrainingStopped(stop.received, state.completed_steps)
        results = finish(run, state)
        run.accelerator.end_training()
        return results
    finally:
        if run.lock is not None:
            run.lock.release()


@contextmanager
def peers_lost_as_run_error(run: Run, state: TrainerState) -> Iterator[None]:
    """A collective that failed because another process stopped answering or died: one line (`RunError`) naming
    the last intact checkpoint, instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as error:
        if not is_peer_lost(error):
            raise
        found = checkpoint_dirs(run.output_dir)
        last = f"the last intact checkpoint is {found[-1].name}" if found else "no checkpoint was saved yet"
        raise RunError(
            f"process {run.accelerator.process_index} lost another process of the run at step "
            f"{state.completed_steps + 1} (it stopped, died or hung; a step waits at most `peer_timeout_seconds` "
            f"{run.args.peer_timeout_seconds}): every process stops; {last} (`resume_from_checkpoint` latest). "
            f"{first_line(error)}"
        ) from error


def log_plan(run: Run) -> None:
    """One line of what is about to train, and how."""
    args, plan, accelerator = run.args, run.plan, run.accelerator
    logger.info(
        "Training %s (%s) for %d steps: %d processes x %d images x %d accumulation = %d per step, lr %.4g, "
        "%d loader workers per process, `shuffle_bn`=%s, query encoder BatchNorm: %s, augmentation on %s.",
        run.config.backbone, args.preset, plan.total_steps, accelerator.num_processes, plan.micro_batch,
        args.gradient_accumulation_steps, plan.global_batch, run.learning_rate, plan.num_workers,
        run.moco.resolve_shuffle_bn(),
        f"synchronised across {accelerator.num_processes} processes" if uses_sync_batch_norm(run.moco)
        else "per process", accelerator.device if args.augment_on_device else "the loader workers",
    )  # fmt: skip
