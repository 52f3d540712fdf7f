"""Fault detection under torchrun, where plait has no launcher of its own to host a monitor.

torch's elastic agent (one per node) restarts every worker when one fails, and re-forms the
job with the nodes that answer its rendezvous (`--nnodes MIN:MAX`): fewer after a node is
lost, more when one comes back. What it cannot do is say which rank failed and why. So:

- every worker group gets a number from the agents' store (the rendezvous host's TCPStore,
  which every worker reaches as MASTER_ADDR:MASTER_PORT and which outlives the workers): rank
  0 counts it up and broadcasts it. Heartbeats go under that group's prefix, with the group's
  world size and each rank's host label beside them;
- hangs are judged live, inside the workers: each rank's watchdog thread reads the group's
  heartbeats and, if it finds that it is itself the member the others have waited for past
  the hang threshold (monitor.HangRule), records the verdict and ends its own process, which
  its agent sees as a failure (only a process can end itself on another node). Rank 0's
  watchdog also reports slow ranks;
- crashes and lost nodes are judged after the fact, by rank 0 of the next group, from the
  last heartbeats of the failed group: the culprit is the rank that never arrived where the
  others failed waiting (monitor.find_crash); when every rank of one host died without a
  word, the host is reported as `node_lost` with its ranks;
- a group the agents stopped because a node joined (every rank says "stopped", from its
  SIGTERM handler, and every host stayed) is no fault: the next group reports `grown`.

The store lives in the agent of the rendezvous host: losing that node ends the job (torch's
limit too); losing any other node is survived.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from plait.comm import Comm, Group
from plait.resilience.heartbeat import KEY, STORE_ENV
from plait.resilience.inject import fired_faults
from plait.resilience.monitor import HangRule, Verdict, abrupt, find_crash, find_hang, find_slow, parse_heartbeat
from plait.resilience.processes import host_label
from plait.resilience.sentinel import JOB_ENV

GROUPS_KEY = "groups"  # counter: the newest worker group
GROUP_PREFIX = "group-{group}/"
WORLD_KEY = "world"  # under a group's prefix: {"world_size", "hosts"}
FAULT_KEY = "fault"  # under a group's prefix: a hang verdict written by the hung rank itself
HANG_EXIT_CODE = 44


def under_torchrun() -> bool:
    """A worker of torch's elastic agent (torchrun), not of plait's own launcher."""
    env = os.environ
    ours = STORE_ENV in env or JOB_ENV in env  # plait's launchers say so
    return not ours and "TORCHELASTIC_RUN_ID" in env and "MASTER_ADDR" in env


def cluster_store(timeout_s: float) -> Any:
    """The agents' store, under a prefix of this job's own."""
    env = os.environ
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"plait/{env['TORCHELASTIC_RUN_ID']}/", store)


def join_group(store: Any, comm: Comm, world: Group) -> tuple[int, list[str]]:
    """This worker group's number (collective): 1 for the first, counted up by every restart;
    and every rank's host label."""
    group = store.add(GROUPS_KEY, 1) if world.rank == 0 else None
    group = comm.broadcast_object(group, 0, world)
    hosts = comm.all_gather_object(host_label(), world)
    if world.rank == 0:
        group_store(store, group).set(WORLD_KEY, json.dumps({"world_size": world.size, "hosts": hosts}))
    return group, hosts


def group_store(store: Any, group: int) -> Any:
    return dist.PrefixStore(GROUP_PREFIX.format(group=group), store)


def read_group(store: Any, group: int) -> tuple[dict, dict[int, dict]] | None:
    """A group's world ({"world_size", "hosts"}) and its ranks' last heartbeats, if it ever formed."""
    scoped = group_store(store, group)
    if group < 1 or not scoped.check([WORLD_KEY]):
        return None
    world = json.loads(scoped.get(WORLD_KEY))
    beats = {}
    for rank in range(world["world_size"]):
        key = KEY.format(rank=rank)
        if scoped.check([key]):
            beat = parse_heartbeat(scoped.get(key), rank)
            if beat is not None:
                beats[rank] = beat
    return world, beats


class PeerJudge:
    """Runs in a rank's watchdog thread after each heartbeat: names this rank hung (and ends
    it) when the others have waited for it past the threshold; rank 0 also names slow ranks."""

    def __init__(self, store: Any, group: int, rank: int, rule: HangRule, slow: tuple, run_dir: Path,
                 every_s: float):
        self.store, self.group, self.rank, self.rule, self.slow = store, group, rank, rule, slow
        self.run_dir, self.every_s = run_dir, every_s
        self.next_at = 0.0
        self.slow_reported: set[int] = set()

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.every_s
        found = read_group(self.store, self.group)
        if found is None:
            return
        _, beats = found
        beats = {r: b for r, b in beats.items() if b.get("state") == "running"}
        verdict = find_hang(beats, time.time(), rule=self.rule)
        if verdict is not None and verdict.rank == self.rank:
            verdict.collateral = verdict.waiting_ranks
            record = record_of(verdict, time.time(), self.run_dir, action="restart")
            group_store(self.store, self.group).compare_set(FAULT_KEY, "", json.dumps(record))
            say_verdict(record)
            os._exit(HANG_EXIT_CODE)  # this process is the hung one: end it, and the agent restarts all
        if self.rank == 0:
            for slow in find_slow(beats, *self.slow):
                if slow.rank not in self.slow_reported:
                    self.slow_reported.add(slow.rank)
                    record = record_of(slow, time.time(), self.run_dir, action="reported")
                    append_event(self.run_dir, record)
                    say_verdict(record)


def onset_of(verdict: Verdict, run_dir: Path) -> float | None:
    """When an injected fault of this kind and rank fired (its marker), else the estimate."""
    fired = [f for f in fired_faults(run_dir) if f.get("rank") == verdict.rank and f.get("kind") == verdict.kind]
    return fired[-1]["time"] if fired else verdict.onset


def record_of(verdict: Verdict, detected: float, run_dir: Path, action: str, **extra: Any) -> dict:
    """The `fault_detected` event of a verdict."""
    onset = onset_of(verdict, run_dir)
    fields = {k: v for k, v in vars(verdict).items() if k != "onset"}
    return {"event": "fault_detected", "time": detected, **fields,
            "detection_latency_s": None if onset is None else round(max(0.0, detected - onset), 3),
            "action": action, **extra}


def append_event(run_dir: Path, record: dict) -> None:
    with (run_dir / "events.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def say_verdict(record: dict) -> None:
    """The console line of a `fault_detected` record judged after the fact."""
    latency = record.get("detection_latency_s")
    collateral = record.get("collateral") or []
    what = (f"node {record.get('host')} lost (ranks {record.get('ranks')})" if record.get("kind") == "node_lost"
            else f"{record.get('kind')} of rank {record.get('rank')} (host {record.get('host')})")
    print(f"plait: fault detected: {what} at step {record.get('step')}: {record.get('detail')}"
          + (f"; detected {latency:.2f} s after it began" if latency else "")
          + (f"; ranks {collateral} failed in its wake" if collateral else ""), file=sys.stderr, flush=True)


def node_joined(store: Any, group: int, hosts_now: list[str]) -> dict | None:
    """Whether worker group `group` ended because the agents re-formed the job for a node that
    joined (torch restarts a healthy group for that), not because of a fault: every host stayed,
    at least one is new, and every rank left through a signal or a clean exit, none abruptly.
    Returns the change: the hosts that joined, the new group's ranks on them, the world before."""
    found = read_group(store, group)
    if found is None:
        return None
    world, beats = found
    joined = [h for h in dict.fromkeys(hosts_now) if h not in world["hosts"]]
    stayed = all(h in hosts_now for h in world["hosts"])
    if not joined or not stayed or len(beats) < world["world_size"]:
        return None
    if any(abrupt(b) for b in beats.values()) or not any(b.get("state") == "stopped" for b in beats.values()):
        return None
    return {"hosts_joined": joined, "joiners": [r for r, h in enumerate(hosts_now) if h in joined],
            "world_size_before": world["world_size"], "stopped_at": max(b["time"] for b in beats.values())}


def post_mortem(store: Any, group: int, run_dir: Path, hosts_now: list[str]) -> dict | None:
    """Rank 0 of group `group` + 1: the fault that ended `group`, as a `fault_detected` record
    (None when that group did not fail, or never formed)."""
    found = read_group(store, group)
    if found is None:
        return None
    world, beats = found
    scoped = group_store(store, group)
    if scoped.check([FAULT_KEY]):  # a hang, named live by the hung rank itself
        return {**json.loads(scoped.get(FAULT_KEY)), "world_size": world["world_size"]}
    failed = [r for r, b in sorted(beats.items()) if b.get("state") != "done"]
    missing = [r for r in range(world["world_size"]) if r not in beats]
    if not failed and not missing:
        return None
    verdict = find_crash(beats, failed, time.time()) if failed else None
    # The survivors saw it when their collectives failed: their last heartbeats' time.
    seen = [b["time"] for b in beats.values() if b.get("state") == "failed"]
    detected = min(seen) if seen else time.time()
    extra: dict[str, Any] = {"world_size": world["world_size"], "worker_group": group}
    if verdict is None:
        return None
    host = world["hosts"][verdict.rank] if verdict.rank < len(world["hosts"]) else verdict.host
    on_host = [r for r, h in enumerate(world["hosts"]) if h == host]
    silent = [r for r in on_host if r in missing or (r in beats and abrupt(beats[r]))]
    if len(on_host) > 1 and silent == on_host:
        # Every rank of one host died without a word: the node went, not a process.
        verdict.kind = "node_lost"
        verdict.detail = f"every rank of host {host} ({on_host}) stopped at once"
        verdict.collateral = [r for r in verdict.collateral if r not in on_host]
        extra["ranks"] = on_host
        extra["rejoined"] = host in hosts_now
    verdict.host = host
    return record_of(verdict, detected, run_dir, action="restart", **extra)
