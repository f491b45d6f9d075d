"""Weighted k-nearest-neighbour accuracy of frozen features (the official CIFAR demo's monitor: k=200, T=0.1), and
`KnnMonitor`, which measures it during pretraining across processes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from tqdm.auto import tqdm

from .augmentation import evaluation_transform
from .data import (
    ImageReader,
    as_iterable,
    find_image_column,
    find_label_column,
    hold_out_rows,
    labelled_images,
    load_image_splits,
    shard_for_process,
    take_rows,
)
from .errors import DataError, UsageError
from .presets import KNN_FEATURES

logger = logging.getLogger(__name__)
HOLD_OUT_SEED = 0  # the kNN queries held out of a split are the same in every run and every evaluation
STREAMED_BANK_ROWS = 50_000  # a stream without a query split, bank cap None: the rows read to split bank and queries


def weighted_knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted class of each row of `features` (M, D) from its k nearest rows of `bank` (N, D).

    Both are L2-normalised, so similarity is cosine; each neighbour votes for its label with weight exp(sim / T)
    (Wu et al. 2018, as in the MoCo CIFAR demo). Processed in chunks of queries to bound memory.
    """
    k = min(k, bank.shape[0])
    predictions = []
    for chunk in features.split(chunk_size):
        similarity, index = (chunk @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def moco_features(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both representations of a MoCo query encoder, from one forward pass: `"backbone"`, the pooled features
    (N, num_features) that transfer downstream, and `"head"`, the projection head's output on them (N, dim), which
    the official CIFAR-10 demo's kNN monitor reads."""
    pooled = model.get_image_features(images).pooler_output
    return {"backbone": pooled, "head": model.encoder_q.head(pooled)}


@torch.no_grad()
def extract_feature_sets(
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    pairs: Iterable[tuple[object, int]],
    transform: Callable[[object], torch.Tensor],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """L2-normalised features (N, D) of each kind `encode` returns (name -> features of a batch) and labels (N,) of
    (image, label) pairs, encoded `batch_size` at a time."""
    features: dict[str, list[torch.Tensor]] = {}
    labels, images, batch_labels = [], [], []

    def flush() -> None:
        batch = torch.stack(images).to(device)
        for name, encoded in encode(batch).items():
            features.setdefault(name, []).append(F.normalize(encoded.float(), dim=1).cpu())
        labels.extend(batch_labels)
        images.clear()
        batch_labels.clear()

    for image, label in pairs:
        images.append(transform(image))
        batch_labels.append(label)
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    return {name: torch.cat(parts) for name, parts in features.items()}, torch.tensor(labels, dtype=torch.long)


def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    pairs: Iterable[tuple[object, int]],
    transform: Callable[[object], torch.Tensor],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) and labels (N,) of (image, label) pairs, `encode` giving one feature per image
    (`extract_feature_sets` for several)."""
    features, labels = extract_feature_sets(lambda images: {"features": encode(images)}, pairs, transform,
                                            batch_size, device)  # fmt: skip
    return features.get("features", torch.empty(0, 0)), labels


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (in %) of the weighted kNN classifier."""
    predictions = weighted_knn_predict(test_features, train_features, train_labels, num_classes, k, temperature)
    return 100.0 * (predictions == test_labels).float().mean().item()


@dataclass
class KnnSplits:
    """Where the monitor's labelled images come from: a bank split and a query split of one dataset. Without a
    query split, the queries are the first `max_query_samples` rows of the bank split, held out of the bank."""

    dataset_name: str
    bank_split: str = "train"
    query_split: str = "test"
    max_bank_samples: int | None = 10_000
    max_query_samples: int | None = 2_000
    image_column: str | None = None
    label_column: str | None = None
    config_name: str | None = None
    streaming: bool = False
    cache_dir: str | None = None


def load_knn_datasets(splits: KnnSplits) -> tuple[dict[str, Dataset | IterableDataset], str]:
    """The bank and query datasets, and the queries in `datasets`' split notation (e.g. `test[:2000]`)."""
    if splits.bank_split == splits.query_split:
        raise UsageError(
            f"the kNN bank and queries are both split {splits.bank_split!r}: every query would find itself. Choose "
            "another `eval_split`, or a dataset without one (the queries are then held out of the bank)."
        )
    available = load_image_splits(splits.dataset_name, splits.streaming, splits.config_name, splits.cache_dir)
    if splits.bank_split not in available:
        raise DataError(f"dataset {splits.dataset_name!r} has no split {splits.bank_split!r} for the kNN bank; "
                        f"its splits are {sorted(available.keys())}.")  # fmt: skip
    bank, limit = available[splits.bank_split], splits.max_query_samples
    if splits.query_split in available:
        queries = take_rows(available[splits.query_split], 0, limit)
        return {"bank": take_rows(bank, 0, splits.max_bank_samples), "queries": queries}, (
            splits.query_split + (f"[:{limit}]" if limit else "")
        )
    if not isinstance(bank, Dataset):  # a stream: its first rows, split into bank and queries as a dataset's are
        bank, splits = first_rows_of_stream(bank, splits)
    return hold_out_queries(bank, splits)


def first_rows_of_stream(stream: IterableDataset, splits: KnnSplits) -> tuple[Dataset, KnnSplits]:
    """The first rows of a streamed split, enough for the bank and the queries, as a dataset (images still encoded),
    and `splits` naming them (`train[:12000]`) when the stream may hold more."""
    count = (splits.max_bank_samples or STREAMED_BANK_ROWS) + (splits.max_query_samples or 0)
    encoded = stream.decode(False) if stream.features is not None else stream
    rows = Dataset.from_list(list(encoded.take(count)), features=stream.features)
    if len(rows) == count:
        splits = replace(splits, bank_split=f"{splits.bank_split}[:{count}]")
    return rows, splits


def hold_out_queries(bank: Dataset, splits: KnnSplits) -> tuple[dict[str, Dataset], str]:
    """Queries held out of a split without a query split: a seeded sample of at most a fifth of its rows (and
    `max_query_samples`), with each class in proportion (`train_test_split(stratify_by_column=...)`) when the labels
    are a `ClassLabel`: the first rows of a folder sorted by class would give queries with no class-mate in the
    bank, and a kNN accuracy of 0 that measures nothing."""
    held_out = min(splits.max_query_samples or len(bank) // 10, len(bank) // 5)
    label_column = find_label_column(bank, splits.label_column)
    rest, queries, stratified, description = hold_out_rows(
        bank, held_out, label_column, HOLD_OUT_SEED, splits.bank_split, splits.dataset_name, "kNN queries"
    )
    logger.warning(
        "Dataset %s has no split %r: the kNN queries are %d images of %r held out of the bank (a seeded sample%s).",
        splits.dataset_name, splits.query_split, held_out, splits.bank_split,
        ", each class in proportion" if stratified else "",
    )  # fmt: skip
    return {"bank": take_rows(rest, 0, splits.max_bank_samples), "queries": queries}, description


class KnnMonitor:
    """Weighted kNN accuracy of the query encoder on a labelled bank/query split, across processes, for each of
    `KNN_FEATURES` (one forward pass gives both); `feature` names the one reported as the run's kNN accuracy.

    Each process encodes its shard of both splits; the features are gathered, and every process computes the same
    accuracies. Call it with a `MocoModel` whenever a measurement is wanted. `query_description` names the images the
    accuracy is measured on (model cards and results record it).
    """

    def __init__(
        self,
        splits: KnnSplits,
        accelerator: Accelerator,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        k: int = 200,
        temperature: float = 0.1,
        batch_size: int = 256,
        feature: str = "backbone",
        num_channels: int = 3,
        band_layout: str = "auto",
    ) -> None:
        if feature not in KNN_FEATURES:
            raise UsageError(f"the kNN feature must be one of {KNN_FEATURES}, got {feature!r}.")
        self.accelerator, self.k, self.temperature, self.batch_size = accelerator, k, temperature, batch_size
        self.feature = feature
        self.transform = evaluation_transform(image_size, mean, std)
        self.dataset_name = splits.dataset_name
        self.splits, self.query_description = load_knn_datasets(splits)
        self.image_column = find_image_column(self.splits["bank"], splits.image_column)
        self.label_column = find_label_column(self.splits["bank"], splits.label_column)
        self.reader = ImageReader.for_column(self.splits["bank"], self.image_column, num_channels, band_layout)
        self.reader.check_band_count(self.splits["bank"], self.image_column)
        self.num_classes = getattr(self.splits["bank"].features[self.label_column], "num_classes", None)
        self._check_every_query_class_is_in_the_bank()
        bank = self.splits["bank"]
        self.k_used = min(k, len(bank)) if isinstance(bank, Dataset) else k  # a stream's, once it has been read

    def _check_every_query_class_is_in_the_bank(self) -> None:
        """A query whose class has no image in the bank can never be classified right: a protocol where that happens
        measures the split, not the encoder, so it is refused (streams are not read ahead to check)."""
        bank, queries = self.splits["bank"], self.splits["queries"]
        if not (isinstance(bank, Dataset) and isinstance(queries, Dataset)):
            return
        missing = set(queries[self.label_column]) - set(bank[self.label_column])
        if missing:
            raise DataError(
                f"kNN queries of {len(missing)} class(es) ({sorted(missing)[:5]}) have no image of their class in the "
                f"bank ({self.query_description} against {len(bank)} bank images): raise `knn_max_train_samples` or "
                "choose other splits."
            )

    def _features(self, model: torch.nn.Module, role: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        split = self.splits[role]
        dataset = shard_for_process(as_iterable(split, world), rank, world)
        share = -(-len(split) // world) if isinstance(split, Dataset) else None  # unknown for a stream
        pairs = labelled_images(dataset, self.image_column, self.label_column, limit=None, reader=self.reader)
        pairs = tqdm(pairs, total=share, desc=f"kNN {role}", unit="image", leave=False,
                     disable=not accelerator.is_local_main_process)  # fmt: skip

        def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
            with accelerator.autocast():
                return moco_features(model, images)

        features, labels = extract_feature_sets(encode, pairs, self.transform, self.batch_size, accelerator.device)
        gathered = gather_object([(features, labels)])
        if not any(f for f, _ in gathered):
            raise DataError(
                f"the kNN {role} of {self.dataset_name!r} hold no decodable image (column {self.image_column!r}); "
                "pass `knn_monitor` false to train without it."
            )
        merged = {name: torch.cat([f[name] for f, _ in gathered if f]) for name in KNN_FEATURES}
        return merged, torch.cat([lab for _, lab in gathered])

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """Top-1 accuracy in percent for each of `KNN_FEATURES`; the model is put in eval mode for the measurement
        and restored after."""
        was_training = model.training
        model.eval()
        bank, bank_labels = self._features(model, "bank")
        queries, query_labels = self._features(model, "queries")
        model.train(was_training)
        num_classes = self.num_classes or int(bank_labels.max()) + 1
        self.k_used = k = min(self.k, bank_labels.shape[0])
        temperature = self.temperature
        return {
            name: knn_accuracy(bank[name], bank_labels, queries[name], query_labels, num_classes, k, temperature)
            for name in KNN_FEATURES
        }


@dataclass
class KnnArguments:
    """The weighted kNN protocol of `moco-hf evaluate knn` (Wu et al. 2018; k=200, T=0.1 as in the MoCo CIFAR demo)."""

    knn_k: int = field(default=200, metadata={"help": "Neighbours that vote."})
    knn_temperature: float = field(default=0.1, metadata={"help": "Votes are weighted by exp(similarity / T)."})

    def __post_init__(self) -> None:
        if self.knn_k < 1:  # no neighbour votes: the "accuracy" would be argmax of zeros, class 0
            raise UsageError(f"`knn_k` must be at least 1, got {self.knn_k}.")
        if not self.knn_temperature > 0:
            raise UsageError(f"`knn_temperature` must be > 0, got {self.knn_temperature}.")


def knn_protocol(train: tuple[torch.Tensor, torch.Tensor], evaluation: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, args: KnnArguments, seed: int) -> dict[str, float]:  # fmt: skip
    """Weighted kNN top-1 of the evaluation features (N, F) and labels against the training ones (the bank)."""
    return {"knn_top1": knn_accuracy(*train, *evaluation, num_classes, args.knn_k, args.knn_temperature)}
