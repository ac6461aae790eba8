"""Errors that the CLI turns into one clear line and exit code 2 (a user's mistake)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: a recipe key, a file, a value.

    The message is one line that names the offending key, file or value. The CLI prints it
    as ``error: <message>`` and exits with code 2, without a traceback.
    """

    exit_code = 2


class TargetsNotMet(Exception):
    """Raised by gates when a deployment check fails (exit code 3)."""

    exit_code = 3
