"""Conversion between checkpoints of the official facebookresearch/moco (and moco-v3) code and `MocoModel`.

The official `main_moco.py` saves `{"arch", "epoch", "state_dict", "optimizer"}` where `state_dict` holds
`module.encoder_q.*` / `module.encoder_k.*` (a torchvision ResNet whose `fc` is the projection head: a Linear for
v1, `Sequential(Linear, ReLU, Linear)` for v2), `module.queue` of shape `(dim, K)` and `module.queue_ptr`.
timm's ResNets use torchvision's parameter names, so the backbone maps one to one; `fc` becomes `head` and the
queue is transposed to our `(K, dim)` layout.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch

from .configuration_moco import MocoConfig
from .errors import UsageError
from .modeling_moco import MocoModel

ENCODERS = ("encoder_q", "encoder_k")


class CheckpointError(UsageError):
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


OFFICIAL_IMAGE_SIZE = 224  # the official code's ImageNet crop, for a checkpoint that does not record another


def official_to_moco(
    checkpoint: dict, backbone: str | None = None, image_size: int | None = None, **config_overrides
) -> MocoModel:
    """A `MocoModel` on the timm `backbone` (default: the checkpoint's `arch`, else resnet50) holding an official
    checkpoint's encoders (and queue): MoCo v1/v2 (facebookresearch/moco) or MoCo v3 with a ResNet
    (facebookresearch/moco-v3). `image_size`: default the checkpoint's (`moco_to_official` records it), else 224."""
    backbone = backbone or checkpoint.get("arch") or "resnet50"
    config_overrides["image_size"] = image_size or checkpoint.get("image_size") or OFFICIAL_IMAGE_SIZE
    state = checkpoint.get("state_dict", checkpoint)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    config_overrides = {**input_bands(state), **config_overrides}
    if any(key.startswith("base_encoder.") for key in state):
        return _official_v3_to_moco(state, backbone, **config_overrides)
    if "queue" not in state or not any(key.startswith("encoder_q.") for key in state):
        raise CheckpointError(
            "not a MoCo checkpoint of the official code: expected `module.encoder_q.*` and `module.queue` (v1/v2) "
            f"or `module.base_encoder.*` (v3) in its state_dict, found keys such as {sorted(state)[:5]}."
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
    return _load(config, converted, backbone)


# MoCo v3 (facebookresearch/moco-v3, `moco/builder.py`): `base_encoder` / `momentum_encoder` are torchvision ResNets
# whose `fc` is the BatchNorm projection MLP, or timm VisionTransformers (`vits.py`) whose `head` is; `predictor` is
# the prediction MLP. Same layer order as our `build_mlp`.
V3_ENCODERS = {"base_encoder": "encoder_q", "momentum_encoder": "encoder_k"}
# moco-v3's ViTs by width: timm's architecture, with 12 heads (its ViT-Small has 12 where timm's has 6).
OFFICIAL_VITS = {384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}


FIRST_LAYERS = ("encoder_q.conv1.weight", "base_encoder.conv1.weight", "base_encoder.patch_embed.proj.weight")


def input_bands(state: dict) -> dict:
    """The input channel count of an official checkpoint, read from its first layer (e.g. 13 for SSL4EO-S12's
    Sentinel-2 MoCo checkpoints), as config fields when it is not RGB: `num_channels`, and a mean of 0 and std of 1
    per band, since the checkpoint does not record the statistics its bands were normalised with (set them)."""
    first = next((state[name] for name in FIRST_LAYERS if name in state), None)
    bands = 3 if first is None else first.shape[1]
    return {} if bands == 3 else {"num_channels": bands, "image_mean": [0.0] * bands, "image_std": [1.0] * bands}


def _official_vit(state: dict) -> tuple[str, dict]:
    """timm name and kwargs of a moco-v3 ViT checkpoint, read from its tensor shapes (patch, image size, heads)."""
    width = state["base_encoder.cls_token"].shape[-1]
    if width not in OFFICIAL_VITS:
        raise CheckpointError(f"a moco-v3 ViT of width {width}: only {sorted(OFFICIAL_VITS)} (vit_small, vit_base).")
    patch = state["base_encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["base_encoder.pos_embed"].shape[1] - 1)  # tokens: the grid and the class token
    return OFFICIAL_VITS[width], {"num_heads": 12, "patch_size": patch, "img_size": grid * patch}


def _official_v3_to_moco(state: dict, backbone: str, **config_overrides) -> MocoModel:
    vit = "base_encoder.cls_token" in state
    head = "head" if vit else "fc"
    if vit:
        backbone, kwargs = _official_vit(state)
        config_overrides = {"backbone_kwargs": kwargs, **config_overrides}
    projector = [key for key in state if key.startswith(f"base_encoder.{head}.") and state[key].ndim == 2]
    predictor_out = state[max(k for k in state if k.startswith("predictor.") and state[k].ndim == 2)]
    config = MocoConfig.from_preset(
        "v3-vit" if vit else "v3",
        backbone=backbone,
        dim=predictor_out.shape[0],
        mlp_hidden_dim=state[f"base_encoder.{head}.0.weight"].shape[0],
        projector_layers=len(projector),
        **config_overrides,
    )
    # v3 keeps no queue: an empty one (K=0) and its pointer.
    converted = {"queue": torch.empty(0, config.dim), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    for key, value in state.items():
        part, _, name = key.partition(".")
        if part == "predictor":
            converted[key] = value
        elif part in V3_ENCODERS:
            layer, _, rest = name.partition(".")
            converted[
                f"{V3_ENCODERS[part]}.head.{rest}" if layer == head else f"{V3_ENCODERS[part]}.backbone.{name}"
            ] = value
    return _load(config, converted, backbone)


def _load(config: MocoConfig, state: dict, backbone: str) -> MocoModel:
    model = MocoModel(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise CheckpointError(
                f"the checkpoint does not fit timm's {backbone!r}: {name} is {tuple(tensor.shape)} in the checkpoint "
                f"but {tuple(expected[name].shape)} in {backbone!r} (first of "
                f"{sum(n in expected and expected[n].shape != t.shape for n, t in state.items())} mismatches); pass "
                "the checkpoint's architecture as `backbone`."
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint does not fit timm's {backbone!r}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    return model


def moco_to_official(model: MocoModel) -> dict:
    """The official code's checkpoint layout (`{"arch", "state_dict"}`), e.g. for its `main_lincls.py`: moco-v3's
    for a model with a predictor, facebookresearch/moco's otherwise. A CIFAR-stem ResNet is refused: the official
    code builds torchvision's ResNet with its 7x7/2 stem and max-pool, which cannot hold a 3x3/1 conv1."""
    if model.config.cifar_stem:
        raise CheckpointError(
            "a CIFAR-stem encoder (3x3/1 conv1, no max-pool) has no official layout: the official main_moco.py and "
            "main_lincls.py build torchvision's ImageNet ResNet. Use the MocoModel folder, or `moco-hf export`."
        )
    v3 = model.predictor is not None
    head = "head" if hasattr(model.encoder_q.backbone, "cls_token") else "fc"  # the official ViT's, or ResNet's
    names = {v: k for k, v in V3_ENCODERS.items()} if v3 else {encoder: encoder for encoder in ENCODERS}
    state = {} if v3 else {"module.queue": model.queue.T.contiguous(), "module.queue_ptr": model.queue_ptr.clone()}
    for key, value in model.state_dict().items():
        part, _, name = key.partition(".")
        if part in names:
            layer, _, rest = name.partition(".")
            state[f"module.{names[part]}.{f'{head}.{rest}' if layer == 'head' else rest}"] = value
        elif part == "predictor":
            state[f"module.{key}"] = value
    # `image_size` is ours (the official code reads `arch` and `state_dict` only): a round trip keeps the input size.
    return {"arch": model.config.backbone, "image_size": model.config.image_size, "state_dict": state}
