"""MoCo pretraining with Accelerate, from Python or the command line.

    from moco_hf.pretraining import MocoTrainingArguments, train
    results = train(MocoTrainingArguments(backbone="resnet18", image_size=32, max_train_steps=100))

The same run from the shell: `moco-hf train --backbone resnet18 --image_size 32 --max_train_steps 100` (or
`python training/pretrain.py ...`; several processes: `accelerate launch -m moco_hf.pretraining ...`).
Modules: `arguments` (the settings), `setup` (everything before the first step), `data_plan` (who reads what),
`loop` (the steps), `outputs` (checkpoints, model folder, results), `run` (the run's fixed state), `trainer`
(`train`) and `command` (the command line).
"""

from typing import TYPE_CHECKING, Any

from .arguments import DataArguments, MocoTrainingArguments, ModelArguments, TrainArguments

if TYPE_CHECKING:
    from .command import main, parse_arguments
    from .trainer import train

# The run itself (accelerate, datasets, the model) loads on first use: the command checks its flags first.
_LAZY = {"train": "trainer", "main": "command", "parse_arguments": "command"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'moco_hf.pretraining' has no attribute {name!r}")


__all__ = [
           "DataArguments",
           "MocoTrainingArguments",
           "ModelArguments",
           "TrainArguments",
           "main",
           "parse_arguments",
           "train",
]  # fmt: skip
