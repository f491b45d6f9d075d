"""What the commands share: one-line errors in terms of flags, from a parser without abbreviations."""

from __future__ import annotations

import copy
import dataclasses
import re
from argparse import ArgumentDefaultsHelpFormatter, ArgumentParser
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import NoReturn

from transformers import HfArgumentParser

from .errors import UsageError, first_line


def as_flags(message: str, names: Iterable[str]) -> str:
    """A library message for the command line: each `name` (in backticks) among the command's argument `names`
    becomes the flag `--name`; the library itself speaks of fields and parameters."""
    flags = set(names)
    return re.sub(r"`(\w+)`", lambda match: f"--{match[1]}" if match[1] in flags else match[0], message)


LIBRARY_METADATA = ("config_field",)  # dataclass field metadata read by the library, not argparse options


class DefaultsWhereTheyMeanSomething(ArgumentDefaultsHelpFormatter):
    """`--help` states each flag's default, except None: those flags say in their help who decides (the preset)."""

    def _get_help_string(self, action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class CommandLineParser(HfArgumentParser):
    """The commands' parser: no abbreviations (a typo must not pick another flag), and a bad value or an unknown
    flag is one line (`error: ...`, exit status 2) instead of the whole usage block. `help_suffix(field)`, when
    given, adds generated text to a field's help (e.g. what each preset sets it to)."""

    def __init__(
        self,
        dataclass_types: type | tuple[type, ...],
        help_suffix: Callable[[dataclasses.Field], str | None] | None = None,
        **kwargs,
    ) -> None:
        self.help_suffix = help_suffix  # read while the parent's __init__ adds the fields
        super().__init__(dataclass_types, allow_abbrev=False, formatter_class=DefaultsWhereTheyMeanSomething, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help).\n")

    def _parse_dataclass_field(self, parser: ArgumentParser, field: dataclasses.Field) -> None:
        """HfArgumentParser's, without the metadata the library keeps for itself (e.g. `config_field`), which
        argparse would refuse, and with `help_suffix`'s text."""
        suffix = self.help_suffix(field) if self.help_suffix else None
        if suffix or any(key in field.metadata for key in LIBRARY_METADATA):
            metadata = {k: v for k, v in field.metadata.items() if k not in LIBRARY_METADATA}
            if suffix:
                metadata["help"] = f"{metadata.get('help', '')} {suffix}".strip()
            field = copy.copy(field)
            field.metadata = MappingProxyType(metadata)
        HfArgumentParser._parse_dataclass_field(parser, field)

    def parse(self, argv: list[str]) -> tuple:
        """The dataclasses of `argv`, or of one YAML/JSON file given alone; an argument no dataclass takes is a
        `UsageError` (so are the `UsageError`s the dataclasses' own checks raise)."""
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return self.parse_yaml_file(argv[0])
        if len(argv) == 1 and argv[0].endswith(".json"):
            return self.parse_json_file(argv[0])
        try:
            return self.parse_args_into_dataclasses(argv)
        except UsageError:
            raise
        except ValueError as error:  # HfArgumentParser's "Some specified arguments are not used"
            raise UsageError(f"{first_line(error)} (see --help).") from error
