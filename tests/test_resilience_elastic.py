"""`resilience.mode=elastic` in real 4-process runs through `plait train --nproc 4` (plait's own
launcher, gloo): rank 2 crashes at step 5; the three survivors re-form in place from the
in-memory replica (every 3 steps) with dp 3 (global batch 24 = 3 x 4 x micro-batch 2), a
replacement joins at a later step boundary (dp 4, 3 micro-batches each), and every step's loss
must equal the fault-free run's, under ZeRO-1 and ZeRO-2. The fault-free reference is a plain
4-process run (ZeRO-1; layouts agree to ~1e-6, see test_zero)."""

from __future__ import annotations

import copy
import subprocess

import pytest

from plait.config import load_config
from plait.resilience.elastic_launcher import batch_fallback, layout_fallback
from tests.scenarios import BASE, read_jsonl as read, train_cli

pytestmark = pytest.mark.timeout(300)

STEPS, CRASH_STEP, SNAPSHOT_EVERY = 20, 5, 3
COMMON = [f"train.steps={STEPS}", "train.global_batch=24", "train.micro_batch=2", "parallel.timeout_s=5",
          "resilience.heartbeat_s=0.1", f"resilience.snapshot_every={SNAPSHOT_EVERY}",
          "resilience.grow_wait_s=120"]  # hold the group for the replacement: it joins before step 20


def train(run_dir, *overrides: str) -> subprocess.CompletedProcess:
    return train_cli(run_dir, BASE + COMMON + list(overrides), nproc=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    out = {}
    for name, overrides in [("reference", ["parallel.zero=1", "resilience.mode=none"]),
                            ("zero1", ["parallel.zero=1"]), ("zero2", ["parallel.zero=2"])]:
        if name != "reference":
            overrides += ["resilience.mode=elastic", f"fault.inject=crash@rank=2,step={CRASH_STEP}"]
        result = train(root / name, *overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = (root / name, result)
    return out


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_shrink_then_grow_matches_the_fault_free_run_at_every_step(runs, name):
    reference = read(runs["reference"][0] / "metrics.jsonl")
    path, result = runs[name]
    elastic = read(path / "metrics.jsonl")
    assert [r["step"] for r in elastic] == list(range(1, STEPS + 1))  # redone steps replaced, none lost
    deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(reference, elastic)]
    assert max(deltas) < 1e-3, deltas
    events = read(path / "events.jsonl")
    assert events[-1]["event"] == "finished"
    assert [e["event"] for e in events].count("start") == 1  # in place: the workers never restarted
    (detected,) = [e for e in events if e["event"] == "fault_detected"]
    assert (detected["kind"], detected["rank"], detected["action"]) == ("crash", 2, "elastic")
    (recovered,) = [e for e in events if e["event"] == "recovered"]
    assert (recovered["kind"], recovered["culprit"], recovered["source"]) == ("crash", 2, "memory")
    assert (recovered["world_size_before"], recovered["world_size_after"]) == (4, 3)
    # The newest replica before the crash is step 3's: step 4 is redone.
    assert recovered["resumed_step"] == (CRASH_STEP - 1) // SNAPSHOT_EVERY * SNAPSHOT_EVERY
    assert recovered["steps_redone"] == CRASH_STEP - 1 - recovered["resumed_step"]
    assert recovered["recovery_time_s"] > 0 and recovered["detection_latency_s"] is not None
    (grown,) = [e for e in events if e["event"] == "grown"]
    assert (grown["world_size_before"], grown["world_size_after"]) == (3, 4)
    assert recovered["resumed_step"] < grown["resumed_step"] < STEPS
    assert "recovered from crash of rank 2 in place: world 4 -> 3" in result.stdout
    assert "world grew 3 -> 4" in result.stdout


def test_layouts_that_cannot_shrink_fall_back_to_restart_mode():
    cfg = load_config("tiny", BASE + COMMON + ["resilience.mode=elastic"])
    assert layout_fallback(copy.deepcopy(cfg), 4) is None
    assert batch_fallback(24, 2, 3) is None
    assert "not divisible" in batch_fallback(16, 4, 3)
    assert "tp=2" in layout_fallback(load_config("tiny", BASE + COMMON + ["parallel.tp=2"]), 4)
    # global batch 16 of micro-batches 4: dp 3 cannot keep it
    assert "not divisible" in layout_fallback(load_config("tiny", BASE + ["resilience.mode=elastic"]), 4)


def test_tensor_parallel_job_falls_back_to_restart_mode_and_says_so(tmp_path):
    result = train_cli(tmp_path / "run", BASE + ["train.steps=6", "train.global_batch=8", "train.micro_batch=2",
                                                 "parallel.tp=2", "resilience.mode=elastic",
                                                 "resilience.snapshot_every=2", "fault.inject=crash@rank=1,step=4"],
                       nproc=2, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "falling back to restart mode" in result.stderr
    events = read(tmp_path / "run" / "events.jsonl")
    assert events[0]["event"] == "elastic_fallback" and "tp=2" in events[0]["reason"]
    (recovered,) = [e for e in events if e["event"] == "recovered"]
    assert recovered["world_size_before"] == recovered["world_size_after"] == 2  # restarted, not shrunk
    assert events[-1]["event"] == "finished"
