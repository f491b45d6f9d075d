"""The run's state that never changes in the loop, and the signals that stop it cleanly."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.distributed.constants import default_pg_timeout as DEFAULT_PG_TIMEOUT

from ..configuration_moco import MocoConfig
from ..data import (
    TwoViewAugmentation,
)
from ..hub_upload import HubPublisher
from ..knn import KnnMonitor
from ..modeling_moco import MocoModel
from ..run_policy import OutputDirLock
from .arguments import MocoTrainingArguments
from .data_plan import DataPlan


@dataclass
class Run:
    """Everything the loop and the saves read; built once by `setup`, never changed by the loop."""

    args: MocoTrainingArguments
    config: MocoConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: DataPlan
    two_crops: TwoViewAugmentation
    knn: KnnMonitor | None
    learning_rate: float
    output_dir: Path
    command: str  # how the run was started, for results.json
    lock: OutputDirLock | None  # the main process's hold on output_dir
    repo_id: str = ""
    publisher: HubPublisher | None = None
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
        self.by_peer = False  # received by another process of the run, which all stop with (`agreed_stop`)

    def __call__(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum)

    def adopt(self, signum: int) -> None:
        self.received, self.by_peer = signal.Signals(signum), True


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


# What a collective raises when a peer stopped answering (gloo: "Timed out waiting ...ms"), or died ("Connection
# closed by peer", "Connection reset by peer"). NCCL's watchdog ends the process itself after the timeout.
PEER_LOST = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_peer_lost(error: BaseException) -> bool:
    return isinstance(error, torch.distributed.DistError) or any(words in str(error) for words in PEER_LOST)


@contextmanager
def peer_timeout(seconds: int) -> Iterator[None]:
    """Collectives of the processes wait at most `seconds` for each other inside (the training loop and its
    checkpoints), the process group's default (30 minutes: a download on the main process) outside."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield
        return
    # `set_timeout` is the public name in recent torch; older releases have it only as the private `_set_pg_timeout`.
    set_timeout = getattr(torch.distributed, "set_timeout", None) or torch.distributed.distributed_c10d._set_pg_timeout
    set_timeout(timedelta(seconds=seconds))
    try:
        yield
    finally:
        set_timeout(DEFAULT_PG_TIMEOUT)
