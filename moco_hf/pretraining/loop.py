"""The training loop: MoCo steps with logging, kNN monitoring, checkpoints and stops on the way."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpointing import TrainerState, numerical_fault_advice
from ..errors import RunError
from ..schedules import momentum_at
from .data_plan import next_batch
from .outputs import checkpoint, record_knn
from .run import Run, StopSignal

logger = logging.getLogger("moco_hf.pretrain")


class MetricsWindow:
    """Sums of the loss, contrastive accuracy and images over the steps since the last log line."""

    def __init__(self) -> None:
        self.start, self.images, self.loss, self.top1, self.steps = time.perf_counter(), 0, 0.0, 0.0, 0
        self.lr = math.nan

    def add(self, loss: float, top1: float, images: int, lr: float) -> None:
        """One micro-batch's loss, contrastive top-1 and images, trained at learning rate `lr`."""
        self.loss, self.top1, self.images, self.steps = self.loss + loss, self.top1 + top1, self.images + images, \
            self.steps + 1  # fmt: skip
        self.lr = lr

    def metrics(self, run: Run, state: TrainerState) -> dict[str, float]:
        """The `metrics.jsonl` row of this window."""
        step = state.completed_steps
        return {
            "step": step,
            "epoch": step / run.plan.steps_per_epoch,
            "loss": self.loss / self.steps,
            "contrastive_top1": 100.0 * self.top1 / self.steps,
            "lr": self.lr,  # the last step's (the scheduler already holds the next one's)
            "images_per_second": self.images / (time.perf_counter() - self.start),
            "queue_fill": min(1.0, step * run.plan.global_batch / max(1, run.config.queue_size)),
            "skipped_images": state.skipped_images,
        }


def log_metrics(run: Run, metrics: dict[str, float], progress: tqdm) -> None:
    progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.3g}",
                         img_s=f"{metrics['images_per_second']:.0f}")  # fmt: skip
    run.accelerator.log(metrics, step=metrics["step"])
    if run.accelerator.is_main_process:
        with run.metrics_path.open("a") as stream:
            stream.write(json.dumps(metrics) + "\n")


def training_step(run: Run, state: TrainerState, data: Iterator[dict[str, Any]], window: MetricsWindow) -> None:
    """One optimizer step: `gradient_accumulation_steps` micro-batches, each a full MoCo step (key encoder
    momentum update, keys enqueued)."""
    accelerator, moco = run.accelerator, run.moco
    moco.key_momentum = momentum_at(state.completed_steps, run.plan.total_steps, run.config.momentum,
                                    run.config.momentum_schedule)  # fmt: skip
    lr = run.scheduler.get_last_lr()[0]
    for _ in range(run.args.gradient_accumulation_steps):
        batch = next_batch(data)
        state.skipped_images += batch["skipped"]
        query, key = run.two_crops.on_device(batch, accelerator.device)
        if run.args.channels_last:
            query, key = (t.contiguous(memory_format=torch.channels_last) for t in (query, key))
        with accelerator.accumulate(run.model):
            with accelerator.autocast():
                output = run.model(pixel_values=query, key_pixel_values=key)
            accelerator.backward(output.loss)
            if accelerator.sync_gradients and run.args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(moco.encoder_q.parameters(), run.args.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        loss = output.loss.item()
        if not math.isfinite(loss):
            raise RunError(
                f"the loss became {loss} at step {state.completed_steps + 1}; training stopped. "
                + numerical_fault_advice(run.output_dir)
            )
        top1 = (output.logits.argmax(dim=1) == output.labels).float().mean().item()
        window.add(loss, top1, query.shape[0] * accelerator.num_processes, lr)
    state.completed_steps += 1


def agreed_stop(run: Run, stop: StopSignal) -> tuple[bool, bool]:
    """(a stop signal, the wall-time budget used up) after this step, as every process agrees (one all-reduce of two
    numbers): a signal sent to one process stops all at this step, so that they save the same checkpoint together
    (one left stepping alone would wait in the next collective), and the budget, timed by each, ends all at once."""
    args = run.args
    over = args.max_train_minutes is not None and run.training_seconds() >= 60 * args.max_train_minutes
    local = torch.tensor([float(stop.received or 0), float(over)], device=run.accelerator.device)
    signal_number, over_budget = run.accelerator.reduce(local, reduction="max").tolist()
    if signal_number and stop.received is None:
        stop.adopt(int(signal_number))
    return bool(signal_number), bool(over_budget)


def train_loop(run: Run, state: TrainerState, data: Iterator[dict[str, Any]], stop: StopSignal) -> None:
    """Steps until `total_steps` (or `--stop_after_epochs`), the wall-time budget or a stop signal, logging, kNN
    monitoring and checkpointing on the way."""
    args, plan = run.args, run.plan
    eval_every_steps = int(args.eval_every * plan.steps_per_epoch) if args.eval_every and run.knn else None
    stop_step = plan.total_steps
    if args.stop_after_epochs is not None:
        stop_step = min(stop_step, round(args.stop_after_epochs * plan.steps_per_epoch))
    progress = tqdm(total=stop_step, initial=state.completed_steps,
                    disable=not run.accelerator.is_local_main_process, desc="MoCo")  # fmt: skip
    run.model.train()
    window = MetricsWindow()
    try:
        while state.completed_steps < stop_step:
            training_step(run, state, data, window)
            progress.update(1)
            signalled, over_budget = agreed_stop(run, stop)
            if signalled:
                return
            step, last = state.completed_steps, state.completed_steps == stop_step
            if step % args.logging_steps == 0 or last or over_budget:
                log_metrics(run, window.metrics(run, state), progress)
                window = MetricsWindow()
            if eval_every_steps and step % eval_every_steps == 0 and not last and not over_budget:
                logger.info("step %d: kNN top-1 %.2f%%", step, record_knn(run, state))
            ends_here = last or over_budget  # `finish` saves the last step, after its kNN
            if args.checkpointing_steps and step % args.checkpointing_steps == 0 and not ends_here:
                checkpoint(run, state)
            if over_budget:
                logger.warning("--max_train_minutes %s reached at step %d: stopping.", args.max_train_minutes, step)
                return
    finally:
        progress.close()  # so that an error message starts on its own line
