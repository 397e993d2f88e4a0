"""The one error type a user sees, and the one wrapper that turns it into a line and an exit code.

Why one type: every front door (retro-build-index, train.py, retro.evaluate, retro.generate,
retro.plot, retro-serve) must answer bad input, a bad configuration, a broken database or a
checkpoint that does not fit with one line on stderr and exit status 2, never a traceback. Code
raises :class:`UserError` wherever the user can fix the cause; :func:`run_main` is the only
place that catches it for a command line.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(Exception):
    """A problem the user can fix (input, arguments, configuration, database, checkpoint).

    Reported as one line, without a traceback, by :func:`run_main`.
    """


# The name INTERFACE.md and earlier code use; the same class, so ``except DBError`` catches all.
DBError = UserError


def run_main(prog: str, func: Callable[[], Any], *, interrupted: str = "interrupted",
             cleanup: Callable[[], None] | None = None) -> int:
    """Call ``func()``; a :class:`UserError` -> ``PROG: error: MESSAGE`` and 2; Ctrl-C -> 130.

    ``interrupted`` is printed after ``PROG: `` on Ctrl-C (say how to resume); ``cleanup`` runs
    whatever happened (e.g. tearing down a process group). Returns the exit status.
    """
    try:
        func()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if cleanup is not None:
            cleanup()
    return 0
