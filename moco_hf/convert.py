"""Conversion between checkpoints of the official facebookresearch/moco code and `MocoModel`.

The official `main_moco.py` saves `{"arch", "epoch", "state_dict", "optimizer"}` where `state_dict` holds
`module.encoder_q.*` / `module.encoder_k.*` (a torchvision ResNet whose `fc` is the projection head: a Linear for
v1, `Sequential(Linear, ReLU, Linear)` for v2), `module.queue` of shape `(dim, K)` and `module.queue_ptr`.
timm's ResNets use torchvision's parameter names, so the backbone maps one to one; `fc` becomes `head` and the
queue is transposed to our `(K, dim)` layout.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .configuration_moco import MocoConfig
from .modeling_moco import MocoModel

ENCODERS = ("encoder_q", "encoder_k")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not have the expected layout."""


def load_torch_checkpoint(path: str | Path) -> dict:
    """`torch.load(..., weights_only=True)`: tensors and plain containers only, never code from the pickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} is a pickle that needs more than tensors and plain Python values to load (it would import or "
            f"run code), so it was refused. Only load it with weights_only=False if you trust its origin. "
            f"Details: {str(error).splitlines()[0]}"
        ) from error


def official_to_moco(checkpoint: dict, backbone: str = "resnet50", **config_overrides) -> MocoModel:
    """A `MocoModel` on the timm `backbone` holding the official checkpoint's encoders and queue."""
    state = checkpoint.get("state_dict", checkpoint)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if "queue" not in state or not any(key.startswith("encoder_q.") for key in state):
        raise CheckpointError(
            "not a MoCo v1/v2 checkpoint of the official code: expected `module.encoder_q.*` and `module.queue` "
            f"in its state_dict, found keys such as {sorted(state)[:5]}."
        )
    queue = state["queue"]  # (dim, K)
    mlp = "encoder_q.fc.0.weight" in state
    config = MocoConfig.from_preset(
        "v2" if mlp else "v1",
        backbone=backbone,
        dim=queue.shape[0],
        queue_size=queue.shape[1],
        mlp_hidden_dim=state["encoder_q.fc.0.weight"].shape[0] if mlp else None,
        **config_overrides,
    )
    converted = {"queue": queue.T.contiguous(), "queue_ptr": state["queue_ptr"].long().reshape(1)}
    for key, value in state.items():
        encoder, _, name = key.partition(".")
        if encoder in ENCODERS:
            head, _, rest = name.partition(".")
            converted[f"{encoder}.head.{rest}" if head == "fc" else f"{encoder}.backbone.{name}"] = value
    model = MocoModel(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint does not fit timm's {backbone!r}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    return model


def moco_to_official(model: MocoModel) -> dict:
    """The official code's checkpoint layout (`{"arch", "state_dict"}`), e.g. for its `main_lincls.py`."""
    state = {"module.queue": model.queue.T.contiguous(), "module.queue_ptr": model.queue_ptr.clone()}
    for key, value in model.state_dict().items():
        encoder, _, name = key.partition(".")
        if encoder in ENCODERS:
            part, _, rest = name.partition(".")
            state[f"module.{encoder}.{f'fc.{rest}' if part == 'head' else rest}"] = value
    return {"arch": model.config.backbone, "state_dict": state}
