"""`resilience.mode = elastic`, the launcher's side: plait's own small local launcher.

PyTorch's elastic agent stops every worker when one fails, which is the opposite of what
elastic mode wants, so this launcher starts the workers itself (one subprocess each, through
processes.py as launch.py does), hosts the store (a TCPStore on 127.0.0.1 only) and runs the
monitor (monitor.py) as restart mode does. It watches the processes: when a member exits with
an error (it crashed, or the monitor killed it after a hang), it publishes the next epoch
(elastic.py) without the lost worker's whole data-parallel replica (its tp x cp x pp ranks,
which only work together), with the fault record, and the survivors re-form in place at a
smaller dp; the global batch stays, its rows split as evenly as the smaller dp allows. The
lost replica's healthy workers are stopped at once (their peers' collectives with them then
fail now, not at the collective timeout); once the smaller group trains, the launcher starts
a replacement replica (up to `resilience.max_restarts` replicas in all), and rank 0 lets
replacements in, a whole replica at a time, at a step boundary (grow).

Where no smaller world can keep the job (dp would reach 0, the config refuses the smaller
world, or local SGD / compressed gradients keep per-rank state), it falls back to restart
mode and says so (launch.py decides before starting; later, on a fault, this launcher
restarts every worker).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from plait import config as config_mod
from plait.errors import PlaitError
from plait.mesh import ParallelDims
from plait.resilience.elastic import (
    EPOCH_ENV,
    EPOCH_KEY,
    FAULT_KEY,
    FORMED_KEY,
    ID_ENV,
    JOIN_ENV,
    MEMBERS_KEY,
    NPROC_ENV,
    SPAWNED_KEY,
    replica_size,
)
from plait.resilience.inject import fired_faults
from plait.resilience.launcher import ResilienceGuard
from plait.resilience.monitor import FAULT_KEY as MONITOR_FAULT_KEY
from plait.resilience.processes import JobFiles, base_env, spawn_worker, stop_processes
from plait.resilience.usage_errors import noted_status

POLL_S = 0.05


def layout_fallback(cfg: Any, nproc: int) -> str | None:
    """Why this job cannot shrink in place (then it runs in restart mode), or None."""
    if cfg.train.sync != "every_step" or cfg.parallel.grad_compression != "none":
        return f"train.sync={cfg.train.sync} / parallel.grad_compression keep per-rank state"
    checked = copy.deepcopy(cfg)
    config_mod.validate(checked, nproc)
    return world_fallback(cfg, checked.train.micro_batch, nproc - replica_size(cfg))


def world_fallback(cfg: Any, micro_batch: int, world: int) -> str | None:
    """Why the job cannot go on with `world` ranks (micro_batch kept from the initial world), or None."""
    if world < replica_size(cfg):
        return "no whole data-parallel replica left"
    smaller = copy.deepcopy(cfg)
    smaller.parallel.dp = 0  # derived from the world size, as the workers do
    smaller.train.micro_batch = micro_batch
    try:
        config_mod.validate(smaller, world)
    except PlaitError as exc:
        return f"on {world} ranks: {exc}"
    return None


def say_fallback(run_dir: Path, reason: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "events.jsonl").open("a") as f:
        f.write(json.dumps({"event": "elastic_fallback", "time": time.time(), "reason": reason,
                            "mode": "restart"}) + "\n")
    print(f"plait: resilience.mode=elastic cannot shrink this job in place ({reason}): "
          f"falling back to restart mode", file=sys.stderr, flush=True)


class ElasticLauncher:
    def __init__(self, nproc: int, plait_args: list[str], cfg: Any, run_dir: Path, job: JobFiles):
        self.nproc, self.args, self.cfg, self.run_dir, self.job = nproc, plait_args, cfg, run_dir, job
        checked = copy.deepcopy(cfg)
        config_mod.validate(checked, nproc)
        self.micro_batch = checked.train.micro_batch
        self.procs: dict[int, subprocess.Popen] = {}  # workers still running
        self.spawned: dict[int, subprocess.Popen] = {}  # every worker started, exited ones too
        self.guard = ResilienceGuard(cfg, run_dir, nproc, self.worker_pids)
        self.guard.monitor.elastic = True
        self.store = self.guard.store
        self.exit_codes: dict[int, int] = {}
        self.members: list[int] = []
        self.epoch = 0
        self.next_id = 0
        self.replacements = 0  # replicas replaced so far (at most resilience.max_restarts)
        self.fallbacks = 0
        self.replace_after: int | None = None  # start replacements once this epoch trains ...
        self.replace_count = 0  # ... this many (the workers lost)

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the current epoch's members (read by the monitor's thread). A member
        that has exited stays listed until the next epoch leaves it out, so the monitor sees
        it gone (a crash) rather than silent (a hang)."""
        spawned, members = dict(self.spawned), list(self.members)
        return {rank: spawned[wid].pid for rank, wid in enumerate(members) if wid in spawned}

    def spawn(self, epoch: int, join: bool) -> int:
        wid, self.next_id = self.next_id, self.next_id + 1
        # Ranks are the epochs' business (elastic.py), met in the guard's store.
        env = {**base_env(self.job), **self.guard.env(), ID_ENV: str(wid), EPOCH_ENV: str(epoch),
               JOIN_ENV: "1" if join else "0", NPROC_ENV: str(self.nproc), "WORLD_SIZE": str(self.nproc)}
        self.procs[wid] = self.spawned[wid] = spawn_worker(self.args, env)
        return wid

    def publish(self, members: list[int], fault: dict | None) -> int:
        epoch = self.store.add(EPOCH_KEY, 1)
        if fault is not None:
            self.store.set(FAULT_KEY.format(epoch=epoch), json.dumps(fault))
        self.store.set(MEMBERS_KEY.format(epoch=epoch), json.dumps(members))
        self.members, self.epoch = members, epoch
        return epoch

    def run(self) -> int:
        self.guard.start()
        try:
            self.store.add(EPOCH_KEY, 0)
            self.members = [self.spawn(0, join=False) for _ in range(self.nproc)]
            self.store.set(MEMBERS_KEY.format(epoch=0), json.dumps(self.members))
            return self.watch()
        finally:
            self.guard.stop()  # first: the workers stopped below are not faults
            stop_processes(list(self.procs.values()))

    def watch(self) -> int:
        while True:
            time.sleep(POLL_S)
            self.follow_growth()
            if self.replace_after is not None and self.store.check([FORMED_KEY.format(epoch=self.replace_after)]):
                self.replace_after = None
                self.replacements += 1
                for _ in range(self.replace_count):
                    wid = self.spawn(self.epoch, join=True)
                    self.store.add(SPAWNED_KEY, 1)  # lets resilience.grow_wait_s hold the group for it
                    print(f"plait: elastic: started replacement worker {wid}", file=sys.stderr, flush=True)
            for wid, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.procs[wid]
                self.exit_codes[wid] = code
                noted = noted_status()
                if noted is not None:
                    return noted  # a usage or environment error (or an interrupt): the worker said why
                if code != 0 and wid in self.members:
                    self.follow_growth()
                    if not self.shrink(wid, code):
                        return 1
            if all(self.exit_codes.get(m) == 0 for m in self.members):
                return 0  # finished (a replacement still waiting to join is stopped)

    def follow_growth(self) -> None:
        """Rank 0 publishes the epochs that let replacements in: keep the member list current."""
        newest = self.store.add(EPOCH_KEY, 0)
        key = MEMBERS_KEY.format(epoch=newest)
        if newest > self.epoch and self.store.check([key]):
            self.members, self.epoch = json.loads(self.store.get(key)), newest

    def replicas(self) -> list[list[int]]:
        """The current members (worker ids) grouped by data-parallel replica."""
        world = len(self.members)
        p = self.cfg.parallel
        dims = ParallelDims(dp=world // replica_size(self.cfg), tp=p.tp, cp=p.cp, pp=p.pp)
        return [[self.members[r] for r in ranks] for ranks in dims.group_ranks("tp", "cp", "pp")]

    def shrink(self, wid: int, code: int) -> bool:
        rank, world = self.members.index(wid), len(self.members)
        fault = self.fault_record(rank, code)
        alive = {m for m in self.members if m in self.procs and self.procs[m].poll() is None}
        # Only whole replicas go on. The healthy workers of a replica that lost one are stopped
        # at once rather than kept: their survivors' collectives with them then fail now, not
        # at the collective timeout, and replacements take their place a replica at a time.
        kept = [r for r in self.replicas() if all(m in alive for m in r)]
        survivors = sorted((m for r in kept for m in r), key=self.members.index)
        reason = world_fallback(self.cfg, self.micro_batch, len(survivors))
        if reason is None:
            orphans = [m for m in self.members if m in alive and m not in survivors]
            for orphan in orphans:
                self.procs.pop(orphan).kill()  # SIGKILL: no interrupt note, no goodbye
            fault["world_size"] = world
            epoch = self.publish(survivors, fault)
            print(f"plait: elastic: worker {wid} (rank {rank}) exited with code {code}; "
                  f"{len(survivors)} workers go on (epoch {epoch})"
                  + (f"; stopped {len(orphans)} other worker(s) of its replica" if orphans else ""),
                  file=sys.stderr, flush=True)
            if self.replacements < self.cfg.resilience.max_restarts:
                self.replace_after, self.replace_count = epoch, world - len(survivors)
            return True
        # Restart mode: every worker anew, resuming from the newest disk checkpoint.
        if self.fallbacks >= self.cfg.resilience.max_restarts:
            return False
        self.fallbacks += 1
        say_fallback(self.run_dir, reason)
        stop_processes([self.procs.pop(m) for m in alive])
        epoch = self.store.add(EPOCH_KEY, 0) + 1
        # Where restarted workers look for the fault that made them (Resilience.resumed).
        self.store.set(MONITOR_FAULT_KEY.format(generation=epoch - 1), json.dumps({**fault, "world_size": world}))
        fresh = [self.spawn(epoch, join=False) for _ in range(self.nproc)]
        self.publish(fresh, {**fault, "world_size": world})
        return True

    def fault_record(self, rank: int, code: int) -> dict:
        """The monitor's verdict for this epoch if it has one (it tells a hang from a crash), else ours."""
        key = MONITOR_FAULT_KEY.format(generation=self.epoch)
        deadline = time.monotonic() + self.guard.verdict_wait_s
        while time.monotonic() < deadline:
            if self.store.check([key]):
                return json.loads(self.store.get(key))
            time.sleep(POLL_S)
        now = time.time()
        fired = [f for f in fired_faults(self.run_dir) if f.get("rank") == rank]
        latency = round(now - fired[-1]["time"], 3) if fired else None
        return {"kind": "crash", "rank": rank, "time": now, "detection_latency_s": latency,
                "detail": f"exit code {code}"}
