"""Fault injection for tests and for rehearsing failures: `fault.inject`.

    crash@rank=2,step=7           rank 2 exits abruptly (os._exit) as step 7 begins
    hang@rank=1,step=5            rank 1 sleeps for ever before its first collective of step 5
    slow@rank=3,delay=0.5[,step=] rank 3 sleeps `delay` seconds before each collective from step on

`restart=N` limits a fault to the workers' N-th restart (0: the first start), e.g. a crash
while the restarted workers redo steps: a failure during recovery. Several faults are separated by ";". A crash or hang fires once per run: it is recorded in
the run directory before it fires, so the workers that the launcher restarts (and that redo
the step) do not fire it again. A slow rank stays slow: it is a property of the machine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# The grammar lives below the config (plait/fault_spec.py); its names stay importable from here.
from plait.fault_spec import KINDS, Fault, parse_faults  # noqa: F401

FIRED_DIR = ".faults"  # in the run directory: one file per fault that has fired
CRASH_EXIT_CODE = 43


def fired_marker(run_dir: Path, fault: Fault) -> Path:
    return run_dir / FIRED_DIR / fault.describe().replace("@", "_").replace(",", "_").replace("=", "")


def fired_faults(run_dir: Path) -> list[dict]:
    """What the markers say about faults that fired (kind, rank, step, time), oldest first."""
    found = []
    for marker in sorted((run_dir / FIRED_DIR).glob("*")):
        try:
            found.append(json.loads(marker.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(found, key=lambda f: f.get("time", 0))


class FaultInjector:
    """This rank's faults: `begin_step` at the start of each step, `before_collective` as a Comm hook."""

    def __init__(self, faults: list[Fault], rank: int, run_dir: Path):
        generation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # restarts so far
        self.mine = [f for f in faults if f.rank == rank and f.restart in (-1, generation)]
        self.run_dir = run_dir
        self.step = 0
        self._slowed: set[Fault] = set()

    @property
    def active(self) -> bool:
        return bool(self.mine)

    def _claim(self, fault: Fault) -> bool:
        """Record that `fault` fires now; False if it already fired in this run (before a restart)."""
        marker = fired_marker(self.run_dir, fault)
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"kind": fault.kind, "rank": fault.rank, "step": self.step, "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def begin_step(self, step: int) -> None:
        self.step = step
        for fault in self.mine:
            if fault.kind == "crash" and fault.step == step and self._claim(fault):
                os._exit(CRASH_EXIT_CODE)  # no cleanup, no exception: as abrupt as a lost machine

    def before_collective(self, group_name: str, op: str) -> None:
        for fault in self.mine:
            if fault.kind == "slow" and self.step >= fault.step:
                if fault not in self._slowed:  # record when it began (the monitor's latency)
                    self._slowed.add(fault)
                    self._claim(fault)
                time.sleep(fault.delay)
            elif fault.kind == "hang" and fault.step == self.step and self._claim(fault):
                while True:  # a hung process: alive (its watchdog still beats) but never arrives
                    time.sleep(3600)
