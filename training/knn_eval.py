#!/usr/bin/env python
"""Weighted kNN evaluation of a frozen encoder (Wu et al. 2018; k=200, T=0.1 as in the MoCo CIFAR demo).

python training/knn_eval.py --model_name_or_path outputs/cifar10-resnet18/model
python training/knn_eval.py --model_name_or_path outputs/cifar10-resnet18/model --random_init  # baseline
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python training/knn_eval.py` from a checkout

from training.data import DataError
from training.features import FeatureArguments, load_encoder, split_features
from training.knn import knn_accuracy


@dataclass
class KnnArguments:
    knn_k: int = field(default=200, metadata={"help": "Neighbours that vote."})
    knn_temperature: float = field(default=0.1, metadata={"help": "Votes are weighted by exp(similarity / T)."})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    feature_args, knn_args = HfArgumentParser((FeatureArguments, KnnArguments)).parse_args_into_dataclasses(argv)
    try:
        encoder = load_encoder(feature_args.model_name_or_path, feature_args.random_init, feature_args.seed)
        bank, bank_labels = split_features(feature_args, encoder, feature_args.train_split)
        queries, query_labels = split_features(feature_args, encoder, feature_args.eval_split)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    accuracy = knn_accuracy(
        bank, bank_labels, queries, query_labels, num_classes, knn_args.knn_k, knn_args.knn_temperature
    )
    results = {
        "encoder": encoder.description,
        "protocol": "weighted kNN",
        "knn_top1": accuracy,
        "train_samples": bank.shape[0],
        "eval_samples": queries.shape[0],
        "settings": {**asdict(feature_args), **asdict(knn_args)},
    }
    output = Path(feature_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "knn_results.json").write_text(json.dumps(results, indent=2))
    print(f"kNN top-1 (k={knn_args.knn_k}) {accuracy:.2f}% on {feature_args.eval_split} ({queries.shape[0]} images) "
          f"for {encoder.description}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
