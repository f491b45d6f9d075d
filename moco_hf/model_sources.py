"""What is at a `model_name_or_path`: one answer for every place that takes one (loading a MocoModel, warm-starting
a run, evaluating an encoder, exporting), and one message for each thing that is not what was asked for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
from transformers.utils import cached_file

from .configuration_moco import MocoConfig
from .errors import UsageError

MOCO, TIMM_ENCODER, TIMM_NAME = "MocoModel", "timm encoder", "timm model name"
DESCRIPTIONS = {MOCO: "a MocoModel", TIMM_ENCODER: "an exported timm encoder"}


@dataclass(frozen=True)
class ModelSource:
    """`kind`: MOCO (a saved MocoModel: config.json with model_type "moco"), TIMM_ENCODER (timm's Hub format:
    config.json with `architecture`, e.g. `moco-hf export`'s output) or TIMM_NAME (a name timm resolves itself,
    e.g. "resnet50.a1_in1k" or "hf-hub:timm/..."). `config`: the config.json read, None for a timm name."""

    name_or_path: str
    kind: str
    config: dict | None


def identify_model(name_or_path: str | Path, accept: tuple[str, ...] = (MOCO, TIMM_ENCODER, TIMM_NAME)) -> ModelSource:
    """What `name_or_path` (a local folder, a Hub repo id or a timm name) holds; `UsageError` naming what it is when
    that is not among `accept` (a training checkpoint, another model type, a folder without config.json...)."""
    name = str(name_or_path)
    folder = Path(name)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise UsageError(_no_config(folder, accept))
    elif TIMM_NAME in accept and (name.startswith("hf-hub:") or timm.is_model(name)):
        return ModelSource(name, TIMM_NAME, None)
    else:
        config_file = _download_config(name)
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{name}'s config.json cannot be read: {error}.") from error
    kind = MOCO if config.get("model_type") == MocoConfig.model_type else TIMM_ENCODER if "architecture" in config \
        else None  # fmt: skip
    if kind not in accept:
        model_type = config.get("model_type")
        what = f"a {model_type!r} model" if model_type else DESCRIPTIONS.get(kind, "a config.json of no known kind")
        raise UsageError(f"{name} holds {what}, not {_wanted(accept)} (config.json with model_type 'moco'"
                         + (" or 'architecture'" if TIMM_ENCODER in accept else "") + ").")  # fmt: skip
    return ModelSource(name, kind, config)


def _wanted(accept: tuple[str, ...]) -> str:
    return " or ".join(DESCRIPTIONS[kind] for kind in accept if kind in DESCRIPTIONS)


def _no_config(folder: Path, accept: tuple[str, ...]) -> str:
    if (folder / "trainer_state.json").is_file():  # Accelerate state; a transformers Trainer checkpoint has both
        return (f"{folder} is a training checkpoint (Accelerate state, no config.json): load the model folder its run "
                "saved, or resume training from the checkpoint to save one.")  # fmt: skip
    if (folder / "model" / "config.json").is_file() and (folder / "run_config.json").is_file():
        return f"{folder} is a training run's folder: its model is {folder / 'model'}."
    found = sorted(path.name for path in folder.iterdir())[:5]
    return f"{folder} has no config.json, so it is not {_wanted(accept)} (save_pretrained); it holds {found}."


def _download_config(name: str) -> str:
    try:
        return cached_file(name, "config.json")
    except (OSError, ValueError) as error:  # huggingface_hub's errors for a missing repo or no network
        raise UsageError(f"{name!r} is neither a local folder nor a Hub model whose config.json can be downloaded "
                         f"({type(error).__name__}).") from error  # fmt: skip
