"""Each rank's watchdog: a daemon thread that publishes a compact heartbeat to the job's store.

The heartbeat says where this rank is: its step and phase ("setup" until its first step
ends, "step", or a phase the loop announced as possibly long: "eval", "checkpoint",
"snapshot", "finish"), how many steps it has completed since it started, how far it has got
in each group's sequence of collectives (entered and completed), the collective it is
waiting in and for how long, and, per recent step, how long it waited in collectives in
total. The monitor (monitor.py, in the launcher) compares the ranks' heartbeats to name a
crashed, hung or slow rank. Publishing from a thread keeps it going while the main thread is stuck (a hang) and off the step's
critical path; what the main thread adds per collective is one observer call.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from plait.comm import CollectiveRecord, Comm
from plait.resilience.processes import host_label

STORE_ENV = "PLAIT_MONITOR_STORE"  # host:port of the launcher's store, set by plait.launch
KEY = "plait/heartbeat/{rank}"


def connect_store(address: str, timeout_s: float = 30.0) -> Any:
    """A client of the launcher's TCPStore at `host:port`."""
    import datetime

    import torch.distributed as dist

    host, _, port = address.rpartition(":")
    return dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def generation() -> int:
    """How many times the launcher has restarted the worker group (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Watchdog:
    def __init__(self, store: Any, comm: Comm, rank: int, world_size: int, interval_s: float, window: int,
                 judge: Callable[[], None] | None = None):
        """`judge`: called in the thread after each heartbeat (cluster.PeerJudge under torchrun)."""
        self.store, self.comm, self.rank = store, comm, rank
        self.judge = judge
        self.interval_s = interval_s
        self.base = {"rank": rank, "world_size": world_size, "host": host_label(),
                     "pid": os.getpid(), "generation": generation()}
        self.step = 0
        self.training = False  # hang checks start with the first step (setup may wait on rank 0)
        self.phase = "setup"  # until the first step ends: compilation, caches, the first gathers
        self.steps_done = 0  # since this process started (the monitor's warm-up)
        self.completed: Counter = Counter()
        self.last: tuple[str, str, int] = ("", "", 0)  # the newest completed collective
        self._wait = 0.0  # seconds spent in collectives in the current step
        self._worst: tuple[float, str, str] = (0.0, "", "")
        self.steps: deque = deque(maxlen=max(2 * window, 4))  # (step, wait_s, step_time_s, group, op)
        self._stop = threading.Event()
        # publish() runs in the thread and in stop(): the lock orders them, and once the final
        # state ("done" / "failed") is out, a late "running" beat cannot overwrite it.
        self._publish_lock = threading.Lock()
        self._final = False
        comm.observers.append(self._on_collective)
        # At once, not after the first interval: a rank that dies before its first beat must
        # still be known to the monitor (else its peers, dying of its absence, take the blame).
        self.publish()
        self._thread = threading.Thread(target=self._run, name="plait-watchdog", daemon=True)
        self._thread.start()

    # --- main thread ------------------------------------------------------------------------
    def _on_collective(self, record: CollectiveRecord) -> None:
        self.completed[record.group] = max(self.completed[record.group], record.seq)
        self.last = (record.group, record.op, record.seq)
        waited = record.left - record.entered
        self._wait += waited
        if waited > self._worst[0]:
            self._worst = (waited, record.group, record.op)

    def begin_step(self, step: int) -> None:
        self.step, self.training = step, True

    def end_step(self, step: int, step_time_s: float) -> None:
        self.steps.append((step, round(self._wait, 6), round(step_time_s, 6), self._worst[1], self._worst[2]))
        self._wait, self._worst = 0.0, (0.0, "", "")
        self.steps_done += 1
        if self.phase == "setup":
            self.phase = "step"

    def set_phase(self, name: str) -> None:
        """Announce a phase; "step" before the first step has ended keeps "setup"."""
        self.phase = "setup" if name == "step" and self.steps_done == 0 else name

    # --- the thread -------------------------------------------------------------------------
    def heartbeat(self, state: str = "running") -> dict[str, Any]:
        now = time.monotonic()
        inflight = None
        for _ in range(3):
            try:  # the main thread may change these while we copy them: then copy again
                last = self.comm.history[-1] if self.comm.history else None
                entered, completed, steps = dict(self.comm.sequence), dict(self.completed), list(self.steps)
                break
            except (IndexError, RuntimeError):
                last, entered, completed, steps = None, {}, {}, []
        if last is not None and last.left is None:
            inflight = {"group": last.group, "ranks": list(last.ranks), "seq": last.seq, "op": last.op,
                        "waiting_s": round(now - last.entered, 4)}
        return {**self.base, "state": state, "time": time.time(), "step": self.step,
                "training": self.training, "phase": self.phase, "steps_done": self.steps_done,
                "entered": entered, "completed": completed,
                "inflight": inflight, "steps": steps, "last": list(self.last)}

    def publish(self, state: str = "running", wait_s: float = -1) -> None:
        """Publish a heartbeat; a final `state` ("done", "failed", "stopped") is the last one.
        `wait_s` bounds the wait for the lock (a signal handler must not wait on the thread
        it interrupted); -1 waits as long as it takes."""
        if not self._publish_lock.acquire(timeout=wait_s):
            return
        try:
            if self._final:
                return
            self._final = state != "running"
            self.store.set(KEY.format(rank=self.rank), json.dumps(self.heartbeat(state)))
        finally:
            self._publish_lock.release()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
                if self.judge is not None:
                    self.judge()
            except Exception:  # noqa: BLE001 - the store went away (the job is ending): stop quietly
                return

    def stop_at_once(self, state: str) -> None:
        """From a signal handler: stop beating and publish `state` without waiting on the thread."""
        self._stop.set()
        try:
            self.publish(state, wait_s=1.0)
        except Exception:  # noqa: BLE001 - the store went away: the process ends all the same
            pass

    def stop(self, state: str) -> None:
        """Stop beating; `state` ("done", "failed", or "stopped" by a signal) tells the monitor
        this exit is not a crash."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s + 1)
        try:
            self.publish(state)
        except Exception:  # noqa: BLE001
            pass
