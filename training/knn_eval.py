#!/usr/bin/env python
"""Weighted kNN evaluation of a frozen encoder (Wu et al. 2018; k=200, T=0.1 as in the MoCo CIFAR demo).

python training/knn_eval.py --model_name_or_path outputs/cifar10-resnet18/model
python training/knn_eval.py --model_name_or_path outputs/cifar10-resnet18/model --random_init  # baseline
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from moco_hf.errors import UsageError
from moco_hf.evaluation import Split, evaluation_main
from moco_hf.knn import knn_accuracy


@dataclass
class KnnArguments:
    knn_k: int = field(default=200, metadata={"help": "Neighbours that vote."})
    knn_temperature: float = field(default=0.1, metadata={"help": "Votes are weighted by exp(similarity / T)."})

    def __post_init__(self) -> None:
        if self.knn_k < 1:  # no neighbour votes: the "accuracy" would be argmax of zeros, class 0
            raise UsageError(f"`knn_k` must be at least 1, got {self.knn_k}.")
        if not self.knn_temperature > 0:
            raise UsageError(f"`knn_temperature` must be > 0, got {self.knn_temperature}.")


def knn_protocol(train: Split, evaluation: Split, num_classes: int, args: KnnArguments, seed: int) -> dict[str, float]:
    accuracy = knn_accuracy(*train, *evaluation, num_classes, args.knn_k, args.knn_temperature)
    return {"knn_top1": accuracy}


def main(argv: list[str] | None = None) -> int:
    return evaluation_main(argv, KnnArguments, "knn", knn_protocol)


if __name__ == "__main__":
    sys.exit(main())
