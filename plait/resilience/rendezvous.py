"""`--rdzv-backend plait-c10d`: torch's c10d rendezvous, with the job's store found again in
every round.

torchrun's agents share one TCPStore with their workers (it serves `MASTER_ADDR:MASTER_PORT`),
hosted by the agent that is rank 0 of the rendezvous. torch 2.13 publishes its address once,
in the first round an agent takes part in, and reuses what it learnt in later rounds. That
holds while the same agents re-form, but not when the membership changes:

- a node that joins a running job (a lost node coming back, or `--nnodes MIN:MAX` growing)
  waits in the new round for the address, which the agent already hosting the store never
  publishes again: both agents wait for each other until the store's timeout, and the job
  cannot grow back;
- when the node hosting the store is lost and another agent becomes rank 0, it starts a new
  store, but the remaining agents keep the address of the lost one.

This backend is torch's own c10d rendezvous (its backend, its handler, its settings) with one
addition after each round: rank 0 publishes the address of the store it hosts under the new
round's keys, and every other agent reads it from there. Rank 0 also numbers the worker group
about to start, in that store, before any worker of the group can start: the workers scope
their keys by it (train/runtime.py), since the agents' restart counts differ once a node has
left or joined. Nothing else changes. It is loaded
through torch's `torchrun.handlers` entry point, so it needs plait installed on every node:

    torchrun --rdzv-backend plait-c10d --rdzv-endpoint HOST:29400 --nnodes 1:4 ...

Hand-written because the fix has to live in the agent, before any worker starts; nothing in
torch's public API can reach it. Remove it when torch republishes the address itself.
"""

from __future__ import annotations

from typing import Any, Callable

BACKEND_NAME = "plait-c10d"


def handler_creator() -> Callable[..., Any]:
    """The `torchrun.handlers` entry point: torch calls it to get the creator it registers.
    Defined before anything is imported from torch's rendezvous package, and resolving
    `create_rendezvous` only when called: importing that package loads this module through the
    entry point, so a process that imports this module first meets it half-built."""
    return lambda params: create_rendezvous(params)


import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, create_handler

from plait.train.runtime import WORKER_GROUP_KEY


class RepublishingRendezvous(RendezvousHandler):
    """torch's dynamic rendezvous handler; after each round, the store's address is published
    by rank 0 and read by everyone else under that round's keys."""

    def __init__(self, inner: DynamicRendezvousHandler):
        self.inner = inner

    def next_rendezvous(self) -> RendezvousInfo:
        info = self.inner.next_rendezvous()
        if not self.inner.use_agent_store:
            return info  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torch builds the address every round
        store = info.store
        if info.rank == 0:
            address = self.hosted_store_address(info)
            self.number_worker_group(address)
            store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, address.master_addr.encode())
            store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(address.master_port).encode())
        else:
            address = RendezvousStoreInfo(store.get(RendezvousStoreInfo.MASTER_ADDR_KEY).decode(),
                                          int(store.get(RendezvousStoreInfo.MASTER_PORT_KEY).decode()))
        return RendezvousInfo(store, info.rank, info.world_size, address)

    def hosted_store_address(self, info: RendezvousInfo) -> RendezvousStoreInfo:
        """The store this agent hosts as rank 0. torch keeps what it learnt in the first round an
        agent took part in; an agent that was rank 0, then not, then rank 0 again would be handed
        another agent's address, so the address is rebuilt from the server this agent runs."""
        server = getattr(self.inner, "_shared_tcp_store_server", None)
        node = getattr(self.inner, "_this_node", None)
        if server is None or node is None:  # torch's internals moved: trust what it returned
            return info.bootstrap_store_info
        return RendezvousStoreInfo(node.addr, server.port)

    def number_worker_group(self, address: RendezvousStoreInfo) -> None:
        """Count up the worker groups in the store this agent hosts and name the new one. Done
        before the address is published, so no worker of the new group can start earlier."""
        hosted = dist.TCPStore(address.master_addr, address.master_port, is_master=False, wait_for_workers=False)
        key = WORKER_GROUP_KEY.format(run_id=self.inner.get_run_id())
        hosted.set(key, str(hosted.add(key + "-count", 1)).encode())

    # Everything else is torch's.
    def get_backend(self) -> str:
        return BACKEND_NAME

    @property
    def use_agent_store(self) -> bool:
        return self.inner.use_agent_store

    def is_closed(self) -> bool:
        return self.inner.is_closed()

    def set_closed(self) -> None:
        self.inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self.inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self.inner.get_run_id()

    def shutdown(self) -> bool:
        return self.inner.shutdown()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def create_rendezvous(params: RendezvousParameters) -> RendezvousHandler:
    backend, store = create_backend(params)
    return RepublishingRendezvous(create_handler(store, backend, params))

