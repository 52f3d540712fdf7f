"""What torchft's replica-group fault tolerance costs and does, on CPU with gloo (issue 17).

Two replica groups of one process each train a 1.6M-parameter MLP; torchft's lighthouse runs as
its own process (torchft_lighthouse), everything bound to 127.0.0.1 on OS-chosen ports.

- overhead: in one job, blocks of steps rotate between plain gloo all_reduce of the flattened
  gradients, torch DDP on a plain gloo group, torchft's Manager (quorum each step, its
  reconfigurable gloo group, manager.allreduce, should_commit) on the same flat buffer, and
  torchft's DDP + OptimizerWrapper. Median step time of each and the ratios to plain;
- recovery: replica 1 SIGKILLs itself in the backward pass of step --kill-at; how long replica 0
  stalls before its next committed step; replica 1 is restarted: how long until it has healed
  (weights and optimizer state over torchft's HTTP checkpoint transport from replica 0) and
  takes part again. The same kill is repeated with torchft's DDP wrapper, to see whether the
  survivor carries on;
- global batch: per committed step, manager.num_participants() and the loss of replica 0, and
  the same for a fault-free run of the same length, to show whether a missing replica changes
  the trajectory (plait's elastic mode keeps it fixed).

torchft is not a dependency of plait; run it from a separate venv:

    python3 -m venv /tmp/ftenv && /tmp/ftenv/bin/pip install torch==2.13.0 torchft==0.2.0
    /tmp/ftenv/bin/python benchmarks/torchft_eval.py [--blocks 12] [--block 4] [--kill-at 10]

Prints one JSON object ({"skipped": ...} when torchft is not importable).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

try:
    import torch
    import torch.distributed as dist
    from torch import nn

    import torchft.checkpointing.http_transport as ft_http
    import torchft.manager as ft_manager
    from torchft.checkpointing import HTTPTransport
    from torchft.ddp import DistributedDataParallel as FTDDP
    from torchft.manager import Manager
    from torchft.optim import OptimizerWrapper
    from torchft.process_group import ProcessGroupGloo as FTGloo
    IMPORT_ERROR = ""
except ImportError as e:  # the project venv has torch but not torchft
    IMPORT_ERROR = str(e)

DIM, HIDDEN, ROWS = 256, 1024, 16  # ROWS per replica group per step
MODES = ["plain_allreduce", "plain_ddp", "ft_allreduce", "ft_ddp"]
# Lighthouse settings are torchft's defaults (src/lighthouse.rs LighthouseOpt) except
# min_replicas; heartbeat_timeout_ms is what a survivor waits out after a peer dies.
LIGHTHOUSE = {"join_timeout_ms": 60000, "quorum_tick_ms": 100, "heartbeat_timeout_ms": 5000}
FT_TIMEOUT_S = 30  # Manager and gloo timeout; torchft's default is 60


# ---------------------------------------------------------------- shared by both roles

def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                         nn.Linear(HIDDEN, DIM))


def batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica group `replica`'s shard at `step`: the data layout torchft leaves to the user."""
    teacher = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(12345)) / DIM**0.5
    g = torch.Generator().manual_seed(100003 * step + 17 * replica + 1)
    x = torch.randn(ROWS, DIM, generator=g)
    return x, torch.tanh(x @ teacher)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            pass
    return out


# ---------------------------------------------------------------- worker role

def loopback_only() -> None:
    """Keep torchft's servers off the network: this is a one-machine rehearsal.

    torchft 0.2.0 binds its per-group ManagerServer to [::] (Manager.__init__) and its HTTP
    checkpoint server to ("", 0) on AF_INET6 (HTTPTransport.__init__), with no option to
    change either; both are swapped here for 127.0.0.1 equivalents.
    """
    real_server = ft_manager.ManagerServer

    def manager_server(**kwargs: Any) -> Any:
        kwargs["bind"] = "127.0.0.1:0"
        return real_server(**kwargs)

    class LoopbackHTTPServer(ThreadingHTTPServer):
        address_family = socket.AF_INET
        request_queue_size = 1024

        def __init__(self, _address: Any, handler: Any) -> None:
            super().__init__(("127.0.0.1", 0), handler)

    ft_manager.ManagerServer = manager_server
    ft_http._IPv6HTTPServer = LoopbackHTTPServer


def loopback_transport() -> Any:
    class LoopbackHTTPTransport(HTTPTransport):
        def address(self) -> str:  # the base advertises socket.gethostname()
            return f"http://127.0.0.1:{self._server.socket.getsockname()[1]}/checkpoint/"

    return LoopbackHTTPTransport(timeout=timedelta(seconds=FT_TIMEOUT_S), num_chunks=0)


def make_manager(a: argparse.Namespace, min_replicas: int, model: nn.Module,
                 optim: torch.optim.Optimizer) -> Manager:
    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": optim.state_dict()}

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        optim.load_state_dict(sd["optim"])

    return Manager(
        pg=FTGloo(timeout=timedelta(seconds=FT_TIMEOUT_S)),
        load_state_dict=load_state_dict, state_dict=state_dict,
        min_replica_size=min_replicas,
        timeout=timedelta(seconds=FT_TIMEOUT_S),
        rank=0, world_size=1,
        store_addr="127.0.0.1", store_port=a.store_port,
        lighthouse_addr=a.lighthouse,
        replica_id=f"replica_{a.replica}",  # trailing digits become the global rank
        hostname="127.0.0.1",
        checkpoint_transport=loopback_transport(),
        # identical seeded init, so no step-0 broadcast; a restarted replica still heals
        init_sync=False,
    )


def barrier(run_dir: Path, replica: int, n: int = 2, timeout_s: float = 120) -> None:
    """Both managers heartbeat before either asks for a quorum, so the first one has both."""
    (run_dir / f"ready_{replica}").write_text("1")
    deadline = time.time() + timeout_s
    while not all((run_dir / f"ready_{r}").exists() for r in range(n)):
        if time.time() > deadline:
            raise TimeoutError("peer never became ready")
        time.sleep(0.02)


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def unflatten_into(model: nn.Module, flat: torch.Tensor) -> None:
    i = 0
    for p in model.parameters():
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p))
        i += n


def overhead_worker(a: argparse.Namespace) -> None:
    run_dir = Path(a.dir)
    store = dist.TCPStore("127.0.0.1", a.plain_port, is_master=False, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=a.replica, world_size=2)

    models = {m: make_model() for m in MODES}
    optims = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-3) for m in MODES}
    ddp = torch.nn.parallel.DistributedDataParallel(models["plain_ddp"])
    # one Manager serves both torchft modes: each of their steps is one quorum + one commit
    manager = make_manager(a, 2, models["ft_ddp"], optims["ft_ddp"])
    ft_ddp = FTDDP(manager, models["ft_ddp"])
    ft_optim = OptimizerWrapper(manager, optims["ft_ddp"])
    barrier(run_dir, a.replica)
    commits = {m: 0 for m in MODES}
    step_no = {m: 0 for m in MODES}

    def step(mode: str) -> float:
        x, y = batch(a.replica, step_no[mode])
        step_no[mode] += 1
        t0 = time.perf_counter()
        model, optim = models[mode], optims[mode]
        if mode == "plain_allreduce":
            optim.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            flat = flat_grads(model)
            dist.all_reduce(flat)
            unflatten_into(model, flat.div_(2))
            optim.step()
            commits[mode] += 1
        elif mode == "plain_ddp":
            optim.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            optim.step()
            commits[mode] += 1
        elif mode == "ft_allreduce":
            manager.start_quorum()  # async: overlaps the forward pass
            optim.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            flat = flat_grads(model)
            manager.allreduce(flat).wait()  # averages by num_participants
            unflatten_into(model, flat)
            if manager.should_commit():
                optim.step()
                commits[mode] += 1
        else:
            before = manager.current_step()
            ft_optim.zero_grad()  # start_quorum
            nn.functional.mse_loss(ft_ddp(x), y).backward()
            ft_optim.step()  # should_commit, then the inner step
            commits[mode] += manager.current_step() - before
        return time.perf_counter() - t0

    for mode in MODES:  # warm-up: first quorum, first gloo connections, allocator
        for _ in range(3):
            step(mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(a.blocks):
        for mode in MODES:  # rotate so machine noise hits every mode alike
            for _ in range(a.block):
                times[mode].append(step(mode))
    (run_dir / f"overhead_{a.replica}.json").write_text(json.dumps({"times": times, "commits": commits}))
    dist.destroy_process_group()
    manager.shutdown(wait=False)


def train_worker(a: argparse.Namespace) -> None:
    """One record per attempted step. --path allreduce: Manager.start_quorum, manager.allreduce
    of the flat gradients, should_commit (what the overhead mode ft_allreduce times); --path
    ddp: torchft's DDP + OptimizerWrapper, its recommended loop."""
    run_dir = Path(a.dir)
    log = open(run_dir / f"log_{a.replica}_{a.incarnation}.jsonl", "a", buffering=1)
    model = make_model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    manager = make_manager(a, 1, model, optim)
    ddp = FTDDP(manager, model) if a.path == "ddp" else None
    ft_optim = OptimizerWrapper(manager, optim) if a.path == "ddp" else None
    log.write(json.dumps({"event": "manager_ready", "t": time.time()}) + "\n")
    if a.incarnation == 0:
        barrier(run_dir, a.replica)
    stop_file = run_dir / "stop"
    while True:
        stop = int(stop_file.read_text()) if stop_file.exists() else 10**9
        if manager.current_step() >= stop:
            break
        t0 = time.time()
        # the data index is the committed step; a healing replica's step is overwritten with
        # the source's, but its gradient is zeroed that step anyway
        s = manager.current_step()
        x, y = batch(a.replica, s)
        if a.incarnation == 0 and s == a.die_at:
            die_in_backward(model, log)
        if ddp is not None:
            ft_optim.zero_grad()  # start_quorum
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()  # the comm hook calls manager.allreduce per bucket
            ft_optim.step()  # should_commit, then the inner step
        else:
            manager.start_quorum()
            optim.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            flat = flat_grads(model)
            manager.allreduce(flat).wait()  # a failed peer is reported, not raised
            unflatten_into(model, flat)
            if manager.should_commit():  # False after an error: the step is dropped
                optim.step()
        log.write(json.dumps({
            "step": s, "committed": manager.current_step() > s, "after": manager.current_step(),
            "loss": loss.item(), "participants": manager.num_participants(),
            "participating": manager.is_participating(), "errored": manager.errored() is not None,
            "batches_committed": manager.batches_committed(), "t0": t0, "t1": time.time()}) + "\n")
    log.write(json.dumps({"event": "done", "t": time.time()}) + "\n")
    log.close()
    manager.shutdown(wait=False)


def die_in_backward(model: nn.Module, log: Any) -> None:
    """SIGKILL this process once the first layer's gradient is ready: the peer is then inside
    the gradient all_reduce (DDP has sent the later layers' buckets, not the first's), the
    case a crash in a long backward pass makes likely. Deterministic, unlike a kill from
    outside at a random point of a short step."""
    def hook(_p: torch.Tensor) -> None:
        log.write(json.dumps({"event": "kill", "t": time.time()}) + "\n")
        log.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    model[0].weight.register_post_accumulate_grad_hook(hook)


def worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    loopback_only()
    if a.kind == "overhead":
        overhead_worker(a)
    else:
        train_worker(a)
    os._exit(0)  # torchft's server threads can keep a clean exit waiting


# ---------------------------------------------------------------- orchestrator role

class Job:
    """One lighthouse, one TCPStore per replica group, and the worker processes."""

    def __init__(self, run_dir: Path, min_replicas: int) -> None:
        self.dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        # its own process, as deployed: torchft's Rust lighthouse (the torchft_lighthouse entry
        # point), bound to loopback, port chosen by the OS and read back from its log
        lh_log = run_dir / "lighthouse.txt"
        flags = [f"--{k}={v}" for k, v in LIGHTHOUSE.items()]
        self.lighthouse = subprocess.Popen(
            # the Rust side parses the process's own argv, so `python -c` cannot stand in
            [shutil.which("torchft_lighthouse", path=str(Path(sys.executable).parent)) or "torchft_lighthouse",
             "--bind=127.0.0.1:0", f"--min_replicas={min_replicas}", *flags],
            stdout=open(lh_log, "w"), stderr=subprocess.STDOUT)
        self.lighthouse_addr = ""
        deadline = time.time() + 60
        while not self.lighthouse_addr:
            for line in lh_log.read_text().splitlines():
                if "listening on" in line:  # "Lighthouse listening on: http://HOST:PORT"
                    self.lighthouse_addr = "http://127.0.0.1:" + line.rsplit(":", 1)[1].strip()
            if time.time() > deadline or self.lighthouse.poll() is not None:
                raise RuntimeError(f"lighthouse did not start: {lh_log.read_text()[-1000:]}")
            time.sleep(0.05)
        # stand-ins for each replica group's torchrun store; port 0: the OS picks a free one
        self.stores = [dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
                       for _ in range(2)]
        self.plain_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.procs: dict[tuple[int, int], subprocess.Popen] = {}

    def spawn(self, kind: str, replica: int, incarnation: int = 0, path: str = "allreduce",
              die_at: int = -1) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--worker", kind, "--path", path, "--replica", str(replica),
               "--die-at", str(die_at),
               "--incarnation", str(incarnation), "--dir", str(self.dir),
               "--lighthouse", self.lighthouse_addr, "--store-port", str(self.stores[replica].port),
               "--plain-port", str(self.plain_store.port), "--blocks", str(ARGS.blocks),
               "--block", str(ARGS.block)]
        out = open(self.dir / f"stderr_{replica}_{incarnation}.txt", "w")
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.procs[(replica, incarnation)] = p
        return p

    def wait(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        for key, p in self.procs.items():
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"worker {key} did not finish: {self.tail(*key)}") from None

    def tail(self, replica: int, incarnation: int = 0) -> str:
        path = self.dir / f"stderr_{replica}_{incarnation}.txt"
        return path.read_text()[-1500:] if path.exists() else ""

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.lighthouse.kill()
        self.lighthouse.wait()


def median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 2)


def measure_overhead(root: Path) -> dict:
    job = Job(root / "overhead", min_replicas=2)
    try:
        for r in range(2):
            job.spawn("overhead", r)
        job.wait(300)
        results = [json.loads((job.dir / f"overhead_{r}.json").read_text()) for r in range(2)]
    finally:
        job.close()
    times = {m: results[0]["times"][m] + results[1]["times"][m] for m in MODES}
    med = {m: median_ms(times[m]) for m in MODES}
    # the machine's speed drifts between rotations by more than the effect; a ratio within
    # each rotation (block medians, same replica) cancels the drift
    paired: dict[str, list[float]] = {m: [] for m in MODES}
    for res in results:
        for b in range(ARGS.blocks):
            blk = {m: statistics.median(res["times"][m][b * ARGS.block:(b + 1) * ARGS.block]) for m in MODES}
            for m in MODES:
                paired[m].append(blk[m] / blk["plain_allreduce"])
    return {
        "params": sum(p.numel() for p in make_model().parameters()),
        "steps_per_mode_per_replica": ARGS.blocks * ARGS.block,
        "median_step_ms": med,
        "ratio_to_plain_allreduce": {m: round(med[m] / med["plain_allreduce"], 3) for m in MODES},
        "ratio_to_plain_allreduce_paired_by_block": {m: round(statistics.median(paired[m]), 3) for m in MODES},
        "ft_ddp_over_plain_ddp": round(med["ft_ddp"] / med["plain_ddp"], 3),
        "ft_added_ms_per_step": round(med["ft_allreduce"] - med["plain_allreduce"], 2),
        "commits": results[0]["commits"],
    }


def committed(records: list[dict]) -> list[dict]:
    return [r for r in records if "step" in r and r["committed"]]


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, job: Job) -> None:
    deadline = time.time() + timeout_s
    while not cond():
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; replica 0: {job.tail(0)}")
        time.sleep(0.01)


def fault_run(root: Path) -> tuple[dict, list[dict], int]:
    job = Job(root / "fault", min_replicas=1)
    log0 = job.dir / "log_0_0.jsonl"
    log1a, log1b = job.dir / "log_1_0.jsonl", job.dir / "log_1_1.jsonl"
    try:
        p0 = job.spawn("train", 0)
        p1 = job.spawn("train", 1, die_at=ARGS.kill_at)
        wait_for(lambda: p1.poll() is not None, 120, "replica 1 to die", job)
        t_kill = next(r["t"] for r in read_jsonl(log1a) if r.get("event") == "kill")
        before_kill = len(read_jsonl(log0))
        wait_for(lambda: sum(1 for r in committed(read_jsonl(log0)[before_kill:])
                             if r["participants"] == 1) >= ARGS.alone_steps, 120, "survivor alone", job)
        t_restart = time.time()
        job.spawn("train", 1, incarnation=1)

        def rejoined() -> bool:
            return any(r["participating"] and r["participants"] == 2 for r in committed(read_jsonl(log1b)))

        wait_for(rejoined, 180, "rejoin", job)
        stop = max(r["after"] for r in committed(read_jsonl(log0))) + ARGS.after_steps
        (job.dir / "stop").write_text(str(stop))
        job.wait(120)
        if p0.returncode != 0:
            raise RuntimeError(f"survivor failed: {job.tail(0)}")
    finally:
        job.close()

    r0, r1b = read_jsonl(log0), read_jsonl(log1b)
    s0 = [r for r in r0 if "step" in r]
    # both replicas are in lockstep, so the victim's step index is the survivor's
    after_kill = [r for r in s0 if r["step"] >= ARGS.kill_at]
    first_commit = next(r for r in after_kill if r["committed"])
    last_before = max(r["t1"] for r in s0 if r["step"] < ARGS.kill_at and r["committed"])
    ready = next(r["t"] for r in r1b if r.get("event") == "manager_ready")
    steps1 = [r for r in r1b if "step" in r]
    healed = next(r for r in steps1 if r["committed"])  # state applied, step jumps to the source's
    joined = next(r for r in steps1 if r["committed"] and r["participating"] and r["participants"] == 2)
    healthy_ms = statistics.median(r["t1"] - r["t0"] for r in s0 if 0 < r["step"] < ARGS.kill_at)
    # the survivor's step in which it served the checkpoint: the first with the newcomer in quorum
    first_pair = next(i for i, r in enumerate(s0) if r["t0"] > t_restart and r["participants"] == 2)
    serve = s0[first_pair - 1]
    solo_ms = statistics.median(r["t1"] - r["t0"] for r in s0 if r["participants"] == 1 and r["t0"] > t_kill)
    seq = [(r["step"], r["participants"], r["committed"]) for r in s0]
    compact: list[list] = []
    for step, n, ok in seq:  # runs of (participants, committed) for the report
        if compact and compact[-1][1] == n and compact[-1][2] == ok:
            compact[-1][3] = step
        else:
            compact.append([step, n, ok, step])
    summary = {
        "fault": f"replica 1 SIGKILLs itself in the backward of step {ARGS.kill_at}",
        "survivor_stall_s": round(first_commit["t1"] - t_kill, 3),
        "survivor_gap_between_commits_s": round(first_commit["t1"] - last_before, 3),
        "survivor_healthy_step_ms": round(1000 * healthy_ms, 2),
        "survivor_uncommitted_attempts": sum(1 for r in after_kill if not r["committed"] and r["t1"] <= first_commit["t1"]),
        "survivor_step_redone_after_fault": first_commit["step"],
        "restart_to_manager_ready_s": round(ready - t_restart, 3),
        "restart_to_healed_s": round(healed["t1"] - t_restart, 3),
        "manager_ready_to_healed_s": round(healed["t1"] - ready, 3),
        "healing_step_s": round(healed["t1"] - healed["t0"], 3),
        "restart_to_participating_s": round(joined["t1"] - t_restart, 3),
        "healed_to_step": healed["after"],
        "survivor_step_while_serving_checkpoint_ms": round(1000 * (serve["t1"] - serve["t0"]), 2),
        "survivor_solo_step_ms": round(1000 * solo_ms, 2),
        "survivor_runs_[first_step,participants,committed,last_step]": compact,
        "final_step": stop,
    }
    return summary, s0, stop


def ddp_probe(root: Path) -> dict:
    """The same kill with torchft's DDP + OptimizerWrapper: does the survivor carry on?"""
    job = Job(root / "ddp_probe", min_replicas=1)
    log0, log1 = job.dir / "log_0_0.jsonl", job.dir / "log_1_0.jsonl"
    try:
        p0 = job.spawn("train", 0, path="ddp")
        p1 = job.spawn("train", 1, path="ddp", die_at=ARGS.kill_at)
        wait_for(lambda: p1.poll() is not None, 120, "replica 1 to die", job)
        assert any(r.get("event") == "kill" for r in read_jsonl(log1)), "replica 1 died before its planned kill"
        n = len(read_jsonl(log0))
        deadline = time.time() + 30
        while p0.poll() is None and time.time() < deadline:
            if sum(1 for r in committed(read_jsonl(log0)[n:]) if r["participants"] == 1) >= 3:
                break
            time.sleep(0.02)
        alone = sum(1 for r in committed(read_jsonl(log0)[n:]) if r["participants"] == 1)
        died = p0.poll() is not None
        reason = ""
        if died:
            lines = [ln.strip() for ln in job.tail(0).splitlines() if ln.strip()]
            cause = [ln for ln in lines if "Connection reset" in ln or "Error" in ln]
            reason = " | ".join((cause[:1] + lines[-3:]))
    finally:
        job.close()
    return {"victim": f"replica 1 SIGKILLs itself in the backward of step {ARGS.kill_at}",
            "survivor_exited": died, "survivor_exit_code": p0.returncode if died else None,
            "survivor_solo_commits_within_30s": alone,
            "survivor_last_error": reason}


def reference_run(root: Path, stop: int) -> list[dict]:
    job = Job(root / "reference", min_replicas=1)
    (job.dir / "stop").write_text(str(stop))
    try:
        for r in range(2):
            job.spawn("train", r)
        job.wait(300)
    finally:
        job.close()
    return [r for r in read_jsonl(job.dir / "log_0_0.jsonl") if "step" in r]


def compare(fault: list[dict], ref: list[dict], kill_step: int) -> dict:
    f = {r["step"]: r for r in committed(fault)}
    g = {r["step"]: r for r in committed(ref)}
    common = sorted(set(f) & set(g))
    before = [abs(f[s]["loss"] - g[s]["loss"]) for s in common if s <= kill_step]
    after = [abs(f[s]["loss"] - g[s]["loss"]) for s in common if s > kill_step]
    last = common[-1]
    return {
        "ref_participants_per_step": sorted({g[s]["participants"] for s in g}),
        "fault_rows_per_step_seen": sorted({ROWS * f[s]["participants"] for s in f}),
        "rows_per_replica_per_step": ROWS,
        # a step's loss is taken before its update, so the kill step itself still matches
        "max_loss_diff_up_to_kill_step": max(before) if before else None,
        "max_loss_diff_after_kill_step": max(after) if after else None,
        "loss_diff_at_kill_step_plus": [round(f[s]["loss"] - g[s]["loss"], 6) for s in common if kill_step < s <= kill_step + 5],
        "final_loss_fault_vs_ref": [f[last]["loss"], g[last]["loss"]],
        "batches_committed_fault_vs_ref": [f[last]["batches_committed"], g[last]["batches_committed"]],
    }


def orchestrate() -> dict:
    out: dict[str, Any] = {"torch": torch.__version__, "torchft": importlib.metadata.version("torchft"),
                           "lighthouse": LIGHTHOUSE, "ft_timeout_s": FT_TIMEOUT_S,
                           "threads_per_process": 1, "replica_groups": 2, "ranks_per_group": 1}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="torchft_eval_") as tmp:
        root = Path(ARGS.keep or tmp)
        out["overhead"] = measure_overhead(root)
        summary, fault, stop = fault_run(root)
        out["recovery"] = summary
        ref = reference_run(root, stop)
        out["global_batch"] = compare(fault, ref, ARGS.kill_at)
        out["recovery_with_torchft_ddp"] = ddp_probe(root)
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=12, help="overhead: rotations of the four modes")
    p.add_argument("--block", type=int, default=4, help="overhead: steps per mode per rotation")
    p.add_argument("--kill-at", type=int, default=10, help="SIGKILL replica 1 after this many commits")
    p.add_argument("--alone-steps", type=int, default=5, help="survivor's solo commits before the restart")
    p.add_argument("--after-steps", type=int, default=5, help="steps after the rejoin before stopping")
    p.add_argument("--keep", default="", help="keep the workers' logs in this folder")
    p.add_argument("--worker", choices=["overhead", "train"], dest="kind", help=argparse.SUPPRESS)
    for name in ["--replica", "--incarnation", "--store-port", "--plain-port"]:
        p.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--die-at", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["allreduce", "ddp"], default="allreduce", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--lighthouse", help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = parse() if __name__ == "__main__" else None

if __name__ == "__main__":
    if IMPORT_ERROR:
        print(json.dumps({"skipped": f"torchft not installed ({IMPORT_ERROR}); see the docstring for a venv"}))
        sys.exit(0)
    if ARGS.kind:
        worker(ARGS)
    else:
        try:
            print(json.dumps(orchestrate()))
        except Exception as e:  # still one JSON object, with the reason
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            sys.exit(1)
