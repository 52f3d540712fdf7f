"""The local launcher on a shared machine: what listens where, who may be signalled, and what is
left behind when the launcher is interrupted or killed.

One real `plait train --nproc 2` job serves the socket check and the SIGKILL check (in that
order); interrupts get short jobs of their own. Sockets are read from /proc (no probing of
any interface); the job's processes are the launcher and its descendants.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plait.resilience.monitor import KEY, Monitor, find_slow
from plait.resilience.processes import SNAPSHOT_DIR_ENV, loopback_store, make_private_dir, private_shm_root
from plait.resilience.snapshot import remove_snapshots, snapshot_root, write_snapshot
from tests.scenarios import BASE, read_jsonl

pytestmark = [pytest.mark.timeout(240), pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                             reason="reads /proc")]

LOOPBACK = {"127.0.0.1", "::1"}
SHM = Path("/dev/shm")


def start_job(run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """`plait train --nproc N` in its own session (so a test can signal its process group)."""
    args = [sys.executable, "-m", "plait", "train", "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for item in BASE + list(overrides):
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len([line for line in path.read_text().splitlines() if line.endswith("}")]) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from /proc/*/stat."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in found]
        found.update(children)
        frontier.extend(children)
    return found


def listening_sockets() -> dict[int, str]:
    """inode -> local address of every listening TCP socket of this machine (IPv4 and IPv6)."""
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address = bytes.fromhex(fields[1].split(":")[0])
            # /proc prints each 32-bit word in host (little-endian) order.
            address = b"".join(address[i:i + 4][::-1] for i in range(0, len(address), 4))
            found[int(fields[9])] = socket.inet_ntop(family, address)
    return found


def sockets_of(pids: set[int]) -> dict[int, list[str]]:
    """pid -> local addresses its listening sockets are bound to."""
    listening = listening_sockets()
    out: dict[int, list[str]] = {}
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        inodes = [int(link[8:-1]) for link in links if link.startswith("socket:[")]
        out[pid] = [listening[i] for i in inodes if i in listening]
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def shm_entries() -> set[str]:
    """Everything under /dev/shm, one level into this user's plait folder."""
    if not SHM.is_dir():
        return set()
    found = {p.name for p in SHM.iterdir()}
    private = SHM / f"plait-{os.getuid()}"
    if private.is_dir():
        found |= {f"{private.name}/{p.name}" for p in private.iterdir()}
    return found


def temp_entries(job_id: str) -> set[str]:
    """The job's private temporary folders."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {p.name for p in tmp.iterdir() if p.name.startswith(f"plait-{job_id}")}


def torch_elastic_entries() -> set[str]:
    """What torch's elastic agent leaves in the temporary folder (plait's launcher is not it)."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {p.name for p in tmp.iterdir() if p.name.startswith("torchelastic_")}


def job_id_of(proc: subprocess.Popen) -> str:
    """The launcher's job id, read from a worker's environment (PLAIT_JOB_ID=plait-<hex>)."""
    for pid in descendants(proc.pid) - {proc.pid}:
        try:
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(b"PLAIT_JOB_ID=plait-"):
                    return item.split(b"-", 1)[1].decode()
        except OSError:
            continue
    raise AssertionError("no worker carries the job id")


@pytest.fixture(scope="module")
def running_job(tmp_path_factory):
    """A 2-process job in restart mode with snapshots every 2 steps, stopped at ~step 3."""
    run_dir = tmp_path_factory.mktemp("job") / "run"
    before = (shm_entries(), torch_elastic_entries())
    proc = start_job(run_dir, "train.steps=2000", "resilience.snapshot_every=2", "checkpoint.every=0",
                     "resilience.heartbeat_s=0.1")
    try:
        wait_for_step(run_dir, 3, proc)
        yield proc, run_dir, before
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_every_listening_socket_of_a_job_is_on_loopback(running_job):
    proc, _, _ = running_job
    pids = descendants(proc.pid)
    bound = sockets_of(pids)
    assert len(pids) >= 3  # the launcher and two workers (and the sentinel)
    addresses = [a for found in bound.values() for a in found]
    # The launcher's two stores, and gloo's listeners in the workers.
    assert len(addresses) >= 2, bound
    assert set(addresses) <= LOOPBACK, bound


def test_sigkill_of_the_launcher_takes_the_workers_and_the_snapshots_with_it(running_job):
    proc, run_dir, (shm_before, elastic_before) = running_job
    workers, job_id = descendants(proc.pid) - {proc.pid}, job_id_of(proc)
    assert temp_entries(job_id)
    assert shm_entries() - shm_before, "the job keeps snapshots in /dev/shm while it runs"
    proc.kill()  # SIGKILL: the launcher cleans up nothing itself
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (any(alive(p) for p in workers) or shm_entries() - shm_before):
        time.sleep(0.1)
    assert not [p for p in workers if alive(p)]
    assert not shm_entries() - shm_before
    assert not temp_entries(job_id)
    assert not torch_elastic_entries() - elastic_before


def interrupt(tmp_path: Path, signum: int, whole_group: bool, mode: str, nproc: int
              ) -> tuple[subprocess.CompletedProcess, Path, str]:
    run_dir = tmp_path / "run"
    proc = start_job(run_dir, "train.steps=2000", "checkpoint.every=0", "resilience.heartbeat_s=0.1",
                     f"resilience.mode={mode}", nproc=nproc)
    try:
        wait_for_step(run_dir, 2, proc)
        job_id = job_id_of(proc) if nproc > 1 else "no-such-job"  # one process: no launcher
        if whole_group:  # what a terminal's Ctrl-C does
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run_dir, job_id


@pytest.mark.parametrize("signum, whole_group, status, mode, nproc", [
    (signal.SIGINT, True, 130, "restart", 2), (signal.SIGTERM, False, 143, "restart", 2),
    (signal.SIGTERM, False, 143, "elastic", 2), (signal.SIGINT, True, 130, "restart", 1)])
def test_ctrl_c_and_sigterm_stop_the_job_with_one_line(tmp_path, signum, whole_group, status, mode, nproc):
    result, run_dir, job_id = interrupt(tmp_path, signum, whole_group, mode, nproc)
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("plait:")]
    assert len(said) == 1 and said[0].startswith("plait: interrupted at step ") and said[0].endswith(
        "; resume with the same command"), result.stderr[-2000:]
    events = read_jsonl(run_dir / "events.jsonl")
    assert not [e for e in events if e["event"] in ("fault_detected", "recovered")]
    assert events[-1]["event"] == "interrupted"
    assert not temp_entries(job_id)


def test_a_forged_heartbeat_makes_the_monitor_signal_nothing_outside_its_job(tmp_path):
    """Any local process can write to the monitor's store: a heartbeat naming a foreign pid (here
    a bystander process) must neither get it killed nor be taken as that rank's liveness."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store = loopback_store(timeout_s=10)
    try:
        monitor = Monitor(store, 2, tmp_path, heartbeat_s=0.1, hang_s=0.5, slow_k=8.0, slow_window=8,
                          slow_min_fraction=0.1, restart=True, local_pids=lambda: {})
        now = time.time()
        base = {"world_size": 2, "host": socket.gethostname(), "generation": 0, "state": "running",
                "time": now, "training": True, "completed": {}, "steps": [], "last": ["", "", 0]}
        # rank 0 waits 5 s in collective #3 of dp; rank 1, "the bystander", never entered it: a hang.
        store.set(KEY.format(rank=0), json.dumps({**base, "rank": 0, "pid": os.getpid(), "step": 4,
                                                  "entered": {"dp": 3}, "inflight": {
                                                      "group": "dp", "ranks": [0, 1], "seq": 3,
                                                      "op": "all_reduce", "waiting_s": 5.0}}))
        store.set(KEY.format(rank=1), json.dumps({**base, "rank": 1, "pid": bystander.pid, "step": 4,
                                                  "entered": {"dp": 2}, "inflight": None}))
        beats = monitor._read()
        monitor.check(beats, time.time())
        assert [(v.kind, v.rank) for v in monitor.verdicts] == [("hang", 1)]  # named, and reported ...
        time.sleep(0.2)
        assert bystander.poll() is None  # ... but nobody outside the job was signalled
        # Garbage in the store is ignored, not trusted and not fatal.
        store.set(KEY.format(rank=1), b"\x80\x04not json")
        assert set(monitor._read()) == {0}
    finally:
        bystander.kill()
        bystander.wait()


def steps(rank: int, waits: list[float], step_s: float) -> dict:
    return {"rank": rank, "host": "h", "pid": 1, "step": len(waits),
            "steps": [(i, w, step_s, "dp", "all_reduce") for i, w in enumerate(waits)]}


def test_millisecond_lateness_on_a_loaded_cpu_is_never_slow():
    """Tiny steps (10 ms) where one rank arrives 2-3 ms late, steadily: far beyond the MAD test
    and the fraction of a step, but under the absolute floor of resilience.slow_min_s."""
    beats = {0: steps(0, [0.003] * 8, 0.01), 1: steps(1, [0.0005] * 8, 0.01),
             2: steps(2, [0.003] * 8, 0.01), 3: steps(3, [0.0031] * 8, 0.01)}
    assert [v.rank for v in find_slow(beats, k=8.0, window=8, min_fraction=0.1, min_s=0.0)] == [1]
    assert find_slow(beats, k=8.0, window=8, min_fraction=0.1, min_s=0.05) == []


def test_snapshot_folders_are_private_and_never_followed_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    planted = tmp_path / "plait-planted"
    planted.symlink_to(target)
    with pytest.raises(PermissionError):
        make_private_dir(planted)
    shared = tmp_path / "plait-shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # others may enter: someone else could have made it
    with pytest.raises(PermissionError):
        make_private_dir(shared)
    made = make_private_dir(tmp_path / "plait-mine")
    assert made.stat().st_mode & 0o777 == 0o700


def test_under_torchrun_the_workers_remove_their_snapshots_when_the_job_is_over(tmp_path, monkeypatch):
    """No plait launcher: the snapshot folder lies in this user's private folder, is named after
    the run and torch's job id, and each rank removes the copy it wrote once no restart follows."""
    from plait.resilience.session import Resilience

    monkeypatch.delenv(SNAPSHOT_DIR_ENV, raising=False)
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    root = snapshot_root(tmp_path / "run", f"test-{os.getpid()}")
    assert root.parent == private_shm_root()
    try:
        write_snapshot(root, "host", 4, {"trainer.json": {"step": 4}})
        assert root.parent.stat().st_mode & 0o777 == 0o700 and root.stat().st_mode & 0o777 == 0o700
        session = Resilience.__new__(Resilience)  # only what close() looks at
        session._writer, session.watchdog, session.root, session._copy = None, None, root, "host"
        session.own_cleanup = True
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
        session.close(finished=False)  # a failed generation with restarts left: kept for the next
        assert (root / "host").is_dir()
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
        session.close(finished=False)  # the last generation failed: nobody will resume from it
        assert not root.exists()
    finally:
        remove_snapshots(root)
