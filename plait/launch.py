"""Start N local worker processes, as torchrun would, on this machine's loopback only.

Each worker re-runs the same `plait train` command line with RANK, WORLD_SIZE, MASTER_ADDR
and the rest of torchrun's environment, so local and cluster runs take one code path. The
launcher is plait's own rather than torch's elastic agent because everything it opens must
listen on 127.0.0.1 only: the agent's rendezvous store listens on every interface and
unpickles what it reads there. Here the launcher hosts the workers' store (bound to
loopback, `TORCHELASTIC_USE_AGENT_STORE` so no worker listens), gloo uses the loopback
interface, and the resilience monitor's store is bound the same way.

It also owns the job's life: workers die with it (processes.die_with_launcher), it restarts
them after a fault (restart mode, up to resilience.max_restarts), never after a usage or
environment error, stops every worker on Ctrl-C or SIGTERM (exit 130 / 143, one line), and
removes the job's private folders on every exit path (processes.JobFiles).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from plait.config import Config
from plait.resilience.elastic_launcher import ElasticLauncher, layout_fallback, say_fallback
from plait.resilience.launcher import ResilienceGuard
from plait.resilience.processes import (
    JobFiles,
    describe_exit,
    loopback_store,
    spawn_worker,
    stop_processes,
    worker_env,
)
from plait.resilience.usage_errors import USAGE_ERROR_ENV, noted_status
from plait.train.metrics import EVENTS_FILE, METRICS_FILE, read_jsonl

POLL_S = 0.05
INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM reached the launcher."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def launch_local(nproc: int, plait_args: list[str], cfg: Config, run_dir: Path) -> int:
    """Run `python -m plait <plait_args>` as `nproc` local workers; return the job's exit status.

    The run's resilience settings apply: restart mode restarts the workers after a fault (the
    monitor names it), elastic mode shrinks the job in place (elastic_launcher.py) where the
    layout allows and else runs in restart mode."""
    run_dir = Path(run_dir)
    if cfg.resilience.mode == "elastic" and nproc > 1:
        reason = layout_fallback(cfg, nproc)
        if reason is None:
            return _run_with_signals(lambda job: ElasticLauncher(nproc, plait_args, cfg, run_dir, job).run(),
                                     run_dir)
        say_fallback(run_dir, reason)
        cfg = copy.deepcopy(cfg)
        cfg.resilience.mode = "restart"
        plait_args = [*plait_args, "--set", "resilience.mode=restart"]
    return _run_with_signals(lambda job: LocalLauncher(nproc, plait_args, cfg, run_dir, job).run(), run_dir)


def _run_with_signals(run: Callable[[JobFiles], int], run_dir: Path) -> int:
    """Run a launcher on the job's private files, removed whatever happens."""

    def body() -> int:
        job = JobFiles.create()
        # The launcher and its monitor read the workers' notes (usage_errors.py) where they write them.
        os.environ[USAGE_ERROR_ENV] = str(job.usage_error_file)
        try:
            return run(job)
        finally:
            # A second Ctrl-C while the workers are being stopped must not leave them behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            job.remove()
            os.environ.pop(USAGE_ERROR_ENV, None)

    return run_interruptible(body, run_dir)


def run_interruptible(body: Callable[[], int], run_dir: Path) -> int:
    """Run `body` (a launcher, or training in this process) with Ctrl-C and SIGTERM turned into a
    clean stop: one line saying where the run stopped, and exit status 130 or 143."""
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return body()
    except Interrupted as stop:
        return report_interrupted(run_dir, stop.signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def report_interrupted(run_dir: Path, signum: int) -> int:
    """Say where an interrupted run stopped (an `interrupted` event, never a fault); its exit status."""
    rows = read_jsonl(run_dir / METRICS_FILE)
    step = rows[-1].get("step", 0) if rows else 0
    if run_dir.is_dir():
        with (run_dir / EVENTS_FILE).open("a") as events:
            events.write(json.dumps({"event": "interrupted", "time": time.time(), "step": step,
                                     "signal": signal.Signals(signum).name}) + "\n")
    print(f"plait: interrupted at step {step}; resume with the same command", file=sys.stderr, flush=True)
    return 128 + signum


class LocalLauncher:
    """Restart mode (and mode none): one worker group at a time, restarted after a fault."""

    def __init__(self, nproc: int, plait_args: list[str], cfg: Config, run_dir: Path, job: JobFiles):
        self.nproc, self.args, self.run_dir, self.job = nproc, plait_args, run_dir, job
        self.procs: list[Any] = []
        self.guard = ResilienceGuard(cfg, run_dir, nproc, self.worker_pids)
        self.max_restarts = self.guard.max_restarts
        self.store = loopback_store(timeout_s=max(60.0, cfg.parallel.timeout_s))

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the current worker group (read by the monitor's thread)."""
        return {rank: proc.pid for rank, proc in enumerate(list(self.procs))}

    def run(self) -> int:
        self.guard.start()
        try:
            for restart in range(self.max_restarts + 1):
                failed = self.run_group(restart)
                if failed is None:
                    return 0
                noted = noted_status()
                if noted in INTERRUPTED:  # a worker alone was sent SIGINT / SIGTERM
                    raise Interrupted(noted - 128)
                if noted is not None:
                    return noted  # a usage or environment error: a worker has said why
                if restart == self.max_restarts:
                    rank, code = failed
                    print(f"plait: worker rank {rank} failed with {describe_exit(code)} (its output is above)",
                          file=sys.stderr, flush=True)
                    return 1
            return 1
        finally:
            self.guard.stop()  # first: the workers stopped below are not faults
            stop_processes(self.procs)

    def run_group(self, restart: int) -> tuple[int, int] | None:
        """Start one worker generation and wait for it: None when every worker finished, else the
        (rank, exit code) of the first failure seen, after stopping the others."""
        env = self.guard.env()
        self.procs = [spawn_worker(self.args, {**worker_env(self.job, rank, self.nproc, self.store.port, restart,
                                                            self.max_restarts), **env})
                      for rank in range(self.nproc)]
        while True:
            codes = [proc.poll() for proc in self.procs]
            failures = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failures:
                # Let the monitor name the culprit before the survivors are stopped: stopped
                # workers look like crashed ones, and the first exit seen is often collateral.
                if noted_status() is None:
                    self.guard.await_verdict(restart)
                stop_processes(self.procs)
                codes = [proc.poll() for proc in self.procs]
                return min((rank, code) for rank, code in enumerate(codes) if code not in (None, 0))
            if all(code == 0 for code in codes):
                return None
            time.sleep(POLL_S)
