"""The schedules of a MoCo run, all built on one half cosine: the learning rate (v2/v3 cosine, v1 steps, with an
optional linear warmup) and the key encoder's momentum (v3: from m to 1)."""

from __future__ import annotations

import math
from functools import partial

import torch

STEP_MILESTONES = (0.6, 0.8)  # v1: x0.1 at epochs 120 and 160 of 200


def cosine_decay(step: int, total_steps: int) -> float:
    """Half a cosine from 1 at step 0 to 0 at `total_steps` (and after)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """Key encoder momentum at `step`: constant, or (v3) m = 1 - (1 - base) * cosine_decay(step, total_steps)."""
    if schedule == "constant":
        return base
    return 1.0 - (1.0 - base) * cosine_decay(step, total_steps)


def learning_rate_factor(
    step: int, schedule: str, total_steps: int, warmup_steps: int = 0, steps_per_epoch: int = 1
) -> float:
    """Multiplier of the peak learning rate at `step`: a linear warmup over `warmup_steps`, then `schedule` over the
    remaining steps ("cosine": `cosine_decay`; "step": x0.1 at 60% and 80% of training; "cosine-per-epoch": the
    official CIFAR demo's, set at the start of each epoch e = 1, 2, ... of E to 0.5 * (1 + cos(pi * e / E)))."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress_step, decay_steps = step - warmup_steps, total_steps - warmup_steps
    if schedule == "cosine":
        return cosine_decay(progress_step, decay_steps)
    if schedule == "cosine-per-epoch":
        epochs = max(1, round(decay_steps / steps_per_epoch))
        return cosine_decay(progress_step // steps_per_epoch + 1, epochs)
    progress = progress_step / max(1, decay_steps)
    return 0.1 ** sum(progress >= milestone for milestone in STEP_MILESTONES)


def learning_rate_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0, steps_per_epoch: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` stepping `learning_rate_factor` once per optimizer step (its position is in its state dict)."""
    factor = partial(learning_rate_factor, schedule=schedule, total_steps=total_steps, warmup_steps=warmup_steps,
                     steps_per_epoch=steps_per_epoch)  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def continue_schedule_with_peak(optimizer: torch.optim.Optimizer, scheduler, learning_rate: float) -> None:
    """Give a restored `LambdaLR` (and its optimizer) the peak `learning_rate` from its current step on: the rate of
    every parameter group becomes `learning_rate` times the schedule's factor at that step."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper holds the LambdaLR
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    rates = [learning_rate * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["initial_lr"], group["lr"] = learning_rate, rate
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step
