"""Cleans up after a local job whose launcher was killed outright (SIGKILL, OOM killer), and
ties each worker's life to its launcher's.

Started by the launcher (processes.JobFiles) with a pipe on its standard input whose write
end only the launcher holds. Reading blocks until the launcher is gone, however it went; a
launcher that ends normally removes everything itself first, and this finds nothing left.
Then any worker still carrying the job's marker is killed (workers also ask the kernel for
that, processes.die_with_launcher), and the job's private folders are removed.

Usage: python -m plait.resilience.sentinel JOB_ID FOLDER...  This module imports neither torch
nor the rest of plait: the sentinel starts in milliseconds, and a worker calls
`die_with_launcher` first thing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import time
from pathlib import Path

LAUNCHER_PID_ENV = "PLAIT_LAUNCHER_PID"  # a worker dies with this process
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
JOB_ENV = "PLAIT_JOB_ID"  # marks a job's workers (processes.worker_env puts it in their environment)
WAIT_FOR_WORKERS_S = 10.0


def die_with_launcher() -> None:
    """In a worker of plait's launcher: have the kernel SIGKILL it when the launcher dies (Linux),
    and exit at once if the launcher is already gone. Where prctl is missing the sentinel kills
    strays instead."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the request took effect
        os._exit(1)


def job_processes(job_id: str) -> list[int]:
    marker = f"{JOB_ENV}={job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def main(argv: list[str]) -> int:
    job_id, folders = argv[0], [Path(f) for f in argv[1:]]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job's Ctrl-C is the launcher's to handle
    while sys.stdin.buffer.read(4096):
        pass  # the launcher never writes; end of file means it is gone
    deadline = time.monotonic() + WAIT_FOR_WORKERS_S
    while (strays := job_processes(job_id)) and time.monotonic() < deadline:
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    for folder in folders:
        remove_private_folder(folder)
    return 0


def remove_private_folder(folder: Path) -> None:
    """Remove a job's folder, and its parent too when that is an emptied plait-UID folder."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.name == f"plait-{os.getuid()}":
        try:
            folder.parent.rmdir()  # fails, as it should, while another job of this user uses it
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
