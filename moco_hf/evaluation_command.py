"""`moco-hf evaluate knn|linear` (and `training/knn_eval.py`, `training/linear_eval.py`): a frozen encoder's features
of a labelled split, a protocol on them, one line of results and `<protocol>_results.json`; one-line errors in terms
of flags, exit status 2.

    moco-hf evaluate knn --model_name_or_path outputs/cifar10-resnet18/model
    moco-hf evaluate linear --model_name_or_path outputs/cifar10-resnet18/model --random_init  # the baseline
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .command_line import CommandLineParser, as_flags
from .errors import UsageError
from .evaluation import (
    FeatureArguments,
    Split,
    calibrate_random_encoder,
    evaluation_rows,
    load_encoder,
    prepare_output_dir,
    split_features,
)
from .knn import KnnArguments, knn_protocol
from .linear_probe import LinearArguments, linear_protocol

Protocol = Callable[[Split, Split, int, Any, int], dict[str, float]]
PROTOCOLS: dict[str, tuple[type, Protocol]] = {"knn": (KnnArguments, knn_protocol),
                                               "linear": (LinearArguments, linear_protocol)}  # fmt: skip


def evaluation_parser(protocol: str, program: str | None = None) -> CommandLineParser:
    return CommandLineParser((FeatureArguments, PROTOCOLS[protocol][0]), prog=program)


def main(argv: list[str] | None, protocol: str, program: str | None = None) -> int:
    """Parse the arguments, extract (or reuse) the features of both splits, run `protocol` ("knn" or "linear"),
    print and write `<protocol>_results.json`; the exit status."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    protocol_arguments, evaluate = PROTOCOLS[protocol]
    names = {argument.name for argument in (*fields(FeatureArguments), *fields(protocol_arguments))}
    try:
        args, protocol_args = evaluation_parser(protocol, program).parse(sys.argv[1:] if argv is None else argv)
        output = prepare_output_dir(Path(args.output_dir))
        train_rows, eval_rows = evaluation_rows(args)
        encoder = load_encoder(args.model_name_or_path, args.random_init, args.seed)
        if args.random_init:
            encoder = calibrate_random_encoder(args, encoder, train_rows.dataset)
        train = split_features(args, encoder, train_rows, args.max_train_samples)
        evaluation = split_features(args, encoder, eval_rows, args.max_eval_samples)
    except UsageError as error:
        print(f"error: {as_flags(str(error), names)}", file=sys.stderr)
        return 2
    num_classes = int(max(train[1].max(), evaluation[1].max())) + 1
    metrics = evaluate(train, evaluation, num_classes, protocol_args, args.seed)
    results = {
        "encoder": encoder.description,
        "protocol": protocol,
        "feature": args.feature,
        **metrics,
        "train_samples": train[0].shape[0],
        "eval_samples": evaluation[0].shape[0],
        "train_rows": train_rows.description,
        "eval_rows": eval_rows.description,
        "settings": {**asdict(args), **asdict(protocol_args)},
    }
    (output / f"{protocol}_results.json").write_text(json.dumps(results, indent=2))
    scores = ", ".join(f"{metric} {value:.2f}%" for metric, value in metrics.items())
    print(f"{scores} on {eval_rows.description} ({evaluation[0].shape[0]} images) for {encoder.description}")
    return 0
