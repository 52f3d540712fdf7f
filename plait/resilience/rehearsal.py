"""Rehearse a multi-node job on one machine: each "node" is its own torchrun agent on 127.0.0.1.

Every simulated node gets its own host label (PLAIT_HOST) and its own shared-memory root
(PLAIT_SHM_ROOT), so plait treats it as a machine of its own: heartbeats and fault reports
name it, its in-memory snapshots live only there and are lost with it. The agents meet through
torch's c10d rendezvous on a free loopback port (as plait-c10d, which lets a lost node
rejoin: plait/resilience/rendezvous.py); the first node hosts the rendezvous store.

    nodes = SimulatedNodes(root, ["node-a", "node-b"], nproc_per_node=2, plait_args=[...])
    nodes.start_all()
    nodes.kill("node-b")      # its agent and every worker, as a lost machine
    nodes.start("node-b")     # the machine comes back
    nodes.wait()

Used by tests/test_two_nodes.py and benchmarks/recovery.py; see docs/resilience.md.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from plait.resilience.processes import HOST_ENV, SHM_ROOT_ENV
from plait.resilience.rendezvous import BACKEND_NAME

# Fast rendezvous for a rehearsal on one machine: a lost agent is declared dead after 3 s
# without keep-alives, and a round closes 2 s after the minimum number of nodes joined.
MARK_ENV = "PLAIT_REHEARSAL"
RENDEZVOUS = "last_call_timeout=2,join_timeout=120,keep_alive_interval=1,keep_alive_max_attempt=3,close_timeout=5"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SimulatedNodes:
    def __init__(self, root: Path, names: list[str], nproc_per_node: int, plait_args: list[str],
                 max_restarts: int = 5, run_id: str = "rehearsal", backend: str = BACKEND_NAME):
        self.root, self.names, self.nproc, self.args = Path(root), names, nproc_per_node, plait_args
        self.max_restarts, self.run_id, self.backend = max_restarts, run_id, backend
        self.port = free_port()
        self.agents: dict[str, subprocess.Popen] = {}
        self.token = secrets.token_hex(8)  # marks this rehearsal's processes, and only them

    def env(self, name: str) -> dict[str, str]:
        shm = self.root / f"shm-{name}"
        shm.mkdir(parents=True, exist_ok=True)
        return {**os.environ, HOST_ENV: name, SHM_ROOT_ENV: str(shm), MARK_ENV: f"{self.token}:{name}",
                "PYTHONWARNINGS": "ignore",
                "GLOO_SOCKET_IFNAME": "lo" if sys.platform.startswith("linux") else "lo0", "LOGLEVEL": "WARNING"}

    def start(self, name: str) -> subprocess.Popen:
        """Start node `name`'s agent (torchrun), which starts its workers."""
        host = name == self.names[0]
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", f"1:{len(self.names)}",
                "--nproc-per-node", str(self.nproc), "--rdzv-backend", self.backend,
                "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", self.run_id,
                "--max-restarts", str(self.max_restarts), "--monitor-interval", "0.2",
                "--rdzv-conf", f"is_host={str(host).lower()},{RENDEZVOUS}", "-m", "plait", *self.args]
        log = (self.root / f"{name}.log").open("a")
        self.agents[name] = subprocess.Popen(args, env=self.env(name), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        return self.agents[name]

    def start_all(self, stagger_s: float = 0.5) -> None:
        for name in self.names:
            self.start(name)
            time.sleep(stagger_s)

    def pids(self, name: str) -> list[int]:
        """Every process of node `name`: its agent and its workers (found by their mark)."""
        label = f"{MARK_ENV}={self.token}:{name}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if label in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def kill(self, name: str) -> None:
        """Lose node `name`: SIGKILL its agent and workers at once, as a machine that went away."""
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.agents[name].wait()

    def wait(self, timeout_s: float = 600) -> dict[str, int | None]:
        """Each node's agent exit status (None: still running at the deadline, then killed)."""
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for name, agent in self.agents.items():
            try:
                codes[name] = agent.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        self.stop()
        return codes

    def stop(self) -> None:
        for name in self.agents:
            for pid in self.pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
