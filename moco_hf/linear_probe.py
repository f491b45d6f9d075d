"""A linear probe on frozen features (the protocol of the official `main_lincls.py`, adapted for speed).

Features are standardised with the training set's statistics (a BatchNorm without affine parameters, as in MAE's
linear probe), which makes one learning rate work across backbones; the classifier is trained with SGD (momentum
0.9, no weight decay, cosine schedule). Top-1/top-5 accuracy through `evaluate`, with the metric shipped in the
package (`moco_hf/metrics/top_k_accuracy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UsageError

TOP_K_ACCURACY = Path(__file__).resolve().parent / "metrics" / "top_k_accuracy"


@dataclass
class LinearArguments:
    epochs: int = field(default=100, metadata={"help": "Passes over the cached training features."})
    learning_rate: float = field(default=0.1, metadata={"help": "Peak SGD learning rate (cosine to 0)."})
    train_batch_size: int = field(default=256, metadata={"help": "Features per SGD step."})
    weight_decay: float = field(default=0.0, metadata={"help": "0, as in main_lincls.py."})

    def __post_init__(self) -> None:
        for name in ("epochs", "train_batch_size"):
            if getattr(self, name) < 1:  # no training would report an untrained classifier's accuracy
                raise UsageError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise UsageError(f"`learning_rate` must be > 0, got {self.learning_rate}.")


def train_linear_classifier(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, args: LinearArguments, seed: int = 0
) -> nn.Module:
    """Standardisation (train statistics, frozen) followed by a linear layer trained with SGD."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    linear = nn.Linear(features.shape[1], num_classes)
    nn.init.normal_(linear.weight, std=0.01)  # main_lincls.py's initialisation
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.SGD(
        linear.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay
    )
    steps_per_epoch = math.ceil(features.shape[0] / args.train_batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    standardised = (features - mean) / std
    for _ in tqdm(range(args.epochs), desc="linear classifier", leave=False):
        for batch in torch.randperm(features.shape[0], generator=generator).split(args.train_batch_size):
            loss = nn.functional.cross_entropy(linear(standardised[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return nn.Sequential(Standardise(mean, std), linear).eval()


class Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def top_k_accuracies(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """Top-k accuracies in percent, computed by the local `evaluate` metric."""
    metric = evaluate.load(str(TOP_K_ACCURACY))
    logits = classifier(features)
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices.tolist()
    return {
        f"top{k}": 100.0 * metric.compute(predictions=ranked, references=labels.tolist(), k=k)["top_k_accuracy"]
        for k in ks
        if k <= logits.shape[1]
    }


def linear_protocol(train: tuple[torch.Tensor, torch.Tensor], evaluation: tuple[torch.Tensor, torch.Tensor],
                    num_classes: int, args: LinearArguments, seed: int) -> dict[str, float]:  # fmt: skip
    """A linear classifier trained on the training features (N, F) and labels; its top-1/top-5 on the evaluation
    ones, in percent."""
    classifier = train_linear_classifier(*train, num_classes, args, seed)
    return {f"linear_{name}": value for name, value in top_k_accuracies(classifier, *evaluation).items()}
