"""moco-hf: MoCo (Momentum Contrast) pretraining of timm vision encoders, native to Hugging Face.

The model (`MocoConfig`, `MocoModel`) is importable from here; the training pieces live in submodules:
`moco_hf.data` (datasets streams of two-crop batches), `moco_hf.augmentation`, `moco_hf.knn`,
`moco_hf.checkpointing`, `moco_hf.schedules`, `moco_hf.optimization`, `moco_hf.model_card`, `moco_hf.export`,
`moco_hf.evaluation` and `moco_hf.linear_probe`. The commands are in the repository's `training/` folder.
"""

from transformers import AutoConfig, AutoModel

from .configuration_moco import PRESETS, MocoConfig
from .export import export_encoder
from .modeling_moco import MocoModel, MocoOutput, SplitBatchNorm2d, concat_all_gather

AutoConfig.register(MocoConfig.model_type, MocoConfig, exist_ok=True)
AutoModel.register(MocoConfig, MocoModel, exist_ok=True)
# save_pretrained/push_to_hub then also write an `auto_map` and these two modules, for trust_remote_code loading.
MocoConfig.register_for_auto_class()
MocoModel.register_for_auto_class("AutoModel")

__all__ = [
    "PRESETS",
    "MocoConfig",
    "MocoModel",
    "MocoOutput",
    "SplitBatchNorm2d",
    "concat_all_gather",
    "export_encoder",
]
__version__ = "0.1.0"
