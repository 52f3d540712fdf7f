"""The launcher's side of resilience: a store for heartbeats and the monitor.

The monitor lives in the launcher rather than on rank 0: the launcher outlives every worker
generation, and it cannot be the process that crashed or hung. Its own TCPStore (a free port
on 127.0.0.1 only, passed to the workers in PLAIT_MONITOR_STORE) keeps heartbeats and fault
records apart from the workers' rendezvous store, and across restarts. It carries JSON only,
and the monitor signals only the processes its launcher started (`local_pids`), never a pid
read from the store.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.resilience.heartbeat import STORE_ENV
from plait.resilience.monitor import HangRule, Monitor, Verdict
from plait.resilience.processes import loopback_store


class ResilienceGuard:
    def __init__(self, cfg: Any, run_dir: Path, nproc: int, local_pids: Callable[[], dict[int, int]]):
        r = cfg.resilience
        self.enabled = r.mode != "none" and nproc > 1
        self.max_restarts = r.max_restarts if r.mode == "restart" else 0
        self.store: Any = None
        self.monitor: Monitor | None = None
        if self.enabled:
            self.store = loopback_store(timeout_s=30)
            self.monitor = Monitor(self.store, nproc, run_dir, r.heartbeat_s, r.hang_s, r.slow_k, r.slow_window,
                                   r.slow_min_fraction, restart=self.max_restarts > 0, slow_min_s=r.slow_min_s,
                                   local_pids=local_pids, hang_rule=HangRule.from_config(cfg), settle_s=r.settle_s)
        # How long a launcher waits at most for the monitor's verdict on a failed worker: the
        # settling window, plus room for the other workers' last heartbeats on a loaded machine
        # (the verdict usually comes as soon as every worker has exited).
        self.verdict_wait_s = r.settle_s + 15.0

    def env(self) -> dict[str, str]:
        """What the workers need to reach the monitor's store."""
        return {STORE_ENV: f"127.0.0.1:{self.store.port}"} if self.enabled else {}

    def start(self) -> None:
        if self.monitor is not None:
            self.monitor.start()

    def await_verdict(self, generation: int) -> Verdict | None:
        """The monitor's verdict on worker generation `generation` (None: no monitor, or none came)."""
        if self.monitor is None:
            return None
        return self.monitor.await_verdict(generation, self.verdict_wait_s)

    def stop(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
