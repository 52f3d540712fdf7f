"""Usage errors end a job; they are not faults to restart from.

Without torch, so that a restarted worker can check for the note before importing it.
"""

from __future__ import annotations

import os
from pathlib import Path

USAGE_ERROR_ENV = "PLAIT_USAGE_ERROR_FILE"


def note_usage_error() -> None:
    """A worker met a usage error (bad config, data or checkpoint): restarting cannot help.

    The elastic agent restarts on any failure; the restarted workers see this note and exit
    at once with the same status, before importing torch, so the job ends quickly."""
    path = os.environ.get(USAGE_ERROR_ENV)
    if path:
        Path(path).touch()


def usage_error_noted() -> bool:
    path = os.environ.get(USAGE_ERROR_ENV)
    return bool(path) and Path(path).exists()
