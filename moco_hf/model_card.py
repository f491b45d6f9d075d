"""Model cards for MoCo models and exported encoders, rendered from the package's `templates/model_card.md`."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import cached_file

from .configuration_moco import MocoConfig

if TYPE_CHECKING:
    from .modeling_moco import MocoForImageClassification

TEMPLATE = files("moco_hf") / "templates" / "model_card.md"
CardKind = Literal["model", "encoder", "classifier"]


@dataclass
class EvaluationResult:
    """One accuracy measured on a labelled dataset, e.g. weighted kNN top-1 on CIFAR-10's test split."""

    name: str  # e.g. "kNN top-1 (k=200, T=0.1)"
    dataset: str
    split: str
    value: float  # percent
    baseline: float | None = None  # the same evaluation of the starting encoder, in percent
    baseline_encoder: str | None = None  # what that was, e.g. "random init (BatchNorm calibrated on 4096 images)"


@dataclass
class TrainingSummary:
    """What the trainer knows about a run, shown in the card."""

    dataset: str | None = None
    hyperparameters: dict[str, object] = field(default_factory=dict)
    results: list[EvaluationResult] = field(default_factory=list)
    training_time: str | None = None
    hardware: str | None = None
    skipped_images: int | None = None

    FILE = "training_summary.json"

    def save(self, folder: Path) -> None:
        """`training_summary.json`, which travels with the model (Hub uploads, exports): local dataset paths are
        reduced to their folder names, as in the card, so no directory of this machine is published."""
        shareable = replace(self, dataset=shareable_name(self.dataset),
                            results=[replace(r, dataset=shareable_name(r.dataset)) for r in self.results])  # fmt: skip
        (Path(folder) / self.FILE).write_text(json.dumps(asdict(shareable), indent=2, default=str))

    @classmethod
    def load(cls, name_or_path: str | Path) -> TrainingSummary | None:
        """The summary saved beside a model (local folder or Hub repo), None when there is none."""
        found = cached_file(str(name_or_path), cls.FILE, _raise_exceptions_for_missing_entries=False)
        if found is None:
            return None
        values = json.loads(Path(found).read_text())
        values["results"] = [EvaluationResult(**result) for result in values.get("results", [])]
        return cls(**values)


def moco_version(config: MocoConfig) -> str:
    """The paper whose method the config follows: v3 with a predictor, v2 with an MLP head, else v1."""
    if config.predictor:
        return "v3"
    return "v2" if config.mlp else "v1"


def describe_hardware(num_processes: int, device: torch.device) -> str:
    """E.g. '8 x NVIDIA H100 80GB HBM3' or '1 x CPU (x86_64, 2 cores)'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} ({platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{num_processes} x {name}"


def render_model_card(
    config: MocoConfig,
    repo_id: str,
    kind: CardKind = "model",
    summary: TrainingSummary | None = None,
    license: str = "apache-2.0",
    location: str | None = None,
    labels: list[str] | None = None,
    timm_format: bool = True,
) -> ModelCard:
    """The README.md of a pushed `MocoModel` (`kind="model"`), of its exported encoder (`kind="encoder"`), or of an
    exported `MocoForImageClassification` (`kind="classifier"`, with its `labels` in class order; `timm_format=False`:
    the classifier pushed as it is, in transformers' format).
    `location` is where the full model's snippets load it from (default `repo_id`; the local folder when the model
    was not pushed).

    Metadata: license, library (`transformers` for the full model, `timm` for the encoder), the
    `image-feature-extraction` pipeline, tags, datasets, and the evaluation results as `model-index`.
    """
    summary = summary or TrainingSummary()
    version = moco_version(config)
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name=result.name,
            # model-index's dataset type is a Hub id; a local folder is named by its folder name instead.
            dataset_type=result.dataset if _is_hub_dataset_id(result.dataset) else "custom",
            dataset_name=shareable_name(result.dataset),
            dataset_split=result.split,
            metric_type="accuracy",
            metric_name=result.name,
            metric_value=round(result.value, 2),
        )
        for result in summary.results
    ]
    task = "image-classification" if kind == "classifier" else "image-feature-extraction"
    card_data = ModelCardData(
        license=license,
        library_name="transformers" if kind == "model" or not timm_format else "timm",
        pipeline_tag=task,
        tags=["moco", "self-supervised", "timm", task, f"moco-{version}"],
        datasets=[summary.dataset] if _is_hub_dataset_id(summary.dataset) else None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    hyperparameters = {
        "backbone": config.backbone,
        "MoCo version": version,
        "embedding dim": config.dim,
        "queue size K": config.queue_size,
        "key encoder momentum m": config.momentum,
        "temperature T (`softmax_temperature`)": config.softmax_temperature,
        "projection head": "MLP" if config.mlp else "linear",
        "stem": "CIFAR (3x3/1 conv1, no max-pool)" if config.cifar_stem else "the backbone's own",
        "shuffling BN": config.shuffle_bn,
        "augmentation": config.augmentation,
        "image size": config.image_size,
        **summary.hyperparameters,
    }
    contents = (
        "the query encoder's backbone alone, in timm's format (`config.json` + `model.safetensors`)."
        if kind == "encoder"
        else "the backbone and its linear classifier, in timm's format (`config.json` + `model.safetensors`)."
        if kind == "classifier" and timm_format
        else "the backbone and its linear classifier as a `MocoForImageClassification` (safetensors), with its code "
        "for `trust_remote_code` loading and its image processor."
        if kind == "classifier"
        else "the full `MocoModel` (query encoder, momentum key encoder, queue of negative keys) as safetensors, "
        "with its code for `trust_remote_code` loading."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        location=location or repo_id,
        kind=kind,
        labels=labels or [],
        timm_format=timm_format,
        cifar_stem=config.cifar_stem,
        summary=f"A `{config.backbone}` image encoder pretrained with MoCo {version} (self-supervised).",
        moco_version=version,
        backbone=config.backbone,
        num_features=_num_features(config),
        image_size=config.image_size,
        num_channels=config.num_channels,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        contents=contents,
        results=[replace(result, dataset=shareable_name(result.dataset)) for result in summary.results],
        dataset=shareable_name(summary.dataset),
        skipped_images=summary.skipped_images,
        training_time=summary.training_time,
        hardware=summary.hardware,
        hyperparameters=hyperparameters,
    )


def classifier_card(
    model: MocoForImageClassification,
    repo_id: str,
    eval_metrics: dict[str, float] | None,
    eval_dataset: str | None,
    eval_split: str,
    tags: list[str] | None = None,
) -> ModelCard:
    """The card of a `MocoForImageClassification` pushed as it is (transformers' format): task, labels, and the top-1
    accuracy of `eval_metrics` (`eval_accuracy` or `accuracy`, a fraction, as `Trainer.evaluate()` and `evaluate`'s
    accuracy give it) on `eval_split` of `eval_dataset`."""
    metrics = eval_metrics or {}
    accuracy = metrics.get("eval_accuracy", metrics.get("accuracy"))
    if metrics and accuracy is None:
        raise ValueError(f"eval_metrics has no `eval_accuracy` or `accuracy` (keys: {sorted(metrics)}).")
    if accuracy is not None and not eval_dataset:
        raise ValueError("eval_metrics needs eval_dataset: the card names the data the accuracy was measured on.")
    results = [] if accuracy is None else [EvaluationResult("top-1 accuracy", eval_dataset, eval_split, 100 * accuracy)]
    card = render_model_card(model.config, repo_id, kind="classifier", summary=TrainingSummary(results=results),
                             labels=model.label_names, timm_format=False)  # fmt: skip
    card.data.tags = [*card.data.tags, *(tags or [])]
    return card


def shareable_name(name: str | None) -> str | None:
    """A Hub id (dataset or model) as it is; a local path as its folder (or file) name, without this machine's
    directories."""
    return name if name is None or _is_hub_dataset_id(name) else Path(name).name


def _is_hub_dataset_id(name: str | None) -> bool:
    """'owner/name' that is not a local folder: the card's `datasets` metadata links to it."""
    return bool(name) and name.count("/") == 1 and not Path(name).exists()


def _num_features(config: MocoConfig) -> int:
    import timm

    with torch.device("meta"):
        return timm.create_model(
            config.backbone, pretrained=False, num_classes=0, **config.backbone_kwargs
        ).num_features
