#!/usr/bin/env python
"""Linear evaluation of a frozen encoder (the protocol of the official `main_lincls.py`, adapted for speed).

The backbone is frozen, so its features are extracted once (centre crops, no augmentation) and cached; a linear
classifier is then trained on them (`moco_hf.linear_probe`). Top-1/top-5 accuracy through `evaluate`.

    python training/linear_eval.py --model_name_or_path outputs/cifar10-resnet18/model
    python training/linear_eval.py --model_name_or_path outputs/cifar10-resnet18/model --random_init  # baseline
"""

from __future__ import annotations

import sys

from moco_hf.evaluation import Split, evaluation_main
from moco_hf.linear_probe import LinearArguments, top_k_accuracies, train_linear_classifier


def linear_protocol(
    train: Split, evaluation: Split, num_classes: int, args: LinearArguments, seed: int
) -> dict[str, float]:
    classifier = train_linear_classifier(*train, num_classes, args, seed)
    return {f"linear_{name}": value for name, value in top_k_accuracies(classifier, *evaluation).items()}


def main(argv: list[str] | None = None) -> int:
    return evaluation_main(argv, LinearArguments, "linear", linear_protocol)


if __name__ == "__main__":
    sys.exit(main())
