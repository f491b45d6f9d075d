"""The arguments of a MoCo pretraining run: one flat dataclass, the command line's flags by field name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import UsageError, first_line
from ..presets import (
    AUGMENTATIONS,
    BAND_LAYOUTS,
    BATCH_NORM_CALIBRATION_IMAGES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNN_FEATURES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRESET_NAMES,
    PRESETS,
    SHUFFLE_BN_MODES,
    check_augmentation_channels,
)

if TYPE_CHECKING:
    from ..configuration_moco import MocoConfig

# A `bool | None` setting (None: the preset's) that `--name` alone turns on, as a plain bool flag does; `--name false`
# turns it off. (HfArgumentParser makes that so for bools with a default, not for a default of None.)
FLAG = {"nargs": "?", "const": True}
# A `MocoConfig` field of the same name, its one home: given, it overrides the preset's value (`build_config`).
CONFIG = {"config_field": True}


@dataclass
class ModelArguments:
    """The network and the MoCo algorithm (`MocoConfig` fields; None: the preset's)."""

    preset: Literal[PRESET_NAMES] = field(
        default="v2", metadata={"help": "Paper recipe (v3-vit: v3 for ViTs; v2-multiband: v2 for images not RGB)."}
    )
    backbone: str | None = field(default=None, metadata={**CONFIG, "help": "timm model name."})
    backbone_kwargs: str | None = field(default=None, metadata={"help": "JSON, e.g. '{\"img_size\": 32}'."})
    dim: int | None = field(default=None, metadata={**CONFIG, "help": "Embedding dimension."})
    queue_size: int | None = field(
        default=None, metadata={**CONFIG, "help": "K, negatives in the queue (0: the batch's own keys)."}
    )
    momentum: float | None = field(default=None, metadata={**CONFIG, "help": "Key encoder momentum m."})
    softmax_temperature: float | None = field(default=None, metadata={**CONFIG, "help": "Softmax temperature T."})
    mlp: bool | None = field(default=None, metadata={**CONFIG, "help": "MLP projection head.", **FLAG})
    shuffle_bn: Literal[SHUFFLE_BN_MODES] | None = field(
        default=None,
        metadata={**CONFIG, "help": "Shuffling BN: auto (ddp on several processes, else split), ddp, split, none."},
    )
    projector_layers: int | None = field(default=None, metadata={**CONFIG, "help": "Layers of the MLP head."})
    symmetric_loss: bool | None = field(
        default=None, metadata={**CONFIG, "help": "Both views as queries (v3's symmetric loss).", **FLAG}
    )
    freeze_patch_embed: bool | None = field(
        default=None, metadata={**CONFIG, "help": "v3 ViT trick: a random, frozen patch embedding.", **FLAG}
    )
    num_splits: int | None = field(default=None, metadata={**CONFIG, "help": "BatchNorm groups of --shuffle_bn split."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from these weights: a saved MocoModel (folder or Hub id), or a timm model with "
                  "pretrained weights (e.g. 'resnet50.a1_in1k', 'hf-hub:timm/...', an exported encoder folder) for "
                  "both backbones (domain-adaptive pretraining)."},
    )  # fmt: skip
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the Hub model's own code to load."})
    cifar_stem: bool | None = field(
        default=None,
        metadata={**CONFIG, "help": "ResNets on 32 px: 3x3/1 first conv, no max-pool.", **FLAG},
    )
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm in the query encoder (many processes)."})


@dataclass
class DataArguments:
    """The images to pretrain on, their preprocessing, and the kNN monitor's labelled splits."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub id or local path (default: CIFAR-10)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N images only."})
    train_split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected if unique)."})
    streaming: bool = field(default=False, metadata={"help": "Iterate without materialising the dataset."})
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Shuffle buffer of --streaming (otherwise every epoch is fully shuffled)."}
    )
    image_size: int | None = field(
        default=None,
        metadata={**CONFIG, "help": "Crop size (32 for CIFAR-size images)."},
    )
    num_channels: int | None = field(
        default=None,
        metadata={**CONFIG, "help": "Input bands (1 grey, 13 Sentinel-2); other than 3, images are read as float bands "
                  "at their own bit depth, and --image_mean/--image_std default to the training data's."},
    )  # fmt: skip
    band_layout: Literal[BAND_LAYOUTS] = field(
        default="auto",
        metadata={"help": "Axis order of images held as arrays: channels_first (C, H, W), channels_last (H, W, C), "
                  "or auto (the axis of --num_channels length)."},
    )  # fmt: skip
    image_mean: list[float] | None = field(default=None, metadata={**CONFIG, "help": "Per-channel mean."})  # fmt: skip
    image_std: list[float] | None = field(default=None, metadata={**CONFIG, "help": "Per-channel std."})  # fmt: skip
    augmentation: Literal[AUGMENTATIONS] | None = field(
        default=None,
        metadata={**CONFIG, "help": "Two-crop recipe."},
    )
    dataloader_num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process."})
    augment_on_device: bool = field(
        default=True,
        metadata={"help": "Crop, jitter, blur and flip whole batches on the training device (workers only decode and "
                  "draw parameters); false: each image in the workers (torchvision v2)."},
    )  # fmt: skip
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Labelled data for kNN (default: same)."})
    eval_train_split: str = field(default="train", metadata={"help": "kNN memory bank split."})
    eval_split: str = field(default="test", metadata={"help": "kNN query split."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (auto-detected)."})
    knn_max_train_samples: int | None = field(default=10_000, metadata={"help": "Bank size cap (None: all)."})
    knn_max_eval_samples: int | None = field(default=2_000, metadata={"help": "Query count cap (None: all)."})
    knn_k: int = field(default=200, metadata={"help": "Neighbours of the weighted kNN."})
    knn_temperature: float = field(default=0.1, metadata={"help": "Temperature of the kNN weights."})
    knn_feature: Literal[KNN_FEATURES] = field(
        default="backbone",
        metadata={"help": "The kNN accuracy reported: backbone (pooled features that transfer) or head (projection "
                  "output, the official CIFAR demo's). Both are recorded in knn_curve.json."},
    )  # fmt: skip


@dataclass
class TrainArguments:
    """Optimisation, schedule, precision, checkpoints, logging and the Hub."""

    output_dir: str = field(default="outputs/moco", metadata={"help": "Where checkpoints and the model go."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Images per process and micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimizer step. Each micro-batch still momentum-updates the key encoder and "
            "enqueues its keys; the learning rate scales with the effective batch."
        },
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Default: the preset's base lr x global batch / 256."}
    )
    lr_schedule: Literal[LR_SCHEDULES] | None = field(
        default=None, metadata={**CONFIG, "help": "Learning-rate schedule."}
    )
    optimizer: Literal[OPTIMIZERS] | None = field(default=None, metadata={**CONFIG, "help": "Optimizer."})
    weight_decay: float | None = field(default=None, metadata={**CONFIG, "help": "Weight decay."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm."})
    num_warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warmup steps."})
    warmup_ratio: float | None = field(default=None, metadata={"help": "Warmup as a fraction of all steps."})
    num_train_epochs: float = field(default=200, metadata={"help": "Passes over the data (fractions allowed)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Overrides num_train_epochs."})
    stop_after_epochs: float | None = field(
        default=None,
        metadata={"help": "Stop (evaluate and save) after this many epochs, leaving the schedules on "
                  "--num_train_epochs / --max_train_steps: the first epochs of a longer run; resume to go on."},
    )  # fmt: skip
    max_train_minutes: float | None = field(
        default=None, metadata={"help": "Wall-time budget: stop, evaluate and save once training has run this long."}
    )
    peer_timeout_seconds: int = field(
        default=90,
        metadata={"help": "Several processes: how long one waits for the others in a training step or a checkpoint "
                  "before all stop (a peer stopped, killed or hung); with the launcher's 30 s to end the rest, every "
                  "process is gone within 2 minutes. Loading before the first step keeps the 30-minute default (a "
                  "download on the main process)."},
    )  # fmt: skip
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        default=None, metadata={"help": "Default: the launcher's (accelerate config)."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds the model, the data order and every augmentation."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save every N steps (and at the end)."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output_dir that holds another run (its checkpoints, model and metrics "
                  "are removed first); without it, or --resume_from_checkpoint, such a folder is refused."},
    )  # fmt: skip
    with_tracking: bool = field(default=False, metadata={"help": "Log to trackers (--report_to, else tensorboard)."})
    report_to: str | None = field(
        default=None, metadata={"help": "tensorboard | wandb | all | ... (turns tracking on; 'none': off)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log metrics.jsonl and trackers every N steps."})
    eval_every: float | None = field(default=None, metadata={"help": "kNN every N epochs (always at the end)."})
    knn_monitor: bool = field(default=True, metadata={"help": "Measure kNN accuracy during and after training."})
    knn_at_start: bool = field(default=True, metadata={"help": "kNN of the initial (random) encoder first."})
    batch_norm_calibration_images: int = field(
        default=BATCH_NORM_CALIBRATION_IMAGES,
        metadata={"help": "Augmented training images whose train-mode passes calibrate the random initial encoder's "
                  "BatchNorm statistics before its kNN (a copy: training starts from the model as built)."},
    )  # fmt: skip
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per kNN forward pass."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile both backbones."})
    torch_compile_backend: str = field(
        default="inductor",
        metadata={"help": "The backend of --torch_compile (torch._dynamo.list_backends(); e.g. aot_eager, which "
                  "traces and runs without generating kernels), as transformers' TrainingArguments has it."},
    )  # fmt: skip
    channels_last: bool = field(default=False, metadata={"help": "NHWC memory format (faster convs on GPUs)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the model (and its card) to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id (default: the output dir's name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repo as private.", **FLAG})
    hub_revision: str | None = field(default=None, metadata={"help": "Push to this branch (default: main)."})
    create_pr: bool = field(default=False, metadata={"help": "Push as a pull request instead of a commit."})
    hub_wait_seconds: float = field(
        default=600, metadata={"help": "At the end, wait at most this long for uploads (they never hold training)."}
    )
    hub_strategy: Literal["end", "every_save"] = field(
        default="end", metadata={"help": "end: push the final model; every_save: also at each checkpoint."}
    )


@dataclass
class MocoTrainingArguments(TrainArguments, DataArguments, ModelArguments):
    """Every setting of a pretraining run; field `name` is the command line's `--name`. Model fields left at None
    take the preset's value (`MocoConfig.from_preset`), and the config saved with the model records the result."""

    def __post_init__(self) -> None:
        """Every check that needs no data and no model, run when the arguments are made (the command, `train` and
        the Python API alike): one `UsageError` naming the setting, before anything is opened or written."""
        for name, (least, reason) in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise UsageError(f"`{name}` must be at least {least}{reason}, got {value}.")
        for name in POSITIVE:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"`{name}` must be > 0, got {value}.")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise UsageError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}.")
        if self.create_pr and self.hub_revision:
            raise UsageError("`create_pr` opens a pull request against the default branch; drop `hub_revision`.")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise UsageError("`overwrite_output_dir` would delete the checkpoints `resume_from_checkpoint` resumes "
                             "from: pass one of them.")  # fmt: skip
        build_config(self)  # the model's settings: ranges, and presets against explicit fields
        missing = [name for name in (trackers(self) or "").split(",") if name not in ("", "all")
                   and not tracker_installed(name.strip())]  # fmt: skip
        if missing:
            raise UsageError(f"`report_to` names {', '.join(missing)}, which is not installed here: `pip install "
                             f"{' '.join(missing)}` (tensorboard also comes with `pip install 'moco-hf[tracking]'`), "
                             "or pass `report_to` none.")  # fmt: skip


# Lower bounds of the integer settings, with why where it is not obvious.
AT_LEAST: dict[str, tuple[int, str]] = {
    "per_device_train_batch_size": (2, ": BatchNorm cannot normalise one image"),
    "gradient_accumulation_steps": (1, ""), "max_train_steps": (1, ""), "max_train_samples": (1, ""),
    "num_warmup_steps": (0, ""), "checkpointing_steps": (1, ""), "checkpoints_total_limit": (1, ""),
    "logging_steps": (1, ""), "dataloader_num_workers": (0, ""), "shuffle_buffer_size": (1, ""),
    "knn_k": (1, ""), "knn_max_train_samples": (1, ""), "knn_max_eval_samples": (1, ""),
    "per_device_eval_batch_size": (1, ""), "hub_wait_seconds": (0, ""), "peer_timeout_seconds": (1, ""),
    "batch_norm_calibration_images": (1, " (the random encoder's kNN is measured with calibrated BatchNorm)"),
}  # fmt: skip
POSITIVE = ("learning_rate", "num_train_epochs", "stop_after_epochs", "max_train_minutes", "eval_every",
            "knn_temperature", "max_grad_norm")  # fmt: skip


# Never written to a file, a tracker or a log (as HF_TOKEN from the environment never is).
SECRET_ARGUMENTS = frozenset({"hub_token"})
HIDDEN = "<hidden>"


def recorded_settings(args: MocoTrainingArguments) -> dict[str, Any]:
    """The settings as run_config.json and the trackers record them: secrets hidden."""
    return {name: HIDDEN if name in SECRET_ARGUMENTS and value is not None else value
            for name, value in asdict(args).items()}  # fmt: skip


def without_secrets(words: list[str]) -> list[str]:
    """A command line with the value of each secret flag (`--hub_token t` or `--hub_token=t`) hidden."""
    shown = list(words)
    for index, word in enumerate(shown):
        flag, equals, _ = word.partition("=")
        if flag.removeprefix("--") in SECRET_ARGUMENTS and flag.startswith("--"):
            if equals:
                shown[index] = f"{flag}={HIDDEN}"
            elif index + 1 < len(shown):
                shown[index + 1] = HIDDEN
    return shown


def command_line(args: MocoTrainingArguments) -> list[str]:
    """`moco-hf train` with a flag for every setting that differs from its default: the run's command line
    (secrets hidden)."""
    words, settings = ["moco-hf", "train"], recorded_settings(args)
    for argument in fields(args):
        value, default = settings[argument.name], argument.default
        if argument.default_factory is not MISSING:
            default = argument.default_factory()
        if value != default:
            values = value if isinstance(value, (list, tuple)) else [value]
            words += [f"--{argument.name}", *map(str, values)]
    return words


# What the command uses where neither a flag nor the preset says (MocoConfig's own defaults are ResNet-50's).
COMMAND_DEFAULTS = {"backbone": "resnet18", "image_size": 224, "image_mean": list(IMAGENET_MEAN),
                    "image_std": list(IMAGENET_STD)}  # fmt: skip


def build_config(args: MocoTrainingArguments) -> MocoConfig:
    """The preset's recipe, with every field given on the command line taking precedence."""
    from ..configuration_moco import MocoConfig  # transformers and torch: after the checks that need neither

    overrides = {name: value for name, value in COMMAND_DEFAULTS.items() if name not in PRESETS[args.preset]}
    if args.num_channels not in (None, 3):  # RGB statistics do not apply: the given ones, else the data's, later
        overrides |= {"image_mean": [0.0] * args.num_channels, "image_std": [1.0] * args.num_channels}
    if args.backbone_kwargs is not None:
        try:
            overrides["backbone_kwargs"] = json.loads(args.backbone_kwargs)
        except json.JSONDecodeError as error:
            raise UsageError(f"`backbone_kwargs` is not valid JSON ({error.msg} at character {error.pos}): "
                             f"{args.backbone_kwargs!r}; e.g. '{{\"img_size\": 32}}'.") from error  # fmt: skip
    overrides |= {
        argument.name: getattr(args, argument.name)
        for argument in fields(args)
        if argument.metadata.get("config_field") and getattr(args, argument.name) is not None
    }
    try:
        config = MocoConfig.from_preset(args.preset, **overrides)
        check_augmentation_channels(config.augmentation, config.num_channels)
        return config
    except ValueError as error:  # the config names the field and what it accepts
        raise UsageError(first_line(error)) from error


def tracker_installed(name: str) -> bool:
    """Whether Accelerate can log to tracker `name` here (an unknown name is left to Accelerate to refuse)."""
    import accelerate.utils

    available = getattr(accelerate.utils, f"is_{name}_available", None)
    return available is None or bool(available())


def trackers(args: MocoTrainingArguments) -> str | None:
    """`--report_to` turns tracking on by itself (as in transformers); `--with_tracking` alone means tensorboard."""
    if args.report_to == "none":
        return None
    return args.report_to or ("tensorboard" if args.with_tracking else None)


def warmup_steps(args: MocoTrainingArguments, total_steps: int) -> int:
    if args.warmup_ratio is not None:  # in [0, 1): checked with the arguments
        return int(args.warmup_ratio * total_steps)
    return args.num_warmup_steps


@cache
def preset_configs() -> dict[str, MocoConfig]:
    """The config each preset builds when no flag overrides it: what its saved config.json holds."""
    return {name: build_config(MocoTrainingArguments(preset=name)) for name in PRESETS}


def preset_help_texts() -> dict[str, str]:
    """For each flag that a preset sets, its value in every preset, presets of equal value grouped ('Presets: v1/v2
    65536, v3/v3-vit 0, cifar10-demo 4096.'); for --learning_rate, the presets' base rates. Computed from the configs
    the presets build; `--help` reads the generated copy (`PRESET_HELP_FILE`), so that it needs no torch."""
    configs, texts = preset_configs(), {}
    for argument in fields(MocoTrainingArguments):
        name = "base_learning_rate" if argument.name == "learning_rate" else argument.name
        if not (argument.metadata.get("config_field") or argument.name == "learning_rate"):
            continue
        groups: dict[str, list[str]] = {}
        for preset, config in configs.items():
            groups.setdefault(help_value(getattr(config, name)), []).append(preset)
        label = "Base lr of the presets" if name == "base_learning_rate" else "Presets"
        texts[argument.name] = f"{label}: " + ", ".join(f"{'/'.join(p)} {value}" for value, p in groups.items()) + "."
    return texts


# `preset_help_texts()` as of the last `python scripts/docs_tables.py` (the suite checks that it is current).
PRESET_HELP_FILE = Path(__file__).with_name("preset_help.json")


@cache
def generated_preset_help() -> dict[str, str]:
    return json.loads(PRESET_HELP_FILE.read_text())


def preset_help(argument: dataclasses.Field) -> str | None:
    """`--help`'s note on a flag that the presets set (`preset_help_texts`); None for the others."""
    return generated_preset_help().get(argument.name)


def help_value(value: Any) -> str:
    """A setting as --help shows it: numbers in their shortest form, lists space-separated, JSON for dicts."""
    if isinstance(value, (list, tuple)):
        return " ".join(help_value(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
