"""One-line explanations of why a saved MocoModel does not load (kept out of the model code)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from transformers.utils import cached_file

from .configuration_moco import MocoConfig
from .model_sources import MOCO, identify_model


def describe_shape_mismatch(name_or_path: str | Path, kwargs: dict) -> str:
    """Which config.json field disagrees with the checkpoint's tensors, read from the safetensors header."""
    config = kwargs.get("config") or MocoConfig.from_pretrained(name_or_path)
    with safe_open(cached_file(name_or_path, "model.safetensors"), framework="pt") as checkpoint:
        stored_queue_size, stored_dim = checkpoint.get_slice("queue").get_shape()
    fields = [
        f"{field}={value} in config.json but {stored} in the weights"
        for field, value, stored in (
            ("queue_size", config.queue_size, stored_queue_size),
            ("dim", config.dim, stored_dim),
        )
        if value != stored
    ]
    return (
        f"the checkpoint in {name_or_path} does not match its config: "
        + ("; ".join(fields) if fields else "check `backbone`, `backbone_kwargs`, `mlp` and `mlp_hidden_dim`")
        + "."
    )


def check_is_moco_model(name_or_path: str | Path) -> None:
    """Raise `UsageError` when the local folder `name_or_path` is not a saved MocoModel (a training checkpoint, an
    exported timm encoder, another model); Hub ids are left to `from_pretrained`."""
    if Path(name_or_path).is_dir():
        identify_model(name_or_path, accept=(MOCO,))
