"""The command line of pretraining (`moco-hf train`, `training/pretrain.py`, `python -m moco_hf.pretraining`): flags
or a YAML/JSON file in, exit status and one-line errors in terms of flags out."""

from __future__ import annotations

import shlex
import sys
from dataclasses import fields
from pathlib import Path

from ..command_line import CommandLineParser, as_flags
from ..errors import RunError, TrainingStopped, UsageError
from .arguments import MocoTrainingArguments, without_secrets
from .trainer import train

PUSH_FAILED = 3  # trained and saved locally; the Hub push did not happen
ARGUMENT_NAMES = frozenset(argument.name for argument in fields(MocoTrainingArguments))


def parse_arguments(argv: list[str]) -> MocoTrainingArguments:
    """From the command line (no abbreviations: a typo must not pick another flag) or one YAML/JSON file."""
    return CommandLineParser(MocoTrainingArguments).parse(argv)[0]


def main(argv: list[str] | None = None) -> int:
    """The command: parse `argv` (default `sys.argv[1:]`), train, and return the exit status: 0, 1 for a run that
    cannot go on, 2 for a usage or data error (one line on stderr each), 3 when the run finished but its model did
    not reach the Hub (`--push_to_hub`; the last line says what to upload), 128 + signal when stopped by one."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        results = train(parse_arguments(argv), command=shlex.join(without_secrets([Path(sys.argv[0]).name, *argv])))
    except UsageError as error:
        print(f"error: {as_flags(str(error), ARGUMENT_NAMES)}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"error: {as_flags(str(error), ARGUMENT_NAMES)}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        return 128 + stopped.signal_number
    return PUSH_FAILED if results.get("pushed_to_hub") is False else 0
