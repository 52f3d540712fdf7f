"""Crash consistency of checkpoints written in the background, and the writer's promises.

A 2-process `plait train` run checkpoints every 2 steps (in the background: the default). It is
SIGKILLed, launcher and workers at once, at 5 seeded random moments inside checkpoint writes;
each time only a committed checkpoint may count, the next start resumes from the newest one and
removes the cut write's folder, and at the end the losses equal those of a run never killed at
every step.

To land inside a write, whose files for this small model take milliseconds, the runs set the
test-only PLAIT_TEST_CHECKPOINT_PAUSE_S (plait/train/checkpoint.py): the writer sleeps that long
after making the temporary folder, after writing the pieces, and with the manifest written
before the rename. The test waits for the temporary folder of the step it aims at to appear,
then kills after a random delay shorter than the three pauses (one in each fifth of them), so
every kill falls between the folder's creation and the rename, at a random stage of it.

In-process checks (two gloo ranks): staging buffers are allocated once and reused; a failure
of a background write is raised at the next checkpoint, on every rank, as the machine's refusal.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import run_on_ranks
from plait import config as config_mod
from plait.train import checkpoint as ckpt
from scenarios import BASE, read_jsonl, train_cli

pytestmark = pytest.mark.timeout(300)

STEPS, EVERY = 12, 2
OVERRIDES = BASE + [f"train.steps={STEPS}", f"checkpoint.every={EVERY}"]
TARGETS = [4, 6, 8, 10, 12]  # the checkpoint whose write each kill cuts short
PAUSE_S = 0.15  # each of the writer's three test pauses


def checkpoints(run: Path) -> Path:
    return run / "checkpoints"


def train_args(run: Path) -> list[str]:
    args = [sys.executable, "-m", "plait", "train", "--nproc", "2", "--run-dir", str(run)]
    for item in OVERRIDES:
        args += ["--set", item]
    return args


def start_job(run: Path, env: dict[str, str]) -> subprocess.Popen:
    """`plait train --nproc 2` in a session of its own, so that one killpg reaches every process."""
    return subprocess.Popen(train_args(run), env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_inside_write(job: subprocess.Popen, folder: Path, delay_s: float) -> None:
    """SIGKILL the whole job `delay_s` after `folder` (a write's temporary folder) appears."""
    while not folder.exists():
        if job.poll() is not None:
            raise AssertionError(f"the job ended before writing {folder.name}: {job.stderr.read()[-3000:]}")
        time.sleep(0.002)
    time.sleep(delay_s)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    job.stderr.close()


def newest_committed(run: Path) -> int | None:
    path, rejected = ckpt.newest_valid(checkpoints(run))
    assert rejected == [], rejected  # a cut write never leaves a checkpoint that looks complete
    return int(json.loads((path / ckpt.MANIFEST).read_text())["step"]) if path else None


def test_sigkill_inside_checkpoint_writes_resumes_from_the_newest_committed(tmp_path):
    straight = train_cli(tmp_path / "straight", OVERRIDES, nproc=2)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")}

    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", ckpt.TEST_PAUSE_ENV: str(PAUSE_S)}
    # One random moment in each fifth of the three pauses, in random order: every stage of a
    # write (folder only, pieces written, manifest written) is cut at least once.
    rng = random.Random(18)
    fifth = 3 * PAUSE_S / len(TARGETS)
    delays = [(i + rng.random()) * fifth for i in range(len(TARGETS))]
    rng.shuffle(delays)
    expected_resumes = []
    for target, delay in zip(TARGETS, delays):
        cut = checkpoints(run) / f".tmp-{ckpt.step_dir_name(target)}"
        kill_inside_write(start_job(run, env), cut, delay)
        assert cut.is_dir()  # killed inside the write: its folder is still there
        print(f"killed {delay * 1000:.0f} ms into the write of step {target}: left {sorted(os.listdir(cut))}")
        # The write in flight never counts; the one before it was committed before it began.
        assert newest_committed(run) == target - EVERY
        expected_resumes.append(target - EVERY)

    final = subprocess.run(train_args(run), env=env, capture_output=True, text=True, timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]
    events = read_jsonl(run / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resumed"] == expected_resumes
    assert events[-1]["event"] == "finished"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # redone rows replaced, none lost
    for row in rows:
        assert abs(row["loss"] - reference[row["step"]]) <= 1e-6, (row["step"], row["loss"], reference[row["step"]])
    assert newest_committed(run) == STEPS
    assert not list(checkpoints(run).glob(".tmp-*"))

    # A start removes what a cut write left before anything else: here it has nothing to train
    # and writes no checkpoint, so the start alone can have removed it.
    leftover = checkpoints(run) / f".tmp-{ckpt.step_dir_name(STEPS + EVERY)}"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"cut short")
    again = train_cli(run, OVERRIDES, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to train" in again.stdout
    assert not leftover.exists()


# --- the writer, in process ---------------------------------------------------------------


def test_staging_buffers_are_reused_until_a_box_changes():
    import torch

    from plait.parallel.pieces import Piece
    from plait.train.async_writer import StagingBuffers

    bucket = torch.arange(10, dtype=torch.float32)
    pieces = [Piece("model/a", (6,), (0,), bucket[0:6], True), Piece("model/b", (4,), (0,), bucket[6:10], True),
              Piece("model/c", (4,), (0,), bucket[6:10], False)]  # another rank writes c: not staged
    staging = StagingBuffers()
    first, _ = staging.stage(pieces)
    assert [p.key for p in first] == ["model/a", "model/b"] and staging.allocations == 2
    assert first[0].tensor.untyped_storage().nbytes() == 6 * 4  # a tensor of its own, not a view of the bucket
    bucket += 100  # training goes on: the staged copy keeps the values of the checkpoint's step
    assert first[0].tensor.tolist() == [0, 1, 2, 3, 4, 5]
    second, _ = staging.stage(pieces)
    assert all(a.tensor is b.tensor for a, b in zip(second, first)) and staging.allocations == 2  # the same buffers
    assert second[1].tensor.tolist() == [106, 107, 108, 109]
    resized = [Piece("model/a", (6,), (0,), bucket[0:6], True), Piece("model/b", (3,), (0,), bucket[6:9], True)]
    third, _ = staging.stage(resized)
    assert third[0].tensor is first[0].tensor and third[1].tensor is not first[1].tensor
    assert staging.allocations == 3 and staging.bytes == (6 + 3) * 4


def _trainer(run_dir: str, steps: int):
    from plait.train.runtime import init_runtime
    from plait.train.trainer import Trainer

    # ZeRO-1: both ranks own and write pieces of the optimizer state.
    overrides = [f"train.steps={steps}", "checkpoint.every=1", "checkpoint.keep=2", "parallel.zero=1"]
    cfg = config_mod.load_config("tiny", BASE + overrides)
    return Trainer(cfg, Path(run_dir), init_runtime(cfg))


def writer_checks(rank: int, world_size: int, root: str) -> dict:
    import plait.train.async_writer as async_writer
    from plait.errors import CollectiveOSError

    os.environ["PLAIT_CACHE"] = str(Path(root) / "cache")
    found = {}
    # Four background checkpoints: every buffer is made at the first and reused after.
    trainer = _trainer(str(Path(root) / "reuse"), steps=4)
    try:
        trainer.start()
        trainer.fit()
        written = [p for p in trainer.parallel.state_pieces() if p.write]
        found["written_pieces"] = len(written)
        found["allocations"] = trainer.checkpointer.staging.allocations
        found["in_flight_after_fit"] = trainer.checkpointer.in_flight
    finally:
        trainer.close()

    # The write of step 1 fails on every rank; the checkpoint of step 2 raises it, before
    # writing anything of its own.
    real_write = async_writer.write_sharded_checkpoint

    def refused(root_dir, step, *args, **kwargs):
        if step == 1:
            raise CollectiveOSError(errno.ENOSPC, "No space left on device", str(root_dir))
        return real_write(root_dir, step, *args, **kwargs)

    async_writer.write_sharded_checkpoint = refused
    trainer = _trainer(str(Path(root) / "full"), steps=4)
    try:
        trainer.start()
        try:
            trainer.fit()
            found["raised"] = None
        except OSError as exc:
            found["raised"] = (type(exc).__name__, exc.errno, trainer.state.step)
    finally:
        async_writer.write_sharded_checkpoint = real_write
        trainer.close()
    return found


def test_staging_is_reused_and_a_background_failure_is_raised_at_the_next_checkpoint(tmp_path):
    for rank, found in enumerate(run_on_ranks(2, writer_checks, str(tmp_path))):
        assert found["allocations"] == found["written_pieces"] > 0, (rank, found)
        assert not found["in_flight_after_fit"]
        assert found["raised"] == ("CollectiveOSError", errno.ENOSPC, 2), (rank, found)
    kept = sorted(p.name for p in (tmp_path / "reuse" / "checkpoints").iterdir())
    assert kept == ["step-00000003", "step-00000004"]  # checkpoint.keep=2, pruned after each commit
    events = [e["event"] for e in read_jsonl(tmp_path / "reuse" / "events.jsonl")]
    assert events.count("checkpoint_saved") == 4 and events[-1] == "checkpoint_saved"
    assert not (tmp_path / "full" / "checkpoints").exists() or not list((tmp_path / "full" / "checkpoints").iterdir())


def test_a_crash_inside_a_swap_puts_the_replaced_checkpoint_back(tmp_path):
    """Re-saving a step swaps folders with two renames (checkpoint._commit); killed between
    them, the old folder is the step's only complete copy, and the next start restores it."""
    root = checkpoints(tmp_path)
    old = ckpt.write_checkpoint(root, 4, {"trainer.json": {"step": 4}})
    old.rename(root / f".tmp-old-{old.name}-4242")  # the first rename; the second never came
    (root / f".tmp-{old.name}").mkdir()  # the new copy, never committed
    ckpt.remove_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == [old.name]
    assert ckpt.problem_with(old) is None
