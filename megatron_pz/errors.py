"""The project's own errors, and the one boundary every command runs inside.

An error of ours says what is wrong, where (the file or the config key) and what to do; a command turns it
into one line, ``megatron-pz COMMAND: error: ...``, and an exit code:

* :data:`EXIT_BAD_INPUT` (2): bad input, refused before any work (nothing was written);
* :data:`EXIT_FAILED` (1): a failure during work (:func:`during_work` marks where work starts).

Anything else that escapes a command is a bug of ours: its traceback is printed with a line asking to report
it. ``MEGATRON_PZ_TRACEBACK=1`` prints the traceback of our own errors too.

Several ranks (torchrun, :mod:`megatron_pz.runtime.launcher`) check the same inputs, so bad input is printed
by the first rank of each node only (one line per problem, not one per rank); a failure during work may be
one rank's own, so every rank that has one prints it.

A leaf module: it imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Callable, Optional

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class PzError(Exception):
    """An error of ours: ``what`` went wrong, at ``path`` (a file, or a config key), and ``remedy``, what to do.
    The message reads ``"{path}: {what}; {remedy}"`` (the parts that are given)."""

    exit_code = EXIT_FAILED

    def __init__(self, what: str, path=None, remedy: Optional[str] = None):
        self.what, self.path, self.remedy = what, path, remedy
        message = f"{path}: {what}" if path is not None else what
        super().__init__(f"{message}; {remedy}" if remedy else message)


class BadInput(PzError):
    """Input (a config, a file, a folder, an argument) that the command refuses before any work."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInput, ValueError):
    """A config value is missing, unknown, mistyped or inconsistent; the message names the field.
    (Importable from :mod:`megatron_pz.config` as well, where it has always been.)"""


@contextlib.contextmanager
def during_work():
    """Work has started (a file written, a model built): an error of ours raised inside is a failure during
    work (exit 1), even when its type is bad input."""
    try:
        yield
    except PzError as exc:
        exc.exit_code = EXIT_FAILED
        raise


def _prints_bad_input() -> bool:
    """Bad input is the same on every rank: the first rank of each node says it."""
    return os.environ.get("LOCAL_RANK", "0") == "0" or os.environ.get("RANK", "0") == "0"


def guarded(command: str, func: Callable[..., Optional[int]], *args, on_error: Optional[Callable[[], None]] = None) -> int:
    """``func(*args)``'s exit code (None: 0) inside the error boundary of ``megatron-pz COMMAND``.

    Our errors become one line on stderr and their exit code; anything else (a bug) its traceback and a line
    asking to report it, exit 1. ``on_error`` runs first in both cases (``train`` stops acting on stop
    signals there, so that under torchrun no rank is killed on its way out)."""
    try:
        return int(func(*args) or 0)
    except PzError as exc:
        if on_error is not None:
            on_error()
        if exc.exit_code != EXIT_BAD_INPUT or _prints_bad_input():
            if os.environ.get("MEGATRON_PZ_TRACEBACK"):
                traceback.print_exc()
            print(f"megatron-pz {command}: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException:  # Exception, and the odd library error outside it (torch's CheckpointException)
        if on_error is not None:
            on_error()
        traceback.print_exc()
        print(f"megatron-pz {command}: internal error: the traceback above is a bug in megatron-pz, not a "
              "problem with your input; please report it with the command line and this output",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
