"""Run a function on N gloo processes and bring back each rank's result.

One spawned group serves several checks (the function runs them in turn), so the cost of
starting processes is paid once per world size. Each rank uses one thread, a FileStore in
a temporary directory (no ports to collide on) and a 30 s collective timeout, so a broken
collective fails the test instead of hanging it. A failing rank's traceback comes back
labelled with its rank number.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30


def _worker(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, results: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        if world_size > 1:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        # Pickled here, by value: a tensor put on the queue as it is travels as a file descriptor
        # that a rank which has already exited can no longer hand over.
        results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent, labelled
        text = "".join(f"[rank {rank}] {line}\n" for line in traceback.format_exc().splitlines())
        print(text, flush=True)
        results.put((rank, "error", text))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 600) -> list[Any]:
    """Call fn(rank, world_size, *args) on `world_size` processes; return results by rank.

    A world of one runs in a spawned process too, so every layout runs under the same
    thread count and the single-process reference is comparable bit for bit.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, fn, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        collected: dict[int, tuple[str, Any]] = {}
        try:
            while len(collected) < world_size:
                rank, status, value = results.get(timeout=timeout_s)
                collected[rank] = (status, value)
        except queue.Empty:
            pass
        finally:
            for p in procs:
                p.join(timeout=COLLECTIVE_TIMEOUT_S + 10)
                if p.is_alive():
                    p.kill()
    errors = [value for status, value in collected.values() if status == "error"]
    missing = sorted(set(range(world_size)) - set(collected))
    if errors or missing:
        raise AssertionError("\n".join(errors) + (f"\nranks {missing} returned nothing" if missing else ""))
    return [pickle.loads(collected[r][1]) for r in range(world_size)]
