"""Weighted k-nearest-neighbour accuracy of frozen features (the official CIFAR demo's monitor: k=200, T=0.1), and
`KnnMonitor`, which measures it during pretraining across processes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object

from .augmentation import evaluation_transform
from .data import (
    as_iterable,
    find_image_column,
    find_label_column,
    labelled_images,
    load_image_dataset,
    shard_for_process,
)


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


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    pairs: Iterable[tuple[object, int]],
    transform: Callable[[object], torch.Tensor],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, D) and labels (N,) of (image, label) pairs, encoded `batch_size` at a time."""
    features, labels, images, batch_labels = [], [], [], []

    def flush() -> None:
        batch = torch.stack(images).to(device)
        features.append(F.normalize(encode(batch).float(), dim=1).cpu())
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
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.tensor(labels, dtype=torch.long)


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
    """Where the monitor's labelled images come from: a bank split and a query split of one dataset."""

    dataset_name: str
    bank_split: str = "train"
    query_split: str = "test"
    max_bank_samples: int | None = 10_000
    max_query_samples: int | None = 2_000
    image_column: str | None = None
    label_column: str | None = None
    config_name: str | None = None
    streaming: bool = False

    @property
    def query_split_slice(self) -> str:
        """The queries in `datasets`' split notation, e.g. `test[:2000]` (the card records it)."""
        limit = self.max_query_samples
        return self.query_split + (f"[:{limit}]" if limit else "")


class KnnMonitor:
    """Weighted kNN accuracy of the query backbone's features on a labelled bank/query split, across processes.

    Each process encodes its shard of both splits; the features are gathered, and every process computes the same
    accuracy. Call it with the model (any module with `get_image_features`) whenever a measurement is wanted.
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
    ) -> None:
        self.accelerator, self.k, self.temperature = accelerator, k, temperature
        self.transform = evaluation_transform(image_size, mean, std)
        self.splits = {}
        for role, split, limit in (
            ("bank", splits.bank_split, splits.max_bank_samples),
            ("queries", splits.query_split, splits.max_query_samples),
        ):
            dataset = load_image_dataset(splits.dataset_name, split, splits.streaming, splits.config_name)
            self.image_column = find_image_column(dataset, splits.image_column)
            self.label_column = find_label_column(dataset, splits.label_column)
            if limit is not None:
                dataset = dataset.take(limit) if splits.streaming else dataset.select(range(min(limit, len(dataset))))
            self.splits[role] = dataset
        self.num_classes = getattr(self.splits["bank"].features[self.label_column], "num_classes", None)

    def _features(self, model: torch.nn.Module, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        dataset = shard_for_process(as_iterable(self.splits[role], world), rank, world)
        pairs = labelled_images(dataset, self.image_column, self.label_column, limit=None)

        def encode(images: torch.Tensor) -> torch.Tensor:
            with accelerator.autocast():
                return model.get_image_features(images).pooler_output

        features, labels = extract_features(encode, pairs, self.transform, device=accelerator.device)
        gathered = gather_object([(features, labels)])
        return torch.cat([f for f, _ in gathered if f.numel()]), torch.cat([lab for _, lab in gathered])

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        """Top-1 accuracy in percent; the model is put in eval mode for the measurement and restored after."""
        was_training = model.training
        model.eval()
        bank, bank_labels = self._features(model, "bank")
        queries, query_labels = self._features(model, "queries")
        model.train(was_training)
        num_classes = self.num_classes or int(bank_labels.max()) + 1
        return knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, self.k, self.temperature)
