"""Errors that mean "the user's input needs fixing": the CLI prints them in one line.

Kept free of heavy imports so that the command line can catch them without loading
torch (config and task errors live in `mopd.config` and `mopd.tasks.registry`).
"""

from __future__ import annotations


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a local folder nor reachable on the Hugging Face Hub."""


class RunFolderError(Exception):
    """A run folder that cannot be used as asked: in use by another training, or nothing
    to resume in it."""


class UnusableModelError(ValueError):
    """A model or tokenizer that exists but cannot be trained here (e.g. no chat template)."""
