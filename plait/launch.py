"""Start N local worker processes through PyTorch's elastic launcher (what torchrun runs).

Each worker re-runs the same `plait train` command line with RANK, WORLD_SIZE and the
rendezvous address in its environment, exactly as under `torchrun`, so local and cluster
runs take one code path. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

USAGE_ERROR = 2


def launch_local(nproc: int, plait_args: list[str], max_restarts: int = 0, cfg=None,
                 run_dir: Path | None = None) -> int:
    """Run `python -m plait <plait_args>` as `nproc` workers; return the job's exit status.

    With the run's config (`cfg`, a plait.config.Config) and `run_dir`, its resilience settings
    apply: the launcher hosts the store the workers' watchdogs publish to, runs the monitor
    that names faulty ranks, and restarts the workers up to resilience.max_restarts times."""
    run_id = f"plait-{uuid.uuid4().hex[:8]}"
    if cfg is not None and run_dir is not None and cfg.resilience.mode == "elastic" and nproc > 1:
        # plait's own launcher: torch's elastic agent would stop the survivors of a fault.
        from plait.resilience.elastic_launcher import launch_elastic

        return launch_elastic(nproc, plait_args, cfg, Path(run_dir), run_id)
    guard = None
    if cfg is not None and run_dir is not None:
        from plait.resilience.launcher import ResilienceGuard

        guard = ResilienceGuard(cfg, Path(run_dir), nproc, run_id)
        max_restarts = guard.max_restarts
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",  # port 0: the store picks a free port
        local_addr="127.0.0.1", max_restarts=max_restarts, monitor_interval=0.1,
    )
    # Keep gloo on the loopback interface whatever the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    # The agent's own log lines duplicate what the workers print; keep only real trouble.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        if guard is not None:
            guard.start()
        elastic_launch(config, sys.executable)("-m", "plait", *plait_args)
    except ChildFailedError as failure:
        codes = [f.exitcode for f in failure.failures.values()]
        if USAGE_ERROR in codes:
            return USAGE_ERROR  # the worker has already printed the one-line reason
        first_rank, first = min(failure.failures.items())
        print(f"plait: worker rank {first_rank} failed with exit code {first.exitcode} "
              f"(its traceback is above)", file=sys.stderr)
        return 1
    finally:
        if guard is not None:
            guard.stop()
    return 0
