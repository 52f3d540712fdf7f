"""The local launchers' process plumbing: loopback stores, workers that die with their
launcher, private folders, and a sentinel that cleans up even after a SIGKILL.

Both local launchers (launch.py for restart mode, elastic_launcher.py for elastic mode) start
their workers through `WorkerSpawner` and hold a `JobFiles` for the job's life:

- every TCPStore they host listens on 127.0.0.1 only. torch's TCPStore server binds to all
  interfaces whatever host name it is given, so it is handed a socket already bound to
  loopback (`master_listen_fd`);
- a worker asks the kernel to SIGKILL it when its launcher dies (sentinel.die_with_launcher);
- the job's private folders (0700, random names: a temporary folder for the workers' notes and
  the in-memory snapshot folder in /dev/shm) are removed on every exit path: by the launcher
  when it ends, and by a small sentinel process when the launcher is killed outright. The
  sentinel holds the read end of a pipe whose write end only the launcher holds, so the
  kernel tells it (end of file) the moment the launcher is gone, however it went.
"""

from __future__ import annotations

import datetime
import errno
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.resilience.sentinel import JOB_ENV, LAUNCHER_PID_ENV, remove_private_folder
from plait.resilience.usage_errors import USAGE_ERROR_ENV

LOOPBACK = "127.0.0.1"
SNAPSHOT_DIR_ENV = "PLAIT_SNAPSHOT_DIR"  # the job's private snapshot folder (snapshot.py)
HOST_ENV = "PLAIT_HOST"  # this node's label in heartbeats and reports (default: the host name)
SHM_ROOT_ENV = "PLAIT_SHM_ROOT"  # where this node keeps in-memory snapshots (default: /dev/shm)
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long


def loopback_store(timeout_s: float = 60.0) -> dist.TCPStore:
    """A TCPStore server on a free port of 127.0.0.1, reachable from this machine only."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(socket.SOMAXCONN)
    port = listener.getsockname()[1]
    # detach(): the store's server takes the descriptor over, so the socket object must not
    # close it when it is garbage-collected.
    return dist.TCPStore(LOOPBACK, port, is_master=True, wait_for_workers=False,
                         master_listen_fd=listener.detach(), timeout=datetime.timedelta(seconds=timeout_s))


def host_label() -> str:
    """The name this process's machine goes by in heartbeats and fault reports: $PLAIT_HOST,
    else the host name. Giving each of several local launchers its own label rehearses a
    multi-node job on one machine."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def private_shm_root() -> Path:
    """This user's folder in shared memory, SHM/plait-UID (see make_private_dir), where SHM is
    $PLAIT_SHM_ROOT, else /dev/shm (else the temporary folder). A "node" rehearsed on one
    machine gets a root of its own, so that losing it loses its snapshots."""
    given = os.environ.get(SHM_ROOT_ENV)
    if given:
        base = Path(given)
    else:
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"plait-{os.getuid()}"


def make_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700 if missing, and check it is this user's private folder.

    Refuses what someone else may have planted: a symlink, a file, or a folder this user does
    not own or others can enter."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(errno.EPERM, "not a private folder of this user (refusing to keep snapshots there)",
                              str(path))
    return path


@dataclass
class JobFiles:
    """A local job's private files: its notes folder and its snapshot folder, and the sentinel
    that removes them (and kills stray workers) if the launcher is killed."""

    job_id: str
    temp_dir: Path
    snapshot_dir: Path
    sentinel: subprocess.Popen | None = None
    _removed: bool = field(default=False, repr=False)

    @classmethod
    def create(cls) -> JobFiles:
        job_id = f"plait-{secrets.token_hex(8)}"
        temp_dir = Path(tempfile.mkdtemp(prefix=f"{job_id}-"))  # mkdtemp: 0700, never an existing path
        snapshot_dir = Path(tempfile.mkdtemp(prefix="job-", dir=make_private_dir(private_shm_root())))
        job = cls(job_id, temp_dir, snapshot_dir)
        job.sentinel = subprocess.Popen(
            [sys.executable, "-m", "plait.resilience.sentinel", job_id, str(temp_dir), str(snapshot_dir)],
            stdin=subprocess.PIPE, start_new_session=True,  # its own session: Ctrl-C must not stop it
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return job

    @property
    def usage_error_file(self) -> Path:
        return self.temp_dir / "usage-error"

    def env(self) -> dict[str, str]:
        """What every worker of the job gets in its environment."""
        return {JOB_ENV: self.job_id, LAUNCHER_PID_ENV: str(os.getpid()),
                SNAPSHOT_DIR_ENV: str(self.snapshot_dir), USAGE_ERROR_ENV: str(self.usage_error_file)}

    def remove(self) -> None:
        """Remove the job's folders and let the sentinel go (it then finds nothing to do)."""
        if self._removed:
            return
        self._removed = True
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        remove_private_folder(self.snapshot_dir)
        if self.sentinel is not None:
            try:
                self.sentinel.stdin.close()
                self.sentinel.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.sentinel.kill()


def base_env(job: JobFiles) -> dict[str, str]:
    """The launcher's environment plus what every worker of any local job needs."""
    env = {**os.environ, **job.env()}
    # Keep gloo on the loopback interface whatever the host name resolves to.
    env.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    return env


def worker_env(job: JobFiles, rank: int, nproc: int, store_port: int, restart_count: int,
               max_restarts: int) -> dict[str, str]:
    """The environment torchrun gives a worker, for a one-node job on loopback, plus plait's."""
    env = base_env(job)
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
        "ROLE_NAME": "default", "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(store_port),
        "TORCHELASTIC_RUN_ID": job.job_id, "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # the launcher hosts the store: no worker listens
    })
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does; plait sets torch's threads itself
    return env


def spawn_worker(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`python -m plait ARGS` in the launcher's process group (Ctrl-C reaches it too)."""
    return subprocess.Popen([sys.executable, "-m", "plait", *args], env=env)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process still running, then SIGKILL those still there after `grace_s`."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def describe_exit(code: Any) -> str:
    """'exit code 3' or 'signal SIGKILL' for a Popen return code."""
    if isinstance(code, int) and code < 0:
        return f"signal {signal_name(-code)}"
    return f"exit code {code}"
