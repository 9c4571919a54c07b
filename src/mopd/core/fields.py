"""Configuration fields that carry their own one-line help.

``mopd train --help`` prints every key with the value the chosen recipe gives it and this
help, so the dataclass field is the one place a setting is described.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

HELP = "help"


def opt(default: Any, help: str) -> Any:
    """A dataclass field with `default` (a value) and its help line."""
    return dataclasses.field(default=default, metadata={HELP: help})


def opt_factory(factory: Callable[[], Any], help: str) -> Any:
    """A dataclass field whose default is built by `factory` (lists, dicts, sections)."""
    return dataclasses.field(default_factory=factory, metadata={HELP: help})


def field_help(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get(HELP, ""))
