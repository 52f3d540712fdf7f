"""The store a restarted worker group initialises its process group with.

Under the elastic launcher every worker generation meets in the agent's store. Its keys
from the previous generation (each rank's gloo address) are still there after a restart,
and the new ranks would connect to the dead ranks' addresses. A prefix per generation
keeps each generation's keys apart.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch.distributed as dist


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
    return dist.PrefixStore(f"plait/generation-{env['TORCHELASTIC_RESTART_COUNT']}", store)
