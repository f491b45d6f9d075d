"""Start a MoCo run from existing weights: a saved MocoModel, or a timm backbone with pretrained weights (e.g.
ImageNet ones, for domain-adaptive pretraining on one's own images)."""

from __future__ import annotations

import json
from pathlib import Path

import timm
from transformers import AutoModel
from transformers.utils import cached_file

from .configuration_moco import MocoConfig
from .errors import UsageError, first_line
from .export import timm_reference
from .modeling_moco import MocoModel


def _saved_config(name_or_path: str) -> dict | None:
    """The config.json of a local folder or Hub repo, None when there is none (e.g. a timm model name)."""
    if name_or_path.startswith("hf-hub:") or timm.is_model(name_or_path):
        return None
    try:
        config_file = cached_file(name_or_path, "config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:  # not a repo id at all, or offline: treated as a timm name below
        return None
    return json.loads(Path(config_file).read_text()) if config_file else None


def load_pretrained_weights(model: MocoModel, name_or_path: str, trust_remote_code: bool = False) -> str:
    """Load `name_or_path` into `model` and return a description of what was loaded.

    A saved MocoModel (`model_type` "moco") gives every tensor: both encoders, heads and queue. Anything else is
    read by timm (`timm.create_model(..., pretrained=True)`: a timm name with a weight tag, `hf-hub:...`, or a
    folder exported in timm's format) and gives both backbones; the heads keep their fresh initialisation. The
    architectures must match (`--backbone`, `--cifar_stem`); a mismatch is one `UsageError` line.
    """
    config = _saved_config(name_or_path)
    try:
        if config is not None and config.get("model_type") == MocoConfig.model_type:
            source = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            model.load_state_dict(source.state_dict())
            return f"the MocoModel {name_or_path}"
        saved = config is not None or Path(name_or_path).is_dir()  # else a timm name, e.g. "resnet50.a1_in1k"
        timm_name = timm_reference(name_or_path) if saved else name_or_path
        backbone = timm.create_model(timm_name, pretrained=True, num_classes=0)
        model.encoder_q.backbone.load_state_dict(backbone.state_dict())
    except (RuntimeError, OSError, ValueError) as error:
        raise UsageError(f"could not start from {name_or_path!r}: {first_line(error)}") from error
    model.encoder_k.load_state_dict(model.encoder_q.state_dict())  # the key encoder starts as a copy, as always
    return f"the timm weights {timm_name} (both backbones)"
