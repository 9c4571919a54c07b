"""Every `mopd ...` command shown in the README and docs parses, and its config, task
options and recipe resolve (nothing is trained or loaded): the docs cannot drift from the
command line."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mopd.cli import _parser, _task_options
from mopd.config import load_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(page: Path) -> list[tuple[str, str]]:
    """(where, command) for each `mopd` line in a fenced code block, continuations joined."""
    found, in_block, pending = [], False, ""
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        text = (pending + " " + line.strip()) if pending else line.strip()
        if not in_block or not (pending or text.startswith("mopd ")):
            continue
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        found.append((f"{page.name}:{number}", text.split(" #")[0].strip()))
    return found


COMMANDS = [c for page in PAGES for c in _commands(page)]


def test_the_docs_show_commands_of_every_kind():
    kinds = {shlex.split(command)[1] for _, command in COMMANDS}
    assert {"train", "eval", "analyze", "report"} <= kinds, kinds


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_valid(where, command):
    argv = shlex.split(command)[1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:
        if stop.code == 0:  # --help
            return
        raise AssertionError(f"{where}: {command!r} does not parse") from None
    if args.command == "train" and args.resume is None:
        recipe = args.config or "demo"
        if recipe.endswith(".yaml") and not (ROOT / recipe).exists():
            recipe = "demo"  # the reader's own file: check the overrides on the demo
        load_config(recipe, args.overrides)
    if args.command in ("eval", "analyze"):
        _task_options(args.options)
