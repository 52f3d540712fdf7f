"""Judging a failed worker group under torchrun after the fact (plait/resilience/cluster.py),
from its last heartbeats in the agents' store: a crash names the rank that never arrived, a
host whose ranks all vanished is `node_lost`, and a group the agents stopped because a node
joined is no fault at all. The two-node rehearsals (tests/test_two_nodes.py, soak) show the same
end to end; these run in milliseconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from plait.resilience.cluster import WORLD_KEY, group_store, node_joined, post_mortem
from plait.resilience.heartbeat import KEY

HOSTS = ["node-a", "node-a", "node-b", "node-b"]


def beat(rank: int, state: str, entered: int, waiting_in: int | None = None) -> dict:
    """Rank `rank`'s last heartbeat: it entered `entered` collectives of the world group and,
    with `waiting_in`, was waiting in that one (which the others may never have entered)."""
    inflight = None
    if waiting_in is not None:
        inflight = {"group": "world", "ranks": [0, 1, 2, 3], "seq": waiting_in, "op": "all_reduce", "waiting_s": 0.4}
    return {"rank": rank, "world_size": 4, "host": HOSTS[rank], "pid": 1000 + rank, "generation": 0,
            "state": state, "time": time.time(), "step": 12, "training": True, "phase": "step",
            "steps_done": 12, "entered": {"world": entered}, "completed": {"world": entered - 1},
            "inflight": inflight, "steps": [], "last": ["world", "all_reduce", entered - 1]}


def store_with(group: int, beats: list[dict]) -> dist.Store:
    store = dist.HashStore()
    scoped = group_store(store, group)
    scoped.set(WORLD_KEY, json.dumps({"world_size": 4, "hosts": HOSTS}))
    for b in beats:
        scoped.set(KEY.format(rank=b["rank"]), json.dumps(b))
    return store


def test_a_crash_is_pinned_on_the_rank_that_never_arrived(tmp_path: Path):
    # Rank 3 died abruptly before collective 8; the others failed waiting in it; its node-mate
    # rank 2 was stopped by its agent.
    store = store_with(1, [beat(0, "failed", 8, 8), beat(1, "failed", 8, 8), beat(2, "stopped", 8, 8),
                           beat(3, "running", 7)])
    record = post_mortem(store, 1, tmp_path, HOSTS)
    assert (record["kind"], record["rank"], record["host"]) == ("crash", 3, "node-b")
    assert record["collateral"] == [0, 1, 2]
    assert node_joined(store, 1, HOSTS) is None


def test_a_host_whose_ranks_all_vanished_is_a_lost_node(tmp_path: Path):
    store = store_with(1, [beat(0, "failed", 8, 8), beat(1, "failed", 8, 8), beat(2, "running", 7),
                           beat(3, "running", 7)])
    record = post_mortem(store, 1, tmp_path, ["node-a", "node-a"])
    assert (record["kind"], record["host"], record["ranks"]) == ("node_lost", "node-b", [2, 3])
    assert record["collateral"] == [0, 1] and record["rejoined"] is False
    assert node_joined(store, 1, ["node-a", "node-a"]) is None


def test_a_group_stopped_for_a_joining_node_is_no_fault(tmp_path: Path):
    # World 2 on node-a, stopped by its agent (SIGTERM) because node-b came back; one rank saw
    # its peer go first and failed in the collective: still no abrupt death.
    store = dist.HashStore()
    scoped = group_store(store, 3)
    scoped.set(WORLD_KEY, json.dumps({"world_size": 2, "hosts": ["node-a", "node-a"]}))
    for rank, state in ((0, "stopped"), (1, "failed")):
        b = beat(rank, state, 8, 8 if state == "failed" else None)
        b["world_size"] = 2
        scoped.set(KEY.format(rank=rank), json.dumps(b))
    change = node_joined(store, 3, HOSTS)
    assert change is not None
    assert (change["hosts_joined"], change["joiners"], change["world_size_before"]) == (["node-b"], [2, 3], 2)


def test_a_join_with_an_abrupt_death_is_judged_as_a_fault(tmp_path: Path):
    store = dist.HashStore()
    scoped = group_store(store, 3)
    scoped.set(WORLD_KEY, json.dumps({"world_size": 2, "hosts": ["node-a", "node-a"]}))
    for rank, state, entered in ((0, "failed", 8), (1, "running", 7)):
        b = beat(rank, state, entered, 8 if state == "failed" else None)
        b["world_size"] = 2
        b["inflight"] = b["inflight"] and {**b["inflight"], "ranks": [0, 1]}
        scoped.set(KEY.format(rank=rank), json.dumps(b))
    assert node_joined(store, 3, HOSTS) is None
    record = post_mortem(store, 3, tmp_path, HOSTS)
    assert (record["kind"], record["rank"]) == ("crash", 1)


def test_a_clean_finish_is_neither(tmp_path: Path):
    store = store_with(2, [beat(r, "done", 9) for r in range(4)])
    assert post_mortem(store, 2, tmp_path, HOSTS) is None
    assert node_joined(store, 2, HOSTS) is None  # nobody joined
