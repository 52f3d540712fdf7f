"""This process's place in the job: rank, device, backend, threads.

Under torchrun (or `plait train --nproc N`, which uses the same elastic launcher) the
environment carries RANK, WORLD_SIZE and the rendezvous store's address; a process
started directly is a world of one and needs no process group at all. A caller that has
already initialised torch.distributed (tests do, with a FileStore) is used as it is.

A restarted worker generation meets in the same store as the last one, whose keys (each
rank's gloo address) are still there: the new ranks would connect to the dead ranks'
addresses. `generation_store` scopes each generation's keys with a prefix of its own.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from plait.config import Config
from plait.errors import ConfigError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    wanted = cfg.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# Where torchrun's agents, through plait's rendezvous backend (`--rdzv-backend plait-c10d`,
# resilience/rendezvous.py), name the worker group about to start: a number every agent agrees
# on, whichever nodes joined or left.
WORKER_GROUP_KEY = "plait-c10d/{run_id}/worker-group"


def generation_store(timeout: datetime.timedelta) -> Any | None:
    """A store scoped to this worker generation, or None where env:// serves as it is."""
    env = os.environ
    if "TORCHELASTIC_RESTART_COUNT" not in env or "MASTER_ADDR" not in env:
        return None
    use_agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(env["RANK"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
                          is_master=not use_agent_store and rank == 0, timeout=timeout,
                          wait_for_workers=False, multi_tenant=True)
    # torchrun's agents share one store across worker groups, and their restart counts differ
    # once a node has left or joined (a membership change is not a restart for the agents that
    # stayed): the group number published by plait's rendezvous backend names the group where
    # there is one; the restart count serves plait's launchers and torch's own c10d backend,
    # whose agents only ever restart together.
    group = worker_group(store, env.get("TORCHELASTIC_RUN_ID", "")) if use_agent_store else None
    name = f"group-{group}" if group is not None else f"generation-{env['TORCHELASTIC_RESTART_COUNT']}"
    return dist.PrefixStore(f"plait/{name}", store)


def worker_group(store: Any, run_id: str) -> int | None:
    """The number plait's rendezvous backend gave this worker group (None: not that backend)."""
    key = WORKER_GROUP_KEY.format(run_id=run_id)
    if not run_id or not store.check([key]):
        return None
    try:
        return int(store.get(key).decode())
    except ValueError:
        return None


def init_runtime(cfg: Config) -> Runtime:
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", 1))
    device = pick_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    elif int(env.get("WORLD_SIZE", 1)) > 1:
        backend = cfg.parallel.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("parallel.backend=nccl needs train.device=cuda")
        timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
        store = generation_store(timeout)  # keeps a restarted generation off the last one's keys
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **({"store": store, "rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"])} if store else {}),
        )
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    threads = cfg.train.threads or max(1, available_cores() // max(1, local_world_size))
    torch.set_num_threads(threads)
    return Runtime(rank, world_size, local_rank, local_world_size, device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
