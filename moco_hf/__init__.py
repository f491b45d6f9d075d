"""moco-hf: MoCo (Momentum Contrast) pretraining of timm vision encoders, native to Hugging Face."""

from transformers import AutoConfig, AutoModel

from .configuration_moco import PRESETS, MocoConfig
from .modeling_moco import MocoModel, MocoOutput, SplitBatchNorm2d, concat_all_gather

AutoConfig.register(MocoConfig.model_type, MocoConfig, exist_ok=True)
AutoModel.register(MocoConfig, MocoModel, exist_ok=True)
# save_pretrained/push_to_hub then also write an `auto_map` and these two modules, for trust_remote_code loading.
MocoConfig.register_for_auto_class()
MocoModel.register_for_auto_class("AutoModel")

__all__ = ["PRESETS", "MocoConfig", "MocoModel", "MocoOutput", "SplitBatchNorm2d", "concat_all_gather"]
__version__ = "0.1.0"
