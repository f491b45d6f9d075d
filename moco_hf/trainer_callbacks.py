"""`transformers.Trainer` support: the key encoder's momentum schedule, which `MocoModel` cannot move by itself.

MoCo v3 raises the momentum m from its base value to 1 on a half cosine over training (its code passes `m` to
`forward` each step); `moco_hf.pretraining` sets `model.key_momentum` before every optimizer step. A `Trainer` run
does the same with `callbacks=[KeyMomentumScheduleCallback()]`; with a constant schedule (v1, v2) it changes nothing.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .schedules import momentum_at


class KeyMomentumScheduleCallback(TrainerCallback):
    """Before each optimizer step, sets `model.key_momentum` to `momentum_at(step, max_steps, config.momentum,
    config.momentum_schedule)`: the value the step's momentum updates of the key encoder use."""

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        moco = getattr(model, "module", model)  # DDP-wrapped on several processes
        config = moco.config
        moco.key_momentum = momentum_at(state.global_step, state.max_steps, config.momentum, config.momentum_schedule)
