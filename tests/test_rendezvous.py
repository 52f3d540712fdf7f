"""`--rdzv-backend plait-c10d` (plait/resilience/rendezvous.py): a node that joins a running
job finds the agents' store, and every worker group gets a number all agents agree on.

Two rendezvous handlers in one process stand for two nodes' agents: node A forms the job alone
(`--nnodes 1:2`), then node B joins, and A re-forms with it as torch's agent does when it sees a
node waiting. With torch's own c10d handler B waits for an address A never publishes again.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from plait.resilience.rehearsal import free_port
from plait.resilience.rendezvous import BACKEND_NAME, RepublishingRendezvous
from plait.train.runtime import WORKER_GROUP_KEY, worker_group

pytestmark = pytest.mark.timeout(120)

FAST = {"last_call_timeout": 1, "join_timeout": 30, "keep_alive_interval": 1, "close_timeout": 5, "read_timeout": 5}


def handler(backend: str, port: int, host: bool):
    params = RendezvousParameters(backend=backend, endpoint=f"127.0.0.1:{port}", run_id="job", min_nodes=1,
                                  max_nodes=2, is_host=host, **FAST)
    return get_rendezvous_handler(params)


def in_parallel(*calls):
    """Run each call in its own thread (each agent blocks in the rendezvous); results or errors."""
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def the_store(info) -> dist.TCPStore:
    address = info.bootstrap_store_info
    return dist.TCPStore(address.master_addr, address.master_port, is_master=False, wait_for_workers=False,
                         timeout=timedelta(seconds=5))


def test_the_backend_is_registered_with_torchrun():
    node = handler(BACKEND_NAME, free_port(), host=True)
    try:
        assert isinstance(node, RepublishingRendezvous) and node.get_backend() == BACKEND_NAME
    finally:
        node.shutdown()


def test_a_node_that_joins_a_running_job_finds_the_store_and_the_group_number():
    port = free_port()
    a = handler(BACKEND_NAME, port, host=True)
    try:
        first = a.next_rendezvous()  # node A alone
        assert (first.rank, first.world_size) == (0, 1)
        assert worker_group(the_store(first), "job") == 1
        b = handler(BACKEND_NAME, port, host=False)
        try:
            joined = in_parallel(b.next_rendezvous, lambda: (wait_for_waiting(a), a.next_rendezvous())[1])
            b_info, a_info = joined
            assert not isinstance(b_info, Exception), b_info
            assert not isinstance(a_info, Exception), a_info
            assert {a_info.rank, b_info.rank} == {0, 1} and a_info.world_size == b_info.world_size == 2
            # both agents hand their workers the same store: the one A hosts
            assert (b_info.bootstrap_store_info.master_addr, b_info.bootstrap_store_info.master_port) == \
                (a_info.bootstrap_store_info.master_addr, a_info.bootstrap_store_info.master_port)
            assert worker_group(the_store(b_info), "job") == 2  # the second worker group, for everyone
        finally:
            b.shutdown()
    finally:
        a.shutdown()


def wait_for_waiting(agent) -> None:
    """As torch's agent does: re-form once a node is waiting to join."""
    for _ in range(300):
        if agent.num_nodes_waiting() > 0:
            return
        threading.Event().wait(0.1)
    raise AssertionError("node B never showed up as waiting")


def test_torchs_own_c10d_handler_still_leaves_the_joining_node_waiting():
    """The fault plait-c10d works around; when this fails, torch fixed it and plait's backend
    can go (see plait/resilience/rendezvous.py)."""
    port = free_port()
    a = handler("c10d", port, host=True)
    try:
        a.next_rendezvous()
        b = handler("c10d", port, host=False)
        try:
            b_info, a_info = in_parallel(b.next_rendezvous, lambda: (wait_for_waiting(a), a.next_rendezvous())[1])
            assert not isinstance(a_info, Exception)
            assert isinstance(b_info, Exception) and "MASTER_ADDR" in str(b_info), b_info  # never published
        finally:
            b.shutdown()
    finally:
        a.shutdown()


def test_worker_group_is_none_without_the_backend():
    store = dist.HashStore()
    assert worker_group(store, "job") is None
    store.set(WORKER_GROUP_KEY.format(run_id="job"), b"7")
    assert worker_group(store, "job") == 7 and worker_group(store, "") is None
