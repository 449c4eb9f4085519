"""The one error type for mistakes a user can fix; the CLI prints it without a traceback."""

from __future__ import annotations


class SisoError(Exception):
    """A problem with the user's input or environment, phrased so they can act on it.

    The message says what was wrong, with which input, and what to do about it.
    """

    exit_code = 2
