"""Frozen encoder features of a labelled `datasets` split, extracted once and cached as safetensors.

The library side of `moco-hf evaluate knn|linear` (`moco_hf.evaluation_command`). The encoder is either a `MocoModel`
(its query backbone) or an encoder exported in timm's format (`moco-hf export`), from a local folder or the Hub;
`random_init` gives the same architecture with fresh weights, the baseline a pretraining must beat, with its BatchNorm
statistics calibrated on training images first (`moco_hf.batch_norm_calibration`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import timm
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .augmentation import build_two_crops, evaluation_transform
from .batch_norm_calibration import BATCH_NORM_CALIBRATION_IMAGES, calibrate_batch_norm, describe_random_baseline
from .batched_augmentation import PerImageTwoCrops
from .configuration_moco import MocoConfig
from .data import (
    ImageReader,
    default_dataset_name,
    find_image_column,
    find_label_column,
    hold_out_rows,
    labelled_images,
    load_image_splits,
    sample_seed,
    select_split,
    split_base_name,
)
from .errors import DataError, UsageError
from .export import timm_reference
from .knn import HOLD_OUT_SEED, KNN_FEATURES, extract_feature_sets, moco_features
from .model_sources import MOCO, TIMM_ENCODER, identify_model
from .modeling_moco import MocoModel
from .presets import BAND_LAYOUTS

logger = logging.getLogger("moco_hf.evaluation")
MAX_CLASS_ID = 1_000_000  # a larger id is a mistake, not a class: the linear probe has an output per id


@dataclass
class FeatureArguments:
    model_name_or_path: str = field(metadata={"help": "A MocoModel or an exported timm encoder: folder or Hub id."})
    random_init: bool = field(default=False, metadata={"help": "Same architecture, random weights (baseline)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Labelled dataset (default: CIFAR-10)."})
    dataset_config_name: str | None = field(default=None)
    train_split: str = field(default="train", metadata={"help": "Slices allowed, e.g. train[:5000]."})
    eval_split: str = field(
        default="test",
        metadata={"help": "Without this split (or when it is train_split), a seeded, class-balanced part of the "
                  "training rows is held out (at most a fifth, and max_eval_samples)."},
    )  # fmt: skip
    image_column: str | None = field(default=None, metadata={"help": "Auto-detected when unique."})
    label_column: str | None = field(default=None, metadata={"help": "Auto-detected when unique."})
    band_layout: str = field(
        default="auto",
        metadata={"help": "Axis order of images held as arrays (auto: the axis of the model's band count).",
                  "choices": BAND_LAYOUTS},
    )  # fmt: skip
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    batch_size: int = field(default=256, metadata={"help": "Images per forward pass."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Results and the feature cache."})
    seed: int = field(default=0, metadata={"help": "Seed of the random initialisation."})
    feature: str = field(
        default="backbone",
        metadata={"help": "backbone: the pooled features that transfer; head: the projection head's output (a "
                  "MocoModel's only; the official CIFAR demo's kNN).", "choices": KNN_FEATURES},
    )  # fmt: skip


@dataclass
class Encoder:
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # (N, 3, H, W) images -> {feature: (N, F)}
    image_size: int
    mean: list[float]
    std: list[float]
    description: str
    module: torch.nn.Module  # what holds the weights (and BatchNorm statistics) that `encode` uses
    augmentation: str  # the two-crop recipe it was (or would be) pretrained with
    num_channels: int = 3  # input bands


def load_encoder(name_or_path: str, random_init: bool = False, seed: int = 0) -> Encoder:
    """The frozen feature extractor stored at `name_or_path` and the preprocessing it expects."""
    source = identify_model(name_or_path, accept=(MOCO, TIMM_ENCODER))
    torch.manual_seed(seed)
    if source.kind == MOCO:
        model = MocoModel(MocoConfig.from_dict(source.config)) if random_init else \
            MocoModel.from_pretrained(name_or_path)  # fmt: skip
        model.eval()
        settings = model.config
        return Encoder(
            lambda images: moco_features(model, images),
            settings.image_size, list(settings.image_mean), list(settings.image_std),
            f"{settings.backbone} ({'random init' if random_init else name_or_path})", model.encoder_q,
            settings.augmentation, settings.num_channels,
        )  # fmt: skip
    model = timm.create_model(timm_reference(name_or_path), pretrained=not random_init, num_classes=0).eval()
    data = timm.data.resolve_data_config({}, model=model)
    return Encoder(
        lambda images: {"backbone": model(images)}, data["input_size"][-1], list(data["mean"]), list(data["std"]),
        f"{source.config['architecture']} ({'random init' if random_init else name_or_path})", model,
        "v2" if data["input_size"][0] == 3 else "multiband", data["input_size"][0],
    )  # fmt: skip


def calibrate_random_encoder(args: FeatureArguments, encoder: Encoder, dataset: Dataset) -> Encoder:
    """`encoder` with its BatchNorm statistics calibrated on `BATCH_NORM_CALIBRATION_IMAGES` training images (a
    seeded sample of `dataset`, augmented as its recipe's query view), and a description that says so."""
    rows = dataset.shuffle(seed=args.seed).select(range(min(len(dataset), BATCH_NORM_CALIBRATION_IMAGES)))
    image_column = find_image_column(rows, args.image_column)
    reader = ImageReader.for_column(rows, image_column, encoder.num_channels, args.band_layout)
    recipe = (encoder.augmentation, encoder.image_size, encoder.mean, encoder.std)
    two_crops = PerImageTwoCrops(*recipe) if reader.bands else build_two_crops(*recipe)

    def view(image: object, index: int) -> torch.Tensor:
        if reader.bands:  # the batched operations, one image at a time: any band count
            return two_crops.query_view(image, sample_seed(args.seed, index))
        return two_crops.transform(image)

    pairs = labelled_images(rows, image_column, find_label_column(rows, args.label_column), None, reader)
    torch.manual_seed(args.seed)  # torchvision's random views draw from the global generator

    def batches() -> Iterator[torch.Tensor]:
        images = []
        for index, (image, _) in enumerate(pairs):
            images.append(view(image, index))
            if len(images) == args.batch_size:
                yield torch.stack(images)
                images = []
        if len(images) > 1:  # BatchNorm cannot take a batch of one in train mode
            yield torch.stack(images)

    used = calibrate_batch_norm(encoder.module, batches())
    description = encoder.description.replace("(random init)", f"({describe_random_baseline(used)})")
    return replace(encoder, description=description)


@dataclass
class EvaluationRows:
    """The labelled rows of one side of an evaluation, and how results name them (e.g. "test", "train[:48]",
    "train, 40 held out (seed 0)")."""

    dataset: Dataset
    description: str


def evaluation_rows(args: FeatureArguments) -> tuple[EvaluationRows, EvaluationRows]:
    """The training rows (`train_split`, slices allowed) and the evaluation rows: `eval_split` when the dataset has
    it and it is another split; otherwise a seeded part of the training rows held out of them (each class in
    proportion when the labels are a `ClassLabel`: at most a fifth, and `max_eval_samples`), as the trainer's kNN
    monitor holds out its queries. Their labels are checked first (`check_labels`)."""
    name = args.dataset_name or default_dataset_name()
    splits = load_image_splits(name, streaming=False, config_name=args.dataset_config_name)
    train = select_split(splits, args.train_split, name)
    label_column = find_label_column(train, args.label_column)
    if args.eval_split != args.train_split and split_base_name(args.eval_split) in splits:
        rows = (
            EvaluationRows(train, args.train_split),
            EvaluationRows(select_split(splits, args.eval_split, name), args.eval_split),
        )
        check_labels(rows, label_column, name)
        return rows
    check_labels((EvaluationRows(train, args.train_split),), label_column, name)
    count = min(args.max_eval_samples or len(train) // 5, len(train) // 5)
    rest, held_out, stratified, description = hold_out_rows(
        train, count, label_column, HOLD_OUT_SEED, args.train_split, name, "evaluation images"
    )
    logger.warning(
        "%s: evaluating on %d images of %r held out of the training images (a seeded sample%s); the classifier "
        "sees the other %d.", f"Dataset {name} has no split {args.eval_split!r}" if args.eval_split != args.train_split
        else "The evaluation split is the training split", count, args.train_split,
        ", each class in proportion" if stratified else "", len(rest),
    )  # fmt: skip
    return EvaluationRows(rest, f"{args.train_split} less the held-out images"), EvaluationRows(held_out, description)


def check_labels(sides: tuple[EvaluationRows, ...], label_column: str, dataset_name: str) -> None:
    """Labels must be class ids, integers from 0 to MAX_CLASS_ID - 1 (the classifier has one output per id), and
    the training rows (the first side) must hold at least two classes, or every accuracy would be 100%."""
    labels_of_each = [side.dataset[label_column] for side in sides]  # one read of each column
    for side, labels in zip(sides, labels_of_each, strict=True):
        bad = next((label for label in labels if not is_class_id(label)), None) if labels else "no label at all"
        if bad is not None:
            raise DataError(
                f"{side.description!r} of {dataset_name}: label {bad!r} of column {label_column!r} is not a class id "
                f"(an integer from 0 to {MAX_CLASS_ID - 1:,}); give a ClassLabel column, e.g. with "
                "`Dataset.class_encode_column`, or pass `label_column` NAME."
            )
    classes = len(set(labels_of_each[0]))
    if classes < 2:
        raise DataError(f"{sides[0].description!r} of {dataset_name} holds a single class (column {label_column!r}): "
                        "an evaluation needs at least two.")  # fmt: skip
    logger.info("Evaluating with %d classes in %r (column %r).", classes, sides[0].description, label_column)


def is_class_id(label: object) -> bool:
    return isinstance(label, int) and not isinstance(label, bool) and 0 <= label < MAX_CLASS_ID


def split_features(
    args: FeatureArguments, encoder: Encoder, rows: EvaluationRows, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, F) and labels (N,) of the first `limit` decodable `rows`, from the cache when
    these settings made it."""
    # Everything that changes these features, and nothing else (the other side may change freely).
    key = {
        "rows": rows.dataset._fingerprint,  # `datasets`' hash of the data files and of every select/split made
        "limit": limit,
        "model_files": _fingerprint(args.model_name_or_path),
        "batch_norm_calibration_images": BATCH_NORM_CALIBRATION_IMAGES if args.random_init else 0,
    }
    key |= {name: getattr(args, name) for name in ("model_name_or_path", "random_init", "seed", "image_column",
                                                   "label_column", "feature", "band_layout")}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(args.output_dir) / "features" / f"{split_base_name(rows.description)}-{digest}.safetensors"
    if cache.is_file():
        cached = load_file(cache)
        return cached["features"], cached["labels"]

    dataset = rows.dataset
    image_column = find_image_column(dataset, args.image_column)
    label_column = find_label_column(dataset, args.label_column)
    transform = evaluation_transform(encoder.image_size, encoder.mean, encoder.std)
    reader = ImageReader.for_column(dataset, image_column, encoder.num_channels, args.band_layout)
    reader.check_band_count(dataset, image_column, trained=True)
    pairs = tqdm(labelled_images(dataset, image_column, label_column, limit, reader),
                 total=min(len(dataset), limit or len(dataset)), desc=f"features of {rows.description!r}",
                 unit="image", leave=False)  # fmt: skip
    with torch.inference_mode():
        feature_sets, labels = extract_feature_sets(encoder.encode, pairs, transform, batch_size=args.batch_size)
    if not feature_sets:
        raise DataError(f"{rows.description!r} of {args.dataset_name or default_dataset_name()} has no decodable "
                        "images.")  # fmt: skip
    if args.feature not in feature_sets:
        raise UsageError(f"{encoder.description} has no {args.feature!r} features (only {sorted(feature_sets)}): an "
                         "exported encoder keeps the backbone alone.")  # fmt: skip
    features = feature_sets[args.feature]
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous(), "labels": labels}, cache)
    logger.info("Extracted %d features of split %r with %s.", features.shape[0], rows.description,
                encoder.description)  # fmt: skip
    return features, labels


def _fingerprint(name_or_path: str) -> list:
    """Sizes and modification times of a local model's files, so a retrained model is never served old features."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return [name_or_path]
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


def prepare_output_dir(output: Path) -> Path:
    """`output_dir`, created; a path that cannot be a folder is a `UsageError`."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"`output_dir` {str(output)!r} cannot be a folder: {error.strerror or error}.") from error
    return output


Split = tuple[torch.Tensor, torch.Tensor]  # L2-normalised features (N, F) and labels (N,)
