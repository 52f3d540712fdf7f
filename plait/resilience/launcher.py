"""The launcher's side of resilience: a store for heartbeats, the monitor, restarts, cleanup.

The monitor lives in the launcher (the elastic agent's process) rather than on rank 0: the
launcher outlives every worker generation, and it cannot be the process that crashed or hung.
Its own TCPStore (a free port on 127.0.0.1, passed to the workers in PLAIT_MONITOR_STORE)
keeps heartbeats and fault records apart from the rendezvous store, and across restarts.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

import torch.distributed as dist

from plait.resilience.heartbeat import STORE_ENV
from plait.resilience.monitor import Monitor
from plait.resilience.snapshot import remove_snapshots, snapshot_root
from plait.resilience.usage_errors import USAGE_ERROR_ENV


class ResilienceGuard:
    def __init__(self, cfg, run_dir: Path, nproc: int, run_id: str):
        r = cfg.resilience
        self.enabled = r.mode != "none" and nproc > 1
        self.max_restarts = r.max_restarts if r.mode == "restart" else 0
        self.run_dir, self.run_id = run_dir, run_id
        self.store = self.monitor = None
        self.usage_error_file = Path(tempfile.gettempdir()) / f"{run_id}-usage-error"
        if self.enabled:
            self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=30))
            self.monitor = Monitor(self.store, nproc, run_dir, r.heartbeat_s, r.hang_s or cfg.parallel.timeout_s / 2,
                                   r.slow_k, r.slow_window, r.slow_min_fraction, restart=self.max_restarts > 0)

    def start(self) -> None:
        os.environ[USAGE_ERROR_ENV] = str(self.usage_error_file)
        if self.enabled:
            os.environ[STORE_ENV] = f"127.0.0.1:{self.store.port}"
            self.monitor.start()

    def stop(self) -> None:
        os.environ.pop(USAGE_ERROR_ENV, None)
        self.usage_error_file.unlink(missing_ok=True)
        if self.enabled:
            self.monitor.stop()
            os.environ.pop(STORE_ENV, None)
        # The job is over (finished, or out of restarts): its in-memory snapshots are of no more use.
        remove_snapshots(snapshot_root(self.run_dir, self.run_id))
