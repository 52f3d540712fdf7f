"""What the trainer does for resilience, in one object with a few calls from the loop:
fault injection, the watchdog, in-memory snapshots, and the record of a recovery.

- `begin_step` / `end_step` bracket each step (injection, heartbeat, snapshots);
- `prefer_snapshot` picks the newest in-memory snapshot over an older disk checkpoint when
  the workers were restarted;
- `resumed` writes the `recovered` event: the fault, detection latency, time to recover,
  steps redone and the world size before and after.

Snapshots are taken only where they can be used: in restart mode under a launcher that
restarts (TORCHELASTIC_MAX_RESTARTS > 0), on one node; the watchdog runs only where a monitor listens
(the launcher's store address in PLAIT_MONITOR_STORE).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plait.config import Config
from plait.mesh import Mesh
from plait.parallel.comm import Comm
from plait.resilience.heartbeat import STORE_ENV, Watchdog, connect_store, generation
from plait.resilience.inject import FaultInjector, parse_faults
from plait.resilience.monitor import FAULT_KEY
from plait.resilience.processes import SNAPSHOT_DIR_ENV
from plait.resilience.snapshot import (
    buddy_rank,
    job_id,
    newest_valid_snapshot,
    remove_empty,
    remove_snapshots,
    snapshot_root,
    snapshot_step,
    write_snapshot,
)
from plait.train.runtime import Runtime

if TYPE_CHECKING:
    from plait.train.trainer import Trainer


class Resilience:
    def __init__(self, cfg: Config, run_dir: Path, rt: Runtime, comm: Comm, mesh: Mesh):
        r = cfg.resilience
        self.cfg, self.rt, self.comm, self.mesh = cfg, rt, comm, mesh
        self.injector = FaultInjector(parse_faults(cfg.fault.inject), rt.rank, run_dir)
        if self.injector.active:
            comm.before_collective.append(self.injector.before_collective)
        self.store: Any = None
        self.watchdog: Watchdog | None = None
        address = os.environ.get(STORE_ENV)
        if r.mode != "none" and address and rt.world_size > 1:
            self.store = connect_store(address)
            self.watchdog = Watchdog(self.store, comm, rt.rank, rt.world_size, r.heartbeat_s, r.slow_window)
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
        # Every rank restores from the path rank 0 chooses, so snapshots serve a one-node job
        # only for now (on several nodes the others could not read rank 0's /dev/shm).
        one_node = rt.world_size == rt.local_world_size
        self.snapshot_every = r.snapshot_every if r.mode == "restart" and restarts > 0 and one_node else 0
        # Under torchrun nobody but the workers can remove the snapshots: they do, on leaving.
        self.own_cleanup = SNAPSHOT_DIR_ENV not in os.environ
        self.root = snapshot_root(run_dir, job_id()) if self.snapshot_every or SNAPSHOT_DIR_ENV in os.environ else None
        self._copy: str | None = None  # "host" / "buddy": the copy this rank writes, if any
        self.buddy = buddy_rank(rt.world_size, rt.local_world_size)
        self._writer: threading.Thread | None = None  # the snapshot being written, if any
        self._written: dict[str, Any] = {}

    # --- the loop ---------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.injector.begin_step(step)
        if self.watchdog is not None:
            self.watchdog.begin_step(step)

    def end_step(self, trainer: Trainer, step: int, step_time_s: float) -> None:
        if self.watchdog is not None:
            self.watchdog.end_step(step, step_time_s)
        every = self.cfg.checkpoint.every
        just_checkpointed = step == self.cfg.train.steps or (every and step % every == 0)
        if self.snapshot_every and step % self.snapshot_every == 0 and not just_checkpointed:
            self.snapshot(trainer)
        self._collect_writer(trainer.log, wait=False)

    def snapshot(self, trainer: Trainer) -> None:
        """Gather the full state (collective) and keep it in shared memory on rank 0 and its buddy."""
        started = time.perf_counter()
        files = trainer.state_files()
        copy = "host" if self.rt.rank == 0 else "buddy" if self.rt.rank == self.buddy else None
        if copy is None:
            return
        self._copy = copy
        self._collect_writer(trainer.log, wait=True)  # one write in flight at a time
        # The gathered tensors are fresh copies, so serialising, hashing and writing them can
        # go on in a thread while training continues: off the step's critical path.
        step, gathered_s = trainer.state.step, time.perf_counter() - started
        self._writer = threading.Thread(target=self._write, args=(copy, step, files, gathered_s),
                                        name="plait-snapshot", daemon=True)
        self._writer.start()

    def _write(self, copy: str, step: int, files: dict, gathered_s: float) -> None:
        started = time.perf_counter()
        try:
            path = write_snapshot(self.root, copy, step, files)
            self._written = {"step": step, "path": str(path), "seconds": round(gathered_s, 4),
                             "write_seconds": round(time.perf_counter() - started, 4)}
        except OSError as exc:  # shared memory full, say: training goes on, the disk checkpoint remains
            self._written = {"step": step, "error": f"{type(exc).__name__}: {exc}"}

    def _collect_writer(self, log: Any, wait: bool) -> None:
        """Log a finished background write (from the main thread: RunLog is not thread-safe)."""
        if self._writer is None or (self._writer.is_alive() and not wait):
            return
        self._writer.join()
        self._writer = None
        written = self._written
        log.event("snapshot_failed" if "error" in written else "snapshot_saved", **written)

    # --- resume -----------------------------------------------------------------------------
    def prefer_snapshot(self, path: Path | None, rejected: list[tuple[Path, str]]
                        ) -> tuple[Path | None, list[tuple[Path, str]], str]:
        """Rank 0: the snapshot to resume from when it is newer than the disk checkpoint `path`.
        Returns (path, rejected copies and checkpoints, "memory" | "disk" | "scratch")."""
        on_disk = "disk" if path is not None else "scratch"  # scratch: nothing saved yet
        if self.root is None or not self.root.is_dir():
            return path, rejected, on_disk
        snapshot, bad = newest_valid_snapshot(self.root)
        disk_step = int(json.loads((path / "manifest.json").read_text())["step"]) if path else 0
        if snapshot is not None and snapshot_step(snapshot) > disk_step:
            return snapshot, bad + rejected, "memory"
        return path, [(p, why) for p, why in bad if snapshot_step(p) > disk_step] + rejected, on_disk

    def resumed(self, log: Any, step: int, steps_redone: int, source: str) -> None:
        """Rank 0, after a restart: what the fault cost, in events.jsonl and on the console."""
        gen = generation()
        if gen == 0 or not self.rt.is_main:
            return
        if step == 0:  # nothing to resume from: every row of the failed attempt is redone
            steps_redone = log.truncate_metrics(0)
        fault: dict[str, Any] = {}
        key = FAULT_KEY.format(generation=gen - 1)
        if self.store is not None and self.store.check([key]):
            fault = json.loads(self.store.get(key))
        detected = fault.get("time")
        now = time.time()
        record = {
            "kind": fault.get("kind", "unknown"), "culprit": fault.get("rank"), "host": fault.get("host"),
            "detection_latency_s": fault.get("detection_latency_s"),
            "recovery_time_s": round(now - detected, 3) if detected else None,
            "steps_redone": steps_redone, "resumed_step": step, "source": source,
            "world_size_before": fault.get("world_size", self.rt.world_size),
            "world_size_after": self.rt.world_size, "restart": gen,
        }
        log.event("recovered", **record)
        print(f"plait: recovered from {record['kind']} of rank {record['culprit']}: resumed at step {step} "
              f"from {source} ({steps_redone} steps redone), "
              f"{record['recovery_time_s']} s after detection", flush=True)

    def close(self, finished: bool) -> None:
        if self._writer is not None:
            self._writer.join()
        if self.watchdog is not None:
            self.watchdog.stop("done" if finished else "failed")
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
        last_generation = generation() >= restarts
        if self.own_cleanup and self.root is not None and self._copy and (finished or last_generation):
            # No later generation will resume from this copy. Each rank removes the copy it
            # wrote (it has joined its own writer), then the job's folder once it is empty.
            remove_snapshots(self.root / self._copy)
            remove_empty(self.root)
