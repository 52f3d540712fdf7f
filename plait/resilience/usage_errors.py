"""Usage and environment errors end a job; they are not faults to restart from.

A worker that meets one writes a note (a file the launcher named in PLAIT_USAGE_ERROR_FILE)
holding its exit status: 2 for bad input (config, data, checkpoint), 1 for a machine that
refuses (a full disk, a path that cannot be written). The launcher ends the job with that
status instead of restarting it, a restarted worker exits at once on seeing the note, and the
other workers, whose collectives fail only because of that exit, end quietly instead of
printing tracebacks of their own.

Without torch, so that a restarted worker can check for the note before importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

USAGE_ERROR_ENV = "PLAIT_USAGE_ERROR_FILE"
USAGE_ERROR = 2
ENVIRONMENT_ERROR = 1


def _note(status: int) -> None:
    path = os.environ.get(USAGE_ERROR_ENV)
    if path:
        try:  # written whole, then renamed: a reader never sees a half-written note
            partial = f"{path}.{os.getpid()}.tmp"
            Path(partial).write_text(str(status))
            os.replace(partial, path)
        except OSError:  # the note is an optimisation: the exit status still ends the job
            pass


def note_usage_error() -> None:
    """A worker met a usage error (bad config, data or checkpoint): restarting cannot help."""
    _note(USAGE_ERROR)


def note_environment_error() -> None:
    """A worker met an environment error (ENOSPC, EACCES, ...): restarting cannot help either."""
    _note(ENVIRONMENT_ERROR)


def note_interrupted(status: int) -> None:
    """A worker was interrupted (Ctrl-C: 130, SIGTERM: 143): the job stops, it is no fault."""
    _note(status)


def noted_status() -> int | None:
    """The exit status a worker noted for the whole job, or None when no worker did."""
    path = os.environ.get(USAGE_ERROR_ENV)
    if not path:
        return None
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else USAGE_ERROR


def usage_error_noted() -> bool:
    """True once any worker of the job noted a usage or environment error."""
    return noted_status() is not None
