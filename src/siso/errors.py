"""The error type for mistakes a user can fix; the CLI prints it without a traceback.

Exit codes a script can trust (the README's "Exit codes"): 0 a usable result; 2 a mistake in the
input or the environment (this error); 3 a run that produced nothing usable; 4 a benchmark with
failed items; 130 stopped by Ctrl-C, 143 by SIGTERM and 129 by SIGHUP (the best so far is saved).
"""

from __future__ import annotations

EXIT_NO_RESULT = 3
EXIT_FAILED_ITEMS = 4


class SisoError(Exception):
    """A problem with the user's input or environment, phrased so they can act on it.

    The message says what was wrong, with which input, and what to do about it.
    """

    exit_code = 2


class NoResultError(SisoError):
    """A run that finished without anything usable (its first iteration was already NaN)."""

    exit_code = EXIT_NO_RESULT


class ClusterLostError(SisoError):
    """The Ray cluster's head is gone. Ray's core library in this process can no longer shut down
    (it waits on the head, then crashes), so the CLI ends the process at once after the message;
    every finished item is already on disk."""

    end_process = True
