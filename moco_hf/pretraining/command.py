"""The command line of pretraining (`moco-hf train`, `training/pretrain.py`, `python -m moco_hf.pretraining`): flags
or a YAML/JSON file in, exit status and one-line errors in terms of flags out."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from ..command_line import CommandLineParser, as_flags
from ..errors import RunError, TrainingStopped, UsageError
from .arguments import MocoTrainingArguments, preset_help, without_secrets

PUSH_FAILED = 3  # trained and saved locally; the Hub push did not happen
ARGUMENT_NAMES = frozenset(argument.name for argument in fields(MocoTrainingArguments))


def parse_arguments(argv: list[str]) -> MocoTrainingArguments:
    """From the command line (no abbreviations: a typo must not pick another flag) or one YAML/JSON file."""
    return CommandLineParser(MocoTrainingArguments, help_suffix=preset_help).parse(argv)[0]


def launcher_words() -> list[str] | None:
    """`accelerate launch [its flags] script [flags]` as typed, when this process was started by it (on Linux, its
    parent's command line); None otherwise."""
    try:
        words = [word.decode(errors="replace") for word in Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
                 .split(b"\0") if word]  # fmt: skip
    except OSError:
        return None
    for index, word in enumerate(words[:-1]):
        if Path(word).name == "accelerate" and words[index + 1] == "launch":
            return ["accelerate", *words[index + 1 :]]
        if word == "-m" and words[index + 1] == "accelerate.commands.launch":
            return ["python", *words[index:]]
    return None


def typed_command(argv: list[str], program: str | None) -> str:
    """The command line the user typed, for results.json: `program` (e.g. "moco-hf train") or how Python was
    started, then `argv`; secrets hidden."""
    if program is None:
        launcher = launcher_words()
        if launcher is not None:
            return shlex.join(without_secrets(launcher))
        script = Path(sys.argv[0])
        program = "python -m moco_hf.pretraining" if script.name == "__main__.py" else f"python {sys.argv[0]}"
    return shlex.join(without_secrets([*shlex.split(program), *argv]))


class FlagWords(logging.Filter):
    """Log records in the command line's words: each `name` of a setting becomes `--name` (`as_flags`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = as_flags(record.getMessage(), ARGUMENT_NAMES), None
        return True


def speak_in_flags() -> None:
    """The log format of the command (set up once), with `FlagWords` on its handlers."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, FlagWords) for f in handler.filters):
            handler.addFilter(FlagWords())


def main(argv: list[str] | None = None, program: str | None = None) -> int:
    """The command: parse `argv` (default `sys.argv[1:]`), train, and return the exit status: 0, 1 for a run that
    cannot go on, 2 for a usage or data error (one line on stderr each), 3 when the run finished but its model did
    not reach the Hub (`--push_to_hub`; the last line says what to upload), 128 + signal when stopped by one.
    `program` is what started it (e.g. "moco-hf train"), recorded with `argv` as the run's command."""
    argv = sys.argv[1:] if argv is None else argv
    speak_in_flags()
    try:
        args = parse_arguments(argv)
        from .. import register_auto_classes
        from .trainer import train  # accelerate, datasets, the model: once the flags are known to be good

        register_auto_classes()
        results = train(args, command=typed_command(argv, program))
    except UsageError as error:
        print(f"error: {as_flags(str(error), ARGUMENT_NAMES)}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"error: {as_flags(str(error), ARGUMENT_NAMES)}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        return 128 + stopped.signal_number
    return PUSH_FAILED if results.get("pushed_to_hub") is False else 0
