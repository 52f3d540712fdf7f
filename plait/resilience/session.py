"""What a worker does for resilience, as hooks of the training loop (plait.train.hooks):
fault injection, the watchdog, in-memory snapshots, and the record of a recovery.

- `attach` puts the fault injector and the watchdog on the trainer's collectives;
- `begin_step` / `end_step` bracket each step (injection, heartbeat, snapshots);
- `choose_resume` (`prefer_snapshot`) picks the newest in-memory snapshot over an older disk
  checkpoint when the workers were restarted;
- `resumed` writes the `recovered` event: the fault, detection latency, time to recover,
  steps redone and the world size before and after;
- `close` stops the watchdog and removes snapshots nobody will resume from.

Snapshots are taken only where they can be used: in restart mode under a launcher that
restarts (TORCHELASTIC_MAX_RESTARTS > 0), on one node; the watchdog runs only where a monitor listens
(the launcher's store address in PLAIT_MONITOR_STORE).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from plait.config import Config
from plait.resilience.cluster import (
    PeerJudge,
    cluster_store,
    group_store,
    join_group,
    node_joined,
    post_mortem,
    say_verdict,
    under_torchrun,
)
from plait.resilience.heartbeat import STORE_ENV, Watchdog, connect_store, generation
from plait.resilience.inject import FaultInjector, parse_faults
from plait.resilience.monitor import FAULT_KEY, HangRule
from plait.resilience.node_snapshot import complete_node_snapshots, write_node_snapshot
from plait.resilience.processes import SNAPSHOT_DIR_ENV
from plait.resilience.snapshot import (
    KEEP,
    job_id,
    newest_valid_snapshot,
    prepare_snapshot_root,
    remove_empty,
    remove_snapshots,
    snapshot_root,
    snapshot_step,
)
from plait.train import checkpoint as ckpt
from plait.train.hooks import Rejected, TrainingHooks
from plait.train.sharded import write_sharded_checkpoint
from plait.train.trainer import Trainer


class Resilience(TrainingHooks):
    """The resilience of one trainer: pass it to `Trainer(..., hooks=[...])`, which attaches it."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.store: Any = None
        self.watchdog: Watchdog | None = None
        self.group: int | None = None  # under torchrun: this worker group's number (cluster.py)
        self.snapshot_every = 0  # what attach() finds possible
        self.root: Path | None = None  # the job's snapshot folder, if it has one
        # Under torchrun nobody but the workers can remove the snapshots: they do, on leaving.
        self.own_cleanup = SNAPSHOT_DIR_ENV not in os.environ
        self._copy: str | None = None  # "host": the copy this rank commits and removes, if any
        self._written: dict[str, Any] = {}  # the last snapshot, for the event log

    def attach(self, trainer: Trainer) -> None:
        """Fault injection and the watchdog on the trainer's collectives; where snapshots go."""
        cfg, r, rt, comm = self.cfg, self.cfg.resilience, trainer.rt, trainer.comm
        self.rt = rt
        self.injector = FaultInjector(parse_faults(cfg.fault.inject), rt.rank, self.run_dir)
        if self.injector.active:
            comm.before_collective.append(self.injector.before_collective)
        address = os.environ.get(STORE_ENV)
        if r.mode != "none" and address and rt.world_size > 1:
            self.store = connect_store(address)
            self.watchdog = Watchdog(self.store, comm, rt.rank, rt.world_size, r.heartbeat_s, r.slow_window)
        elif r.mode != "none" and rt.world_size > 1 and under_torchrun():
            self.attach_to_cluster(trainer)
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
        self.snapshot_every = r.snapshot_every if r.mode == "restart" and restarts > 0 else 0
        self.root = (snapshot_root(self.run_dir, job_id()) if self.snapshot_every or SNAPSHOT_DIR_ENV in os.environ
                     else None)
        # Several nodes: each keeps its snapshots in its own memory, with a copy of its buddy
        # node's; after a restart, the newest snapshot is made whole on every node first.
        self.multi_node = rt.world_size > rt.local_world_size
        if self.multi_node and self.root is not None:
            complete_node_snapshots(self.root, comm, trainer.mesh.world, rt.local_rank)

    def attach_to_cluster(self, trainer: Trainer) -> None:
        """Under torchrun: heartbeats in the agents' store, under this worker group's number,
        and the judge that names a hung rank from inside it (cluster.py)."""
        r, rt = self.cfg.resilience, trainer.rt
        self.cluster = cluster_store(max(60.0, self.cfg.parallel.timeout_s))
        self.group, self.hosts = join_group(self.cluster, trainer.comm, trainer.mesh.world)
        judge = PeerJudge(self.cluster, self.group, rt.rank, HangRule.from_config(self.cfg),
                          (r.slow_k, r.slow_window, r.slow_min_fraction, r.slow_min_s), self.run_dir,
                          every_s=max(r.heartbeat_s, 0.5))
        self.store = group_store(self.cluster, self.group)
        self.watchdog = Watchdog(self.store, trainer.comm, rt.rank, rt.world_size, r.heartbeat_s, r.slow_window,
                                 judge=judge)
        signal.signal(signal.SIGTERM, self.stopped_by_agent)

    def stopped_by_agent(self, signum: int, frame: Any) -> None:
        """SIGTERM under torchrun: the agent is stopping this worker group, for a membership
        change (a node joined) or because a peer failed. The last heartbeat says so ("stopped",
        not a crash) before the process ends by the signal, as it would have without this."""
        if self.watchdog is not None:
            self.watchdog.stop_at_once("stopped")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

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

    def phase(self, name: str) -> None:
        if self.watchdog is not None:
            self.watchdog.set_phase(name)

    def snapshot(self, trainer: Trainer) -> None:
        """Every rank writes its own pieces of the state into the job's shared-memory folder, as
        a sharded checkpoint (collective): no rank gathers the model. Rank 0 commits it."""
        self.phase("snapshot")
        try:
            self._snapshot(trainer)
        finally:
            self.phase("step")

    def _snapshot(self, trainer: Trainer) -> None:
        started = time.perf_counter()
        step = trainer.state.step
        leader = self.rt.local_rank == 0 if self.multi_node else self.rt.is_main
        if leader:
            self._copy = "host"  # the node's copy; its first rank removes it when done
            prepare_snapshot_root(self.root)
        files = trainer.small_files()  # collective
        mine = files if self.rt.is_main else {}
        try:
            if self.multi_node:
                path = write_node_snapshot(self.root, step, trainer.parallel.state_pieces(), mine, trainer.comm,
                                           trainer.mesh.world, self.rt.local_rank, self.rt.local_world_size,
                                           trainer.own_files())
            else:
                path = write_sharded_checkpoint(self.root / "host", step, trainer.parallel.state_pieces(), mine,
                                                trainer.comm, trainer.mesh.world, trainer.own_files())
            if leader:
                ckpt.prune(self.root / "host", KEEP)
            self._written = {"step": step, "path": str(path), "seconds": round(time.perf_counter() - started, 4)}
        except OSError as exc:  # shared memory full, say: training goes on, the disk checkpoint remains
            self._written = {"step": step, "error": f"{type(exc).__name__}: {exc}"}
        self._collect_writer(trainer.log, wait=True)

    def _collect_writer(self, log: Any, wait: bool) -> None:
        """Log the snapshot just written, if any (rank 0's log is the one that writes)."""
        if not self._written:
            return
        written, self._written = self._written, {}
        log.event("snapshot_failed" if "error" in written else "snapshot_saved", **written)

    # --- resume -----------------------------------------------------------------------------
    def choose_resume(self, path: Path | None, rejected: Rejected, source: str
                      ) -> tuple[Path | None, Rejected, str]:
        return self.prefer_snapshot(path, rejected)  # which tells "disk" from "scratch" itself

    def prefer_snapshot(self, path: Path | None, rejected: Rejected) -> tuple[Path | None, Rejected, str]:
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

    def locate(self, path: Path) -> Path:
        """A snapshot rank 0 chose, in this node's own memory (same folder name on every node)."""
        if self.root is not None and path.parent.name == "host" and path.parent.parent.name == self.root.name:
            return self.root / "host" / path.name
        return path

    def resumed(self, trainer: Trainer, steps_redone: int, source: str) -> None:
        """Rank 0, after a restart: what the fault cost, in events.jsonl and on the console."""
        log, step = trainer.log, trainer.state.step
        cluster = self.group is not None
        gen = self.group - 1 if cluster else generation()
        if gen == 0 or not self.rt.is_main:
            return
        if step == 0:  # nothing to resume from: every row of the failed attempt is redone
            steps_redone = log.truncate_metrics(0)
        fault: dict[str, Any] = {}
        key = FAULT_KEY.format(generation=gen - 1)
        joined = node_joined(self.cluster, self.group - 1, self.hosts) if cluster else None
        if joined is not None:  # no fault: the agents re-formed the job for a node that joined
            log.event("grown", joiners=joined["joiners"], hosts_joined=joined["hosts_joined"], resumed_step=step,
                      world_size_before=joined["world_size_before"], world_size_after=self.rt.world_size,
                      transfer_time_s=round(time.time() - joined["stopped_at"], 3), steps_redone=steps_redone,
                      source=source, worker_group=self.group)
            trainer.say(f"plait: elastic: world grew {joined['world_size_before']} -> {self.rt.world_size} at "
                        f"step {step} ({', '.join(joined['hosts_joined'])} joined; {steps_redone} steps redone)")
            return
        if cluster:  # under torchrun: judged now, from the failed group's last heartbeats
            fault = post_mortem(self.cluster, self.group - 1, self.run_dir, self.hosts) or {}
            if fault:
                log.event("fault_detected", **{k: v for k, v in fault.items() if k not in ("event", "time")},
                          detected_at=fault.get("time"))
                say_verdict(fault)
        elif self.store is not None and self.store.check([key]):
            fault = json.loads(self.store.get(key))
        detected = fault.get("time")
        now = time.time()
        record = {
            "kind": fault.get("kind", "unknown"), "culprit": fault.get("rank"), "host": fault.get("host"),
            "collateral": fault.get("collateral", []), "detection_latency_s": fault.get("detection_latency_s"),
            "recovery_time_s": round(now - detected, 3) if detected else None,
            "steps_redone": steps_redone, "resumed_step": step, "source": source,
            "world_size_before": fault.get("world_size", self.rt.world_size),
            "world_size_after": self.rt.world_size, "restart": gen,
        }
        if "ranks" in fault:  # a lost node: its ranks
            record["ranks"] = fault["ranks"]
        log.event("recovered", **record)
        print(f"plait: recovered from {record['kind']} of rank {record['culprit']}: resumed at step {step} "
              f"from {source} ({steps_redone} steps redone), "
              f"{record['recovery_time_s']} s after detection", flush=True)

    def close(self, finished: bool) -> None:
        if self.watchdog is not None:
            self.watchdog.stop("done" if finished else "failed")
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
        last_generation = generation() >= restarts
        if self.own_cleanup and self.root is not None and self._copy and (finished or last_generation):
            # No later generation will resume from this copy. Each rank removes the copy it
            # wrote (it has joined its own writer), then the job's folder once it is empty.
            remove_snapshots(self.root / self._copy)
            remove_empty(self.root)
