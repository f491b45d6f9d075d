"""moco-hf: MoCo (Momentum Contrast) pretraining of timm vision encoders, native to Hugging Face.

The models (`MocoConfig`, `MocoModel`, `MocoForImageClassification` for labelled images, and `MocoBackbone` for
detectors and segmenters) and the training run (`train`, `MocoTrainingArguments`, from `moco_hf.pretraining`,
imported on first use) are importable from here; the pieces live in submodules: `moco_hf.data` (datasets streams
of two-crop batches), `moco_hf.augmentation`, `moco_hf.knn`, `moco_hf.checkpointing`, `moco_hf.schedules`,
`moco_hf.optimization`, `moco_hf.model_card`, `moco_hf.export`, `moco_hf.evaluation`, `moco_hf.linear_probe` and
`moco_hf.trainer_callbacks`. The repository's
`training/` scripts and the `moco-hf` command are thin layers over them.
"""

from typing import Any

from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification

from .backbone import MocoBackbone
from .configuration_moco import PRESETS, MocoConfig
from .export import export_encoder
from .modeling_moco import MocoForImageClassification, MocoModel, MocoOutput, SplitBatchNorm2d, concat_all_gather

AutoConfig.register(MocoConfig.model_type, MocoConfig, exist_ok=True)
AutoModel.register(MocoConfig, MocoModel, exist_ok=True)
AutoModelForImageClassification.register(MocoConfig, MocoForImageClassification, exist_ok=True)
AutoBackbone.register(MocoConfig, MocoBackbone, exist_ok=True)  # detectors and segmenters: `backbone_config`
# save_pretrained/push_to_hub then also write an `auto_map` and these two modules, for trust_remote_code loading.
MocoConfig.register_for_auto_class()
MocoModel.register_for_auto_class("AutoModel")
MocoForImageClassification.register_for_auto_class("AutoModelForImageClassification")

# The trainer pulls in accelerate and datasets: imported when first asked for, not with the model.
_PRETRAINING = ("MocoTrainingArguments", "train")


def __getattr__(name: str) -> Any:
    if name in _PRETRAINING:
        from . import pretraining

        return getattr(pretraining, name)
    raise AttributeError(f"module 'moco_hf' has no attribute {name!r}")


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
    "train",
]
__version__ = "0.1.0"
