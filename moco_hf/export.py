"""Export a MocoModel's query backbone in timm's Hub format, loadable without `moco_hf`."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import create_repo, upload_folder
from timm.models import save_for_hf

from .modeling_moco import MocoModel


def timm_reference(name_or_path: str | Path) -> str:
    """How `timm.create_model` names an encoder saved in timm's format: `local-dir:` for a folder, `hf-hub:` for a
    Hub repo."""
    return f"{'local-dir' if Path(name_or_path).is_dir() else 'hf-hub'}:{name_or_path}"


def export_encoder(model: MocoModel, save_directory: str | Path, repo_id: str | None = None, **upload_kwargs) -> Path:
    """Save the query backbone alone in timm's Hub format, loadable without `moco_hf`.

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
        "input_size": (model.config.backbone_kwargs.get("in_chans", 3), size, size),
        "mean": tuple(model.config.image_mean),
        "std": tuple(model.config.image_std),
        "crop_pct": 1.0 if size <= 64 else 0.875,
        "interpolation": "bicubic",
    }
    save_for_hf(model.encoder_q.backbone, save_directory, safe_serialization=True, data_config=data_config)
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
