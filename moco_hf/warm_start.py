"""Start a MoCo run from existing weights: a saved MocoModel, or a timm backbone with pretrained weights (e.g.
ImageNet ones, for domain-adaptive pretraining on one's own images)."""

from __future__ import annotations

import timm
from transformers import AutoModel

from .errors import UsageError, first_line
from .export import timm_reference
from .model_sources import MOCO, TIMM_NAME, identify_model
from .modeling_moco import MocoModel


def load_pretrained_weights(model: MocoModel, name_or_path: str, trust_remote_code: bool = False) -> str:
    """Load `name_or_path` into `model` and return a description of what was loaded.

    A saved MocoModel (`model_type` "moco") gives every tensor: both encoders, heads and queue. Anything else is
    read by timm (`timm.create_model(..., pretrained=True)`: a timm name with a weight tag, `hf-hub:...`, or a
    folder exported in timm's format) and gives both backbones; the heads keep their fresh initialisation. The
    architectures must match (`--backbone`, `--cifar_stem`); a mismatch is one `UsageError` line.
    """
    source = identify_model(name_or_path)
    try:
        if source.kind == MOCO:
            saved = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            model.load_state_dict(saved.state_dict())
            return f"the MocoModel {name_or_path}"
        timm_name = name_or_path if source.kind == TIMM_NAME else timm_reference(name_or_path)
        bands = model.config.num_channels
        # timm adapts the first convolution of weights made for another band count (`adapt_input_conv`: RGB
        # filters summed for one band, repeated and rescaled for more).
        backbone = timm.create_model(timm_name, pretrained=True, num_classes=0, in_chans=bands)
        model.encoder_q.backbone.load_state_dict(backbone.state_dict())
    except (RuntimeError, OSError, ValueError) as error:
        raise UsageError(f"could not start from {name_or_path!r}: {first_line(error)}") from error
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())  # the key encoder starts as a copy, as always
    weights_bands = (backbone.pretrained_cfg or {}).get("input_size", (bands,))[0]
    adapted = f", first convolution adapted from {weights_bands} to {bands} bands (timm's adapt_input_conv)"
    return f"the timm weights {timm_name} (both backbones{adapted if weights_bands != bands else ''})"
