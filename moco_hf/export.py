"""Export a MocoModel's query backbone for use without `moco_hf`: timm's Hub format, a torchvision ResNet state
dict, or detectron2's ResNet weights (the layout facebookresearch/moco's `detection/convert-pretrain-to-detectron2.py`
writes)."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import torch
from huggingface_hub import create_repo, upload_folder
from timm.models import save_for_hf
from torch import nn

from .modeling_moco import MocoForImageClassification, MocoModel


def timm_reference(name_or_path: str | Path) -> str:
    """How `timm.create_model` names an encoder saved in timm's format: `local-dir:` for a folder, `hf-hub:` for a
    Hub repo."""
    return f"{'local-dir' if Path(name_or_path).is_dir() else 'hf-hub'}:{name_or_path}"


def timm_network(model: MocoModel | MocoForImageClassification) -> tuple[nn.Module, dict]:
    """The timm network an export saves, and the model config fields timm records with it: a MocoModel's query
    backbone (no classifier), or a classifier's backbone with its linear layer as timm's own head (`num_classes`,
    `label_names`), so that timm computes the same logits."""
    # timm builds the first layer from `in_chans` (model_args), not from pretrained_cfg's input size
    channels = {} if model.config.num_channels == 3 else {"in_chans": model.config.num_channels}
    if not isinstance(model, MocoForImageClassification):
        return model.base_model, channels
    network = copy.deepcopy(model.base_model)
    network.reset_classifier(model.num_labels)
    if model.num_labels:
        network.get_classifier().load_state_dict(model.classifier.state_dict())
    return network, {"label_names": model.label_names, **channels}


def export_encoder(
    model: MocoModel | MocoForImageClassification, save_directory: str | Path, repo_id: str | None = None,
    **upload_kwargs
) -> Path:  # fmt: skip
    """Save the query backbone alone in timm's Hub format, loadable without `moco_hf` (a classifier: with its head).

    The folder holds `config.json` (`architecture`, `num_features`, `pretrained_cfg` with input size, mean and
    std) and `model.safetensors` (the bare timm state dict), so that `timm.create_model("hf-hub:<repo>",
    pretrained=True)`, `AutoModel.from_pretrained` (a `TimmWrapperModel`) and the `image-feature-extraction`
    pipeline all load it. With `repo_id`, the folder is also uploaded to that Hub repo
    (`upload_kwargs` go to `huggingface_hub.upload_folder`, e.g. `token`).
    """
    if model.config.cifar_stem:
        raise ValueError(
            f"this encoder has a CIFAR stem (3x3/1 conv1, no max-pool), which timm's {model.config.backbone!r} "
            "cannot express, so an export would load as a different network; share the full model instead "
            "(`save_pretrained`/`push_to_hub`: AutoModel and the image-feature-extraction pipeline load it, with "
            "trust_remote_code=True where moco_hf is not installed)."
        )
    save_directory = Path(save_directory)
    size = model.config.image_size
    data_config = {
        "input_size": (model.config.num_channels, size, size),
        "mean": tuple(model.config.image_mean),
        "std": tuple(model.config.image_std),
        "crop_pct": 1.0 if size <= 64 else 0.875,
        "interpolation": "bicubic",
    }
    network, model_config = timm_network(model)
    save_for_hf(network, save_directory, model_config=model_config, safe_serialization=True, data_config=data_config)
    config_path = save_directory / "config.json"
    config = json.loads(config_path.read_text())
    # num_classes is a root field already; repeated in model_args it breaks AutoModel ("multiple values").
    config.get("model_args", {}).pop("num_classes", None)
    for inherited in ("tag", "hf_hub_id", "url", "file", "origin_url", "paper_ids", "license", "notes"):
        config["pretrained_cfg"].pop(inherited, None)  # describe timm's weights for this name, not these
    config_path.write_text(json.dumps(config, indent=2))
    if repo_id is not None:
        create_repo(
            repo_id, exist_ok=True, token=upload_kwargs.get("token"), private=upload_kwargs.pop("private", None)
        )
        upload_folder(repo_id=repo_id, folder_path=save_directory, **upload_kwargs)
    return save_directory


# timm's ResNets that are torchvision's architectures, with torchvision's state-dict keys (`conv1`, `layer1.0.bn1`...).
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                       "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")  # fmt: skip


def torchvision_resnet_state_dict(model: MocoModel | MocoForImageClassification) -> dict[str, torch.Tensor]:
    """The query backbone as the state dict of `torchvision.models.<arch>()` without its `fc` (strict load into a
    model whose `fc` is `nn.Identity()`, or into `torchvision.models.detection`'s ResNet body)."""
    config = model.config
    arch = config.backbone.split(".")[0]  # timm's pretrained tag ("resnet50.a1_in1k") does not change the network
    if arch not in TORCHVISION_RESNETS or config.backbone_kwargs:
        raise ValueError(
            f"only timm ResNets that torchvision also defines export to torchvision or detectron2 "
            f"({', '.join(TORCHVISION_RESNETS)}, without backbone_kwargs); this model's backbone is "
            f"{config.backbone!r}" + (f" with {config.backbone_kwargs}" if config.backbone_kwargs else "") + "."
        )
    if config.cifar_stem:
        raise ValueError(
            "this encoder has a CIFAR stem (3x3/1 conv1, no max-pool), which torchvision's and detectron2's "
            "ResNets cannot express; share the full model (save_pretrained) or use MocoBackbone in transformers."
        )
    return {key: value.detach().clone() for key, value in model.base_model.state_dict().items()}


def detectron2_name(key: str) -> str:
    """A torchvision ResNet key in detectron2's naming, as the official converter renames it
    (`layer1.0.bn1.weight` -> `res2.0.conv1.norm.weight`, `conv1.weight` -> `stem.conv1.weight`)."""
    if "layer" not in key:
        key = "stem." + key
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for index in (1, 2, 3):
        key = key.replace(f"bn{index}", f"conv{index}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def export_torchvision(model: MocoModel | MocoForImageClassification, path: str | Path) -> Path:
    """`torch.save` of `torchvision_resnet_state_dict` (tensors only: loads with `torch.load(weights_only=True)`)."""
    path = Path(path)
    torch.save(torchvision_resnet_state_dict(model), path)
    return path


def export_detectron2(model: MocoModel | MocoForImageClassification, path: str | Path) -> Path:
    """A detectron2 weights file (`MODEL.WEIGHTS`): a pickle of `{"model": {name: numpy array}, "__author__",
    "matching_heuristics": True}` with detectron2's ResNet names, BatchNorm counters left out. As with the official
    converter, train with `MODEL.RESNETS.STRIDE_IN_1X1 False` (torchvision's stride in the 3x3) and
    `MODEL.PIXEL_MEAN`/`PIXEL_STD` of the RGB mean/std the encoder was trained with (`INPUT.FORMAT "RGB"`)."""
    path = Path(path)
    weights = {detectron2_name(key): value.numpy() for key, value in torchvision_resnet_state_dict(model).items()
               if not key.endswith("num_batches_tracked")}  # fmt: skip
    with path.open("wb") as file:
        pickle.dump({"model": weights, "__author__": "moco-hf", "matching_heuristics": True}, file)
    return path
