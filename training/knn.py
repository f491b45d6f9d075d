"""Weighted k-nearest-neighbour accuracy of frozen features (the official CIFAR demo's monitor: k=200, T=0.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F


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
