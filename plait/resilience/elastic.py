"""`resilience.mode = elastic`, the worker's side: shrink after a fault and grow again, in place.

Each worker process runs `elastic_train` instead of `train`. The membership of the job is a
sequence of epochs kept in the launcher's store (elastic_launcher.py): epoch e lists the
workers (by launcher-given id) that form the process group of that epoch; a worker's rank is
its place in the list. Per epoch the worker joins a process group on its own store prefix,
builds a Trainer for that world size, with the Resilience hooks and this session's (which
keep the replica and decide to grow after each step), and trains until one of:

- a collective fails (a peer died, or the monitor killed a hung one; the collective timeout
  `parallel.timeout_s` is the backstop): the worker abandons the group, waits for the launcher
  to publish the next epoch without the lost worker, re-forms, and continues from the replica;
- rank 0 sees a registered replacement at a step boundary (grow): it broadcasts the decision,
  publishes the next epoch with the newcomer, and all re-form;
- the run is finished.

The replica: at every `resilience.snapshot_every` steps (and at each epoch's start) every rank
keeps the full, layout-free state (`Trainer.state_files()`, ZeRO shards gathered) in host
memory, so any one survivor can carry the job. After re-forming, the new rank 0 broadcasts its
replica and every rank loads it into the Trainer built for the new world: dp changes, the
global batch and `train.micro_batch` stay, so gradient accumulation absorbs the difference and
the trajectory is that of a fault-free run.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait import config as config_mod
from plait.comm import CHECKPOINT
from plait.config import Config
from plait.errors import PlaitError
from plait.resilience.heartbeat import STORE_ENV, connect_store
from plait.resilience.session import Resilience
from plait.train.hooks import TrainingHooks
from plait.train.runtime import init_runtime
from plait.train.trainer import Trainer

ID_ENV = "PLAIT_ELASTIC_ID"  # this worker's id (stable across epochs), set by the launcher
EPOCH_ENV = "PLAIT_ELASTIC_EPOCH"  # the epoch the worker was started into
JOIN_ENV = "PLAIT_ELASTIC_JOIN"  # "1": a replacement, which joins a running job
NPROC_ENV = "PLAIT_ELASTIC_NPROC"  # the job's initial world size (fixes train.micro_batch)

EPOCH_KEY = "plait/elastic/epoch"  # counter: the newest epoch
MEMBERS_KEY = "plait/elastic/members/{epoch}"  # JSON list of worker ids
FAULT_KEY = "plait/elastic/fault/{epoch}"  # JSON: the fault that ended the previous epoch
FORMED_KEY = "plait/elastic/formed/{epoch}"  # set by rank 0 once the epoch trains
REGISTERED_KEY = "plait/elastic/registered"  # counter of replacements ready to join
REGISTERED_ID_KEY = "plait/elastic/registered/{n}"  # the id of the n-th (1-based)
SPAWNED_KEY = "plait/elastic/spawned"  # counter of replacements the launcher has started


def replica_size(cfg: Config) -> int:
    """Ranks per data-parallel replica (tp x cp x pp): the unit that leaves and joins."""
    return cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.pp


class Regroup(Exception):
    """Raised at a step boundary when the members agreed to re-form for `epoch` (grow)."""

    def __init__(self, epoch: int, joiners: list[int]):
        super().__init__(f"re-forming for epoch {epoch} with {joiners}")
        self.epoch, self.joiners = epoch, joiners


def newest_epoch_with(store: Any, wid: int, after: int, timeout_s: float) -> int | None:
    """The newest epoch > `after` whose members include `wid`; None if none within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:  # looks at least once
        newest = store.add(EPOCH_KEY, 0)
        for epoch in range(newest, after, -1):
            key = MEMBERS_KEY.format(epoch=epoch)
            if store.check([key]) and wid in json.loads(store.get(key)):
                return epoch
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


class ElasticSession(TrainingHooks):
    """This worker's membership across epochs, its replica, and the hooks of each epoch's trainer:
    after each committed step, keep the replica when due and let joiners in."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.run_dir = run_dir
        self.store = connect_store(os.environ[STORE_ENV], timeout_s=max(60.0, cfg.parallel.timeout_s))
        self.wid = int(os.environ[ID_ENV])
        self.snapshot_every = cfg.resilience.snapshot_every
        self.grow_wait_s = cfg.resilience.grow_wait_s
        self.waited_for = 0  # rank 0: replacements (counted as started) already waited for
        self.timeout_s = cfg.parallel.timeout_s
        # train.micro_batch stays what it is on the initial world: accumulation absorbs a smaller dp.
        initial = copy.deepcopy(cfg)
        config_mod.validate(initial, int(os.environ[NPROC_ENV]))
        self.base = copy.deepcopy(cfg)
        self.base.train.micro_batch = initial.train.micro_batch
        self.replica: tuple[int, dict] | None = None  # (step, state files) in host memory
        self.seen_joiners = 0  # rank 0: registrations already acted on
        # Joiners are let in a whole data-parallel replica at a time.
        self.replica_size = replica_size(cfg)
        self.members: list[int] = []

    # --- membership -------------------------------------------------------------------------
    def form(self, epoch: int) -> tuple[int, int, int]:
        """Join the group of `epoch` (or of a newer one that includes this worker, should the
        membership change again meanwhile); returns (epoch, rank, world size)."""
        # Meet in the store first, with room to spare: a survivor may still be leaving the old
        # group (stuck in a collective until parallel.timeout_s), and the group's own rendezvous
        # would time out at parallel.timeout_s.
        deadline = time.monotonic() + 2 * self.timeout_s + 60
        while True:
            self.members = json.loads(self.store.get(MEMBERS_KEY.format(epoch=epoch)))
            arrived = [f"plait/elastic/arrived/{epoch}/{m}" for m in self.members]
            self.store.set(arrived[self.members.index(self.wid)], "1")
            while not self.store.check(arrived):
                newer = newest_epoch_with(self.store, self.wid, epoch, 0.0)
                if newer is not None:  # a member was lost before the group formed
                    epoch = newer
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"epoch {epoch}: members {self.members} did not all arrive")
                time.sleep(0.02)
            else:
                break
        rank, world = self.members.index(self.wid), len(self.members)
        # A fresh prefix per epoch keeps this group's rendezvous off the broken one's keys.
        store = dist.PrefixStore(f"plait/elastic/group-{epoch}", self.store)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=self.timeout_s))
        # What init_runtime and the watchdog read: this epoch's place (generation = epoch, so
        # the monitor tells this group's heartbeats from the last one's).
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world), "TORCHELASTIC_RESTART_COUNT": str(epoch)})
        return epoch, rank, world

    def register(self) -> None:
        """A replacement: say it is ready; rank 0 lets it in at the next step boundary."""
        n = self.store.add(REGISTERED_KEY, 1)
        self.store.set(REGISTERED_ID_KEY.format(n=n), str(self.wid))

    def end_step(self, trainer: Trainer, step: int, step_time_s: float) -> None:
        if self.snapshot_every and step % self.snapshot_every == 0:
            self.keep_replica(trainer)
        if step >= trainer.cfg.train.steps:
            return
        decision = None
        if trainer.rt.is_main:
            count = self._registered_after_waiting()
            count = self.seen_joiners + (count - self.seen_joiners) // self.replica_size * self.replica_size
            if count > self.seen_joiners:
                joiners = [int(self.store.get(REGISTERED_ID_KEY.format(n=n)))
                           for n in range(self.seen_joiners + 1, count + 1)]
                self.seen_joiners = count
                epoch = self.store.add(EPOCH_KEY, 1)
                self.store.set(MEMBERS_KEY.format(epoch=epoch), json.dumps(self.members + joiners))
                decision = (epoch, joiners)
        # Rank 0 decides for all: every member leaves at the same step boundary.
        decision = trainer.comm.broadcast_object(decision, 0, trainer.mesh.world)
        if decision is not None:
            self.keep_replica(trainer)  # the state the newcomers receive: nothing is redone
            raise Regroup(*decision)

    def _registered_after_waiting(self) -> int:
        """Rank 0: the replacements registered so far, after holding the group up to
        `resilience.grow_wait_s` for one the launcher started that is still starting up."""
        count = self.store.add(REGISTERED_KEY, 0)
        spawned = self.store.add(SPAWNED_KEY, 0) if self.grow_wait_s > 0 else 0
        if count >= spawned or self.waited_for >= spawned:  # nothing to wait for, or waited once
            return count
        self.waited_for = spawned
        deadline = time.monotonic() + self.grow_wait_s
        while count < spawned and time.monotonic() < deadline:
            time.sleep(0.05)
            count = self.store.add(REGISTERED_KEY, 0)
        return count

    def keep_replica(self, trainer: Trainer) -> None:
        trainer.hooks.phase("snapshot")  # a gather of the whole state: longer than a step
        self.replica = (trainer.state.step, trainer.state_files())
        trainer.hooks.phase("step")

    # --- state ------------------------------------------------------------------------------
    def load_replica(self, trainer: Trainer) -> int:
        """Rank 0's replica to every rank of the new group, loaded as a checkpoint would be; returns its step."""
        step, files = trainer.comm.broadcast_object(self.replica if trainer.rt.is_main else None, 0,
                                                    trainer.mesh.world, tag=CHECKPOINT)
        trainer.restore(files, f"the replica of step {step}")
        return step


def elastic_train(cfg: Config, run_dir: Path) -> None:
    """This worker's part in an elastic job, across every re-formation, until the run finishes."""
    session = ElasticSession(cfg, run_dir)
    epoch = int(os.environ.get(EPOCH_ENV, "0"))
    fresh = os.environ.get(JOIN_ENV) != "1"  # a fresh start resumes as any run does (disk)
    if not fresh:
        session.register()
        found = newest_epoch_with(session.store, session.wid, epoch - 1, 24 * 3600)
        if found is None:
            return  # the job ended before it could take this worker in
        epoch = found
    change: dict[str, Any] | None = None  # what ended the previous epoch
    while True:
        epoch, rank, world = session.form(epoch)
        epoch_cfg = copy.deepcopy(session.base)
        epoch_cfg.parallel.dp = 0  # the world size over tp x cp x pp (1 here)
        trainer = None
        finished = False
        try:
            trainer = Trainer(epoch_cfg, run_dir, init_runtime(epoch_cfg),
                              hooks=[Resilience(epoch_cfg, run_dir), session])
            if fresh:
                trainer.start()
                fresh = False
            else:
                began = time.time()
                step = session.load_replica(trainer)
                redone = trainer.log.truncate_metrics(step)
                report_change(trainer, session, epoch, change or {}, step, redone, world, began)
            session.keep_replica(trainer)  # every rank (a collective): a newcomer holds none yet
            if trainer.rt.is_main:
                session.store.set(FORMED_KEY.format(epoch=epoch), "1")
            trainer.finish(trainer.fit())
            finished = True
        except Regroup as regroup:
            change = {"reason": "grow", "joiners": regroup.joiners, "world_size_before": world,
                      "committed": trainer.state.step}
            epoch = regroup.epoch
        except Exception as exc:  # a broken group: wait for the launcher's verdict
            if isinstance(exc, PlaitError):  # bad config or data: no membership change helps
                raise
            broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            change = {"reason": "fault", "world_size_before": world,
                      "committed": trainer.state.step if trainer is not None else None}
        finally:
            abandon(trainer)
        if finished:
            return
        # Out of the except block, so that no traceback keeps the old groups (and their sockets)
        # alive: peers still blocked on this rank see the connection close and fail too.
        trainer = None
        gc.collect()
        if change["reason"] == "fault":
            found = newest_epoch_with(session.store, session.wid, epoch, session.timeout_s + 30)
            if found is None or session.replica is None:
                raise RuntimeError(f"rank {rank} of epoch {epoch}: the group broke ({broken}) "
                                   "and no new membership includes this worker")
            print(f"plait: rank {rank} left the broken group of epoch {epoch} ({broken})",
                  file=sys.stderr, flush=True)
            epoch = found


def abandon(trainer: Trainer | None) -> None:
    """Close the trainer (its watchdog and logs) and leave the process group."""
    # Closing what is already broken may fail too; the worker goes on regardless.
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.close()
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def report_change(trainer: Trainer, session: ElasticSession, epoch: int, change: dict, step: int,
                  redone: int, world: int, began: float) -> None:
    """Rank 0 of the new group: the `recovered` (shrink) or `grown` event, on the console too."""
    if not trainer.rt.is_main:
        return
    before = change.get("world_size_before")
    if change.get("reason") == "grow":
        trainer.log.event("grown", joiners=change["joiners"], resumed_step=step,
                          world_size_before=before, world_size_after=world,
                          transfer_time_s=round(time.time() - began, 3))
        trainer.say(f"plait: elastic: world grew {before} -> {world} at step {step}")
        return
    key = FAULT_KEY.format(epoch=epoch)
    fault = json.loads(session.store.get(key)) if session.store.check([key]) else {}
    detected = fault.get("time")
    committed = change.get("committed")
    record = {
        "kind": fault.get("kind", "unknown"), "culprit": fault.get("rank"), "host": fault.get("host"),
        "collateral": fault.get("collateral", []), "detection_latency_s": fault.get("detection_latency_s"),
        "recovery_time_s": round(time.time() - detected, 3) if detected else None,
        "steps_redone": max(redone, (committed or step) - step), "resumed_step": step, "source": "memory",
        "world_size_before": fault.get("world_size", before), "world_size_after": world,
        "mode": "elastic", "epoch": epoch,
    }
    trainer.log.event("recovered", **record)
    print(f"plait: recovered from {record['kind']} of rank {record['culprit']} in place: world "
          f"{record['world_size_before']} -> {world}, resumed at step {step} from memory "
          f"({record['steps_redone']} steps redone), {record['recovery_time_s']} s after detection", flush=True)
