"""Faults in real 4-process runs through `plait train --nproc 4` (the elastic launcher, gloo).

Two runs share the checks: a healthy one (the reference trajectory, and no alarm), and one
that rehearses four faults in turn: rank 1 hangs at step 5; while the restarted workers redo
steps 4-5, rank 0 crashes (a failure during recovery); rank 3 crashes at step 12; rank 2 is
slowed by 0.3 s before every collective from step 14. In restart mode the launcher restarts
the workers after each hang or crash; they resume from the newest in-memory snapshot (every
3 steps) or disk checkpoint, and the losses must equal the healthy run's.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.scenarios import BASE, read_jsonl as read, train_cli

pytestmark = pytest.mark.timeout(300)

TIMEOUT_S = 10  # parallel.timeout_s: a hang must be named within this + 5 s
SNAPSHOT_EVERY = 3
# Checkpoints written synchronously: the scenario asserts which state (disk at step 10 or a
# snapshot) each restart resumes from, which a background write would leave to timing.
RESILIENCE = ["resilience.mode=restart", f"resilience.snapshot_every={SNAPSHOT_EVERY}",
              "resilience.heartbeat_s=0.1", "resilience.slow_window=5", f"parallel.timeout_s={TIMEOUT_S}",
              "checkpoint.async=false"]
FAULTS = ("hang@rank=1,step=5; crash@rank=0,step=5,restart=1; crash@rank=3,step=12; "
          "slow@rank=2,delay=0.3,step=14")


def train(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    return train_cli(run_dir, BASE + RESILIENCE + list(overrides), nproc=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience")
    healthy = train(root / "healthy")
    assert healthy.returncode == 0, healthy.stderr[-3000:]
    faulty = train(root / "faulty", f"fault.inject={FAULTS}")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    return {"healthy": (root / "healthy", healthy), "faulty": (root / "faulty", faulty)}


def test_recovered_run_matches_the_healthy_run_at_every_step(runs):
    (healthy, _), (faulty, _) = runs["healthy"], runs["faulty"]
    reference = read(healthy / "metrics.jsonl")
    recovered = read(faulty / "metrics.jsonl")
    assert [r["step"] for r in recovered] == list(range(1, 21))  # redone steps replaced, none lost
    deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(reference, recovered)]
    assert max(deltas) < 1e-3, deltas
    assert read(faulty / "events.jsonl")[-1]["event"] == "finished"


def test_healthy_run_raises_no_alarm(runs):
    path, result = runs["healthy"]
    events = read(path / "events.jsonl")
    assert not [e for e in events if e["event"] in ("fault_detected", "recovered")]
    assert "fault detected" not in result.stderr


def test_hang_and_crashes_are_named_and_recovered(runs):
    path, result = runs["faulty"]
    events = read(path / "events.jsonl")
    detected = [e for e in events if e["event"] == "fault_detected" and e["kind"] != "slow"]
    assert [(e["kind"], e["rank"]) for e in detected] == [("hang", 1), ("crash", 0), ("crash", 3)]
    hang, _, crash = detected
    assert hang["group"] and hang["collective"] and hang["pid"] and hang["host"]
    assert hang["detection_latency_s"] <= TIMEOUT_S + 5
    assert sorted(hang["waiting_ranks"]) == [0, 2, 3]
    assert crash["detection_latency_s"] <= TIMEOUT_S + 5
    assert "fault detected: hang of rank 1" in result.stderr and "fault detected: crash of rank 3" in result.stderr
    recovered = [e for e in events if e["event"] == "recovered"]
    assert [(e["kind"], e["culprit"]) for e in recovered] == [("hang", 1), ("crash", 0), ("crash", 3)]
    # Each resumes from the newest state: the step-3 snapshot in memory after the hang at step
    # 5 and again after the crash at step 5 of the redo; after the crash at step 12, the
    # step-10 disk checkpoint (newer than the step-9 snapshot).
    assert [(e["resumed_step"], e["source"]) for e in recovered] == [(3, "memory"), (3, "memory"), (10, "disk")]
    for event in recovered:
        assert 0 <= event["steps_redone"] <= SNAPSHOT_EVERY
        assert event["world_size_before"] == event["world_size_after"] == 4
        assert event["recovery_time_s"] > 0 and event["detection_latency_s"] is not None


def test_slow_rank_is_named_within_20_steps(runs):
    path, result = runs["faulty"]
    (slow,) = [e for e in read(path / "events.jsonl") if e["event"] == "fault_detected" and e["kind"] == "slow"]
    assert slow["rank"] == 2 and slow["action"] == "reported"
    assert slow["step"] < 14 + 20
    assert "fault detected: slow of rank 2" in result.stderr


def test_usage_error_in_a_worker_is_not_restarted(tmp_path):
    from plait.train import checkpoint as ckpt

    ckpt.write_checkpoint(tmp_path / "run" / "checkpoints", 3, {"trainer.json": {"step": 3}})
    result = train_cli(tmp_path / "run", ["checkpoint.resume=never", "train.steps=2"], nproc=2, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("plait:")]
    assert lines == [lines[0]] and "checkpoint.resume=never" in lines[0]  # said once, no fault reported
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a step trained, nothing written
