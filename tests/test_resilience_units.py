"""The pure pieces of resilience, without processes: the fault.inject parser, fire-once
injection, the crash/hang/slow classifiers on synthetic heartbeats, and snapshot fallback."""

from __future__ import annotations

import json
import random

import pytest
import torch

from plait.config import load_config, validate
from plait.errors import ConfigError
from plait.resilience.inject import Fault, FaultInjector, fired_faults, parse_faults
from plait.resilience.monitor import HangRule, Monitor, find_crash, find_hang, find_slow
from plait.resilience.snapshot import (
    buddy_rank,
    newest_valid_snapshot,
    snapshot_step,
    write_snapshot,
)
from plait.train import checkpoint as ckpt


# --- fault.inject ---------------------------------------------------------------------------
def test_parse_faults():
    assert parse_faults("") == []
    assert parse_faults("crash@rank=2,step=7; hang@rank=1,step=5 ;slow@rank=3,delay=0.5") == [
        Fault("crash", 2, 7), Fault("hang", 1, 5), Fault("slow", 3, 1, 0.5)]
    assert parse_faults("slow@rank=0,delay=0.3,step=4") == [Fault("slow", 0, 4, 0.3)]
    assert parse_faults("crash@rank=0,step=4,restart=1") == [Fault("crash", 0, 4, 0.0, 1)]


def test_a_fault_for_a_later_restart_waits_for_it(tmp_path, monkeypatch):
    faults = parse_faults("crash@rank=0,step=4,restart=1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert not FaultInjector(faults, rank=0, run_dir=tmp_path).active
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert FaultInjector(faults, rank=0, run_dir=tmp_path).active


@pytest.mark.parametrize("text", ["explode@rank=1,step=2", "crash@rank=1", "crash@step=3", "crash@rank=x,step=1",
                                  "slow@rank=1", "hang@rank=1,step=0", "crash rank=1", "crash@rank=1,when=3"])
def test_bad_fault_specs_name_the_field(text):
    with pytest.raises(ConfigError, match="fault.inject"):
        parse_faults(text)


def test_config_sections_and_validation():
    cfg = load_config("tiny", ["fault.inject=crash@rank=1,step=3", "resilience.snapshot_every=2"])
    assert cfg.resilience.mode == "restart" and cfg.resilience.snapshot_every == 2
    validate(cfg, 2)
    validate(load_config("tiny", ["resilience.mode=elastic"]), 2)  # see test_resilience_elastic.py
    with pytest.raises(ConfigError, match="resilience.heartbeat_s"):
        validate(load_config("tiny", ["resilience.heartbeat_s=0"]), 2)
    with pytest.raises(ConfigError, match="fault.inject"):
        validate(load_config("tiny", ["fault.inject=crash@rank=1"]), 2)
    with pytest.raises(ConfigError, match="resilience.mode"):
        load_config("tiny", ["resilience.mode=sometimes"])


def test_a_fault_fires_once_per_run_even_across_restarts(tmp_path, monkeypatch):
    slept = []

    def fake_sleep(seconds):
        if seconds > 100:  # the hang's endless sleep: stop it here
            raise InterruptedError
        slept.append(seconds)

    monkeypatch.setattr("plait.resilience.inject.time.sleep", fake_sleep)
    faults = parse_faults("hang@rank=1,step=2;slow@rank=1,delay=0.25,step=3")
    injector = FaultInjector(faults, rank=1, run_dir=tmp_path)
    injector.begin_step(1)
    injector.before_collective("dp", "all_reduce")
    assert slept == []
    injector.begin_step(2)
    with pytest.raises(InterruptedError):
        injector.before_collective("dp", "all_reduce")
    restarted = FaultInjector(faults, rank=1, run_dir=tmp_path)  # a new process after the restart
    restarted.begin_step(2)
    restarted.before_collective("dp", "all_reduce")  # the hang has fired already: no sleep
    restarted.begin_step(3)
    restarted.before_collective("dp", "all_reduce")
    restarted.before_collective("world", "all_gather")
    assert slept == [0.25, 0.25]
    assert {(f["kind"], f["rank"]) for f in fired_faults(tmp_path)} == {("hang", 1), ("slow", 1)}
    assert not FaultInjector(faults, rank=0, run_dir=tmp_path).active


# --- classifiers on synthetic heartbeats -----------------------------------------------------
def beat(rank, entered, inflight=None, steps=(), state="running", time=100.0, step=5):
    return {"rank": rank, "host": "h", "pid": 1000 + rank, "generation": 0, "state": state, "time": time,
            "step": step, "training": True, "entered": entered, "completed": entered, "inflight": inflight,
            "steps": [list(s) for s in steps], "last": ["dp", "all_reduce", entered.get("dp", 0)]}


def waiting_in(seq, waited, ranks=(0, 1, 2, 3)):
    return {"group": "dp", "ranks": list(ranks), "seq": seq, "op": "all_reduce", "waiting_s": waited}


def test_hang_names_the_rank_that_never_entered():
    beats = {r: beat(r, {"dp": 12}, waiting_in(12, 6.0)) for r in (0, 2, 3)}
    beats[1] = beat(1, {"dp": 11})
    verdict = find_hang(beats, now=100.0, hang_s=5.0)
    assert (verdict.kind, verdict.rank, verdict.group, verdict.collective, verdict.seq) == ("hang", 1, "dp", "all_reduce", 12)
    assert verdict.waiting_ranks == [0, 2, 3] and verdict.pid == 1001
    assert find_hang(beats, now=100.0, hang_s=7.0) is None  # not waited long enough yet
    healthy = {r: beat(r, {"dp": 12}, waiting_in(12, 6.0)) for r in range(4)}  # all arrived: not a hang
    assert find_hang(healthy, now=100.0, hang_s=5.0) is None


def test_crash_prefers_the_rank_the_others_waited_for():
    beats = {r: beat(r, {"dp": 12}, waiting_in(12, 0.5), state="failed") for r in (0, 1, 3)}
    beats[2] = beat(2, {"dp": 11})
    # Rank 0 was seen gone first (it died of the connection error), but rank 2 never arrived.
    verdict = find_crash(beats, gone=[0, 2], now=100.0)
    assert (verdict.kind, verdict.rank, verdict.seq) == ("crash", 2, 12)
    lone = find_crash({2: beat(2, {"dp": 11}), 0: beat(0, {"dp": 11})}, gone=[2], now=100.0)
    assert lone.rank == 2 and "process gone" in lone.detail
    assert find_crash(beats, gone=[], now=100.0) is None


def test_collateral_ranks_that_exited_first_are_never_blamed():
    """Rank 2 died abruptly before collective #12; ranks 1 and 3 failed in it and exited first
    (their last heartbeats say "failed", waiting in #12), rank 0 still waits: 2 is the culprit
    whatever order the exits were seen in, and 0, 1, 3 are collateral."""
    beats = {r: beat(r, {"dp": 12}, waiting_in(12, 0.4), state="failed") for r in (1, 3)}
    beats[0] = beat(0, {"dp": 12}, waiting_in(12, 0.4))
    beats[2] = beat(2, {"dp": 11})  # its last beat: running, before #12
    for gone in ([1, 3, 2], [3, 2, 1], [1, 2, 3]):
        verdict = find_crash(beats, gone=gone, now=100.0)
        assert (verdict.rank, verdict.seq) == (2, 12), gone
        assert verdict.collateral == [1, 3] and verdict.waiting_ranks == [0, 1, 3]
    # No evidence (nobody was waiting): the abrupt death beats the exception exits seen before it.
    quiet = {r: beat(r, {"dp": 12}, state="failed") for r in (0, 1, 3)}
    quiet[2] = beat(2, {"dp": 12})
    assert find_crash(quiet, gone=[0, 1, 2, 3], now=100.0).rank == 2


def steady(rank, entered, inflight=None, phase="step", steps_done=10, step_s=0.2):
    b = beat(rank, entered, inflight, steps=[(s, 0.01, step_s, "dp", "all_reduce") for s in range(1, 6)])
    b.update(phase=phase, steps_done=steps_done)
    return b


def test_a_hang_is_named_after_max_of_hang_min_s_and_k_step_times_outside_long_phases():
    rule = HangRule(min_s=5.0, k=10.0, warmup_steps=3, backstop_s=300.0)
    waiting = {r: steady(r, {"dp": 12}, waiting_in(12, 6.0)) for r in (0, 2, 3)}
    assert find_hang({**waiting, 1: steady(1, {"dp": 11})}, 100.0, rule=rule).rank == 1  # 6 s > max(5, 10 x 0.2)
    slow_steps = {r: steady(r, {"dp": 12}, waiting_in(12, 6.0), step_s=1.0) for r in (0, 2, 3)}
    assert find_hang({**slow_steps, 1: steady(1, {"dp": 11}, step_s=1.0)}, 100.0, rule=rule) is None  # < 10 x 1 s
    for phase in ("eval", "checkpoint", "snapshot", "finish", "setup"):  # announced: only the backstop counts
        assert find_hang({**waiting, 1: steady(1, {"dp": 11}, phase=phase)}, 100.0, rule=rule) is None, phase
    assert find_hang({**waiting, 1: steady(1, {"dp": 11}, steps_done=2)}, 100.0, rule=rule) is None  # warm-up
    long_wait = {r: steady(r, {"dp": 12}, waiting_in(12, 301.0)) for r in (0, 2, 3)}
    verdict = find_hang({**long_wait, 1: steady(1, {"dp": 11}, phase="eval")}, 100.0, rule=rule)
    assert verdict.rank == 1 and "phase eval" in verdict.detail  # the backstop
    explicit = HangRule(explicit_s=7.0)
    assert find_hang({**waiting, 1: steady(1, {"dp": 11}, phase="eval")}, 100.0, rule=explicit) is None
    assert find_hang({**long_wait, 1: steady(1, {"dp": 11}, phase="eval")}, 100.0, rule=explicit).rank == 1


def test_the_monitor_settles_before_naming_a_crash(tmp_path):
    store = FakeStore()
    monitor = Monitor(store, 4, tmp_path, heartbeat_s=0.1, hang_s=0.0, slow_k=8.0, slow_window=8,
                      slow_min_fraction=0.1, restart=True, settle_s=1.5,
                      local_pids=lambda: {r: 2 ** 22 + 12345 + r for r in range(4)})
    monitor.generation = 0
    # First seen: rank 1 gone (collateral, its final beat not yet read); rank 2 never published.
    beats = {r: beat(r, {"dp": 12}, waiting_in(12, 0.2)) for r in (0, 1, 3)}
    monitor.check(beats, now=100.0, dead={1})
    assert monitor.verdicts == []  # still settling
    beats[1] = beat(1, {"dp": 12}, waiting_in(12, 0.3), state="failed")
    monitor.check(beats, now=101.6, dead={1})
    (verdict,) = monitor.verdicts
    # Rank 2 died before its first heartbeat: an empty one stands in for it (it entered nothing).
    assert (verdict.kind, verdict.rank) == ("crash", 2) and verdict.collateral == [0, 1, 3]
    assert monitor.await_verdict(0, timeout_s=0.1) is verdict
    assert json.loads(store.data["plait/fault/0"])["collateral"] == [0, 1, 3]


def synthetic_steps(n_steps, slow_rank=None, delay=0.0, seed=0, systematic=0.002):
    """Per-rank (step, wait, step_time) with jitter; rank 0 is always a little late (it logs)."""
    rng = random.Random(seed)
    rows = {r: [] for r in range(4)}
    for step in range(1, n_steps + 1):
        arrive = {r: rng.uniform(0, 0.01) + (systematic if r == 0 else 0) for r in range(4)}
        if slow_rank is not None:
            arrive[slow_rank] += delay
        last = max(arrive.values())
        for r in range(4):  # each waits from its arrival until the last arrives, plus transfer
            rows[r].append((step, last - arrive[r] + 0.02, 0.2 + delay, "dp", "all_reduce"))
    return rows


def test_slow_rank_is_named_and_jitter_is_not():
    for seed in range(20):  # no false alarm on jittery healthy timings
        rows = synthetic_steps(100, seed=seed)
        for end in range(8, 101):
            beats = {r: beat(r, {"dp": end}, steps=rows[r][end - 8:end]) for r in range(4)}
            assert find_slow(beats, k=8.0, window=8, min_fraction=0.1) == [], (seed, end)
    rows = synthetic_steps(20, slow_rank=3, delay=0.3)
    beats = {r: beat(r, {"dp": 20}, steps=rows[r][-8:]) for r in range(4)}
    (verdict,) = find_slow(beats, k=8.0, window=8, min_fraction=0.1)
    assert (verdict.kind, verdict.rank, verdict.group, verdict.collective) == ("slow", 3, "dp", "all_reduce")
    short = {r: beat(r, {"dp": 5}, steps=rows[r][:5]) for r in range(4)}
    assert find_slow(short, k=8.0, window=8, min_fraction=0.1) == []  # window not yet full


class FakeStore:
    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value


def test_monitor_reports_once_per_generation(tmp_path):
    store = FakeStore()
    monitor = Monitor(store, 4, tmp_path, heartbeat_s=0.1, hang_s=5.0, slow_k=8.0, slow_window=8,
                      slow_min_fraction=0.1, restart=True)
    monitor.generation = 0
    beats = {r: beat(r, {"dp": 12}, waiting_in(12, 6.0)) for r in (0, 2, 3)}
    beats[1] = beat(1, {"dp": 11})
    for r, b in beats.items():
        b["pid"] = 2 ** 22 + 12345 + r  # no such processes: they would read as crashed
        b["host"] = "elsewhere"  # ... but on another host only a stale heartbeat counts
    monitor.check(beats, now=100.0)
    monitor.check(beats, now=101.0)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["kind"], e["rank"]) for e in events] == [("fault_detected", "hang", 1)]
    assert events[0]["action"] == "restart" and events[0]["detection_latency_s"] == pytest.approx(6.0)
    assert json.loads(store.data["plait/fault/0"])["rank"] == 1


# --- snapshots --------------------------------------------------------------------------------
def files(step):
    return {"model.pt": {"w": torch.full((4,), float(step))}, "trainer.json": {"step": step}}


def test_corrupt_snapshot_falls_back_to_the_other_copy_then_the_previous_step(tmp_path):
    for step in (3, 6):
        for copy in ("host", "buddy"):
            write_snapshot(tmp_path, copy, step, files(step))
    path, rejected = newest_valid_snapshot(tmp_path)
    assert (path.parent.name, snapshot_step(path), rejected) == ("host", 6, [])
    (tmp_path / "host" / "step-00000006" / "model.pt").write_bytes(b"garbage")
    path, rejected = newest_valid_snapshot(tmp_path)
    assert (path.parent.name, snapshot_step(path)) == ("buddy", 6)
    assert "checksum" in rejected[0][1] or "bytes" in rejected[0][1]
    with (tmp_path / "buddy" / "step-00000006" / "model.pt").open("r+b") as f:
        f.seek(60)
        f.write(b"\x00\x01\x02")  # same size, different bytes: only the checksum sees it
    path, rejected = newest_valid_snapshot(tmp_path)
    assert (snapshot_step(path), len(rejected)) == (3, 2)
    assert ckpt.read_file(path, "model.pt")["w"][0] == 3.0
    assert buddy_rank(8, 4) == 4 and buddy_rank(4, 4) == 1 and buddy_rank(1, 1) == 0


def test_prefer_snapshot_over_older_disk_checkpoint(tmp_path):
    from plait.resilience.session import Resilience

    disk = ckpt.write_checkpoint(tmp_path / "checkpoints", 4, files(4))
    session = Resilience.__new__(Resilience)  # only the snapshot folder matters here
    session.root = tmp_path / "shm"
    assert session.prefer_snapshot(disk, []) == (disk, [], "disk")  # no snapshots at all
    write_snapshot(session.root, "host", 6, files(6))
    path, rejected, source = session.prefer_snapshot(disk, [])
    assert (snapshot_step(path), source) == (6, "memory")
    (path / "model.pt").write_bytes(b"torn")
    path, rejected, source = session.prefer_snapshot(disk, [])
    assert (path, source) == (disk, "disk") and snapshot_step(rejected[0][0]) == 6
    write_snapshot(session.root, "host", 3, files(3))  # older than the checkpoint: not used
    assert session.prefer_snapshot(disk, [])[2] == "disk"
