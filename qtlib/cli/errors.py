"""Errors the CLI reports as one line, without a traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error caused by the user's input (a bad file, a missing weight, a wrong option)."""


def user_config(path: str | Path):
    """Load a config file for a CLI command; a bad file becomes a one-line :class:`UserError`."""
    from qtlib.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
