"""moco-hf: MoCo (Momentum Contrast) pretraining of timm vision encoders, native to Hugging Face.

The models (`MocoConfig`, `MocoModel`, `MocoForImageClassification` for labelled images, and `MocoBackbone` for
detectors and segmenters) and the training run (`train`, `MocoTrainingArguments`, from `moco_hf.pretraining`) are
importable from here, each loaded on first use; the pieces live in submodules: `moco_hf.data` (datasets streams
of two-crop batches), `moco_hf.augmentation`, `moco_hf.knn`, `moco_hf.checkpointing`, `moco_hf.schedules`,
`moco_hf.optimization`, `moco_hf.model_card`, `moco_hf.export`, `moco_hf.evaluation`, `moco_hf.linear_probe` and
`moco_hf.trainer_callbacks`. The repository's `training/` scripts and the `moco-hf` command are thin layers over
them.

`import moco_hf` registers the models with transformers' Auto classes (`register_auto_classes`), so that
`AutoModel.from_pretrained` of a moco-hf folder works. The `moco-hf` command alone defers that to the subcommand
that needs it, so that `--help` and a usage error answer without loading torch.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backbone import MocoBackbone
    from .configuration_moco import MocoConfig
    from .export import export_encoder
    from .modeling_moco import MocoForImageClassification, MocoModel, MocoOutput, SplitBatchNorm2d, concat_all_gather
    from .presets import PRESETS
    from .pretraining import MocoTrainingArguments, train

# Where each public name lives; loaded on first access.
_EXPORTS = {
    "PRESETS": "presets",
    "MocoConfig": "configuration_moco",
    "MocoModel": "modeling_moco",
    "MocoForImageClassification": "modeling_moco",
    "MocoOutput": "modeling_moco",
    "SplitBatchNorm2d": "modeling_moco",
    "concat_all_gather": "modeling_moco",
    "MocoBackbone": "backbone",
    "export_encoder": "export",
    "MocoTrainingArguments": "pretraining",
    "train": "pretraining",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'moco_hf' has no attribute {name!r}")


def register_auto_classes() -> None:
    """Register the models with transformers' Auto classes (`AutoConfig`, `AutoModel`,
    `AutoModelForImageClassification`, `AutoBackbone`; `AutoImageProcessor` for band images) and for
    `trust_remote_code` saving (`auto_map` and the model's code go with every `save_pretrained` / `push_to_hub`).
    Idempotent; `import moco_hf` calls it."""
    from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    from .backbone import MocoBackbone
    from .configuration_moco import MocoConfig
    from .image_processing import MocoBandImageProcessor
    from .modeling_moco import MocoForImageClassification, MocoModel

    AutoConfig.register(MocoConfig.model_type, MocoConfig, exist_ok=True)
    AutoModel.register(MocoConfig, MocoModel, exist_ok=True)
    AutoModelForImageClassification.register(MocoConfig, MocoForImageClassification, exist_ok=True)
    AutoBackbone.register(MocoConfig, MocoBackbone, exist_ok=True)  # detectors and segmenters: `backbone_config`
    # Models of other band counts than 3 save this processor by name (RGB ones save transformers' BitImageProcessor);
    # it works on torch tensors, transformers' "torchvision" backend.
    band_processor = {"torchvision": MocoBandImageProcessor}
    AutoImageProcessor.register(MocoConfig, image_processor_classes=band_processor, exist_ok=True)
    MocoBandImageProcessor.register_for_auto_class("AutoImageProcessor")
    MocoConfig.register_for_auto_class()
    MocoModel.register_for_auto_class("AutoModel")
    MocoForImageClassification.register_for_auto_class("AutoModelForImageClassification")


# The console script `moco-hf` (and `moco-hf.exe`): its subcommands register once their arguments are checked.
if Path(sys.argv[0] if sys.argv else "").stem != "moco-hf":
    register_auto_classes()

__all__ = [
    "PRESETS",
    "MocoBackbone",
    "MocoConfig",
    "MocoForImageClassification",
    "MocoModel",
    "MocoOutput",
    "MocoTrainingArguments",
    "SplitBatchNorm2d",
    "concat_all_gather",
    "export_encoder",
    "register_auto_classes",
    "train",
]
__version__ = "0.1.0"
