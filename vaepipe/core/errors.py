"""Errors that the CLI turns into a one-line message and a non-zero exit code.

Stage code raises these for anything a user can fix (bad params, bad input files, missing
artifacts); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VaepipeError(Exception):
    """Base class: the message is shown to the user as one line."""

    exit_code = 1


class ConfigError(VaepipeError):
    """params.yaml or a --set override names an unknown key or an invalid value."""

    exit_code = 2


class InputError(VaepipeError):
    """An input file or artifact is missing, empty, corrupt or inconsistent."""
