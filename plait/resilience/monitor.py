"""Name the faulty rank from the ranks' heartbeats: crash, hang or slow.

Synchronous training is periodic and uniform across ranks, so the odd one out is the culprit:
- crash: the process is gone (or, on another host, its heartbeat stopped) without saying it
  finished. When one rank dies, its peers fail too, in the collective it never entered
  ("connection reset by peer"), and may exit before it is even seen gone. So the monitor
  gathers evidence for `settle_s` after the first exit (every process's last heartbeat,
  further exits) and then names as culprit the member that never arrived in a collective
  others were waiting in; the members that failed while waiting are `collateral`. Without
  such evidence an abrupt death (no last "failed" heartbeat) beats an exit through an
  exception, and the first seen gone beats the later;
- hang: ranks have waited in collective #s of a group that a live member never entered (its
  watchdog still beats: the process is there, its main thread is stuck) for longer than
  max(`hang_min_s`, `hang_k` x the median step time). Only a member that is training counts:
  past its first `warmup_steps` steps and outside the phases the loop announces as possibly
  long (evaluation, checkpoint, snapshot, the end of the run); there `backstop_s` applies
  (parallel.timeout_s / 2). An explicit `resilience.hang_s` applies everywhere;
- slow: per step, each rank's lateness is the most any rank waited in collectives minus what
  it waited itself (the last to arrive waits least). A rank is slow when its median lateness
  over the last `window` steps exceeds the median of all ranks' lateness by `k` median
  absolute deviations, and by at least `min_fraction` of a step and `min_s` seconds: robust to
  jitter and to the odd slow step (a checkpoint, an evaluation), and clock-free (durations,
  never timestamps).

The classifiers are pure functions of heartbeat dicts (see heartbeat.py), tested on synthetic
timings. `Monitor` runs them in a thread of the launcher: it outlives the workers, and unlike
rank 0 it cannot itself be the rank that crashed or hung.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plait.resilience.heartbeat import KEY
from plait.resilience.inject import fired_faults
from plait.resilience.processes import host_label
from plait.resilience.usage_errors import usage_error_noted

FAULT_KEY = "plait/fault/{generation}"  # the detection record the restarted workers read
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x this = its standard deviation


@dataclass
class Verdict:
    kind: str  # crash | hang | slow
    rank: int
    host: str = ""
    pid: int = 0
    group: str = ""
    collective: str = ""
    seq: int = 0
    step: int = 0
    onset: float | None = None  # wall time the fault is estimated to have begun
    detail: str = ""
    waiting_ranks: list[int] = field(default_factory=list)
    collateral: list[int] = field(default_factory=list)  # ranks that failed because of the culprit


@dataclass(frozen=True)
class HangRule:
    """When a wait in a collective that a live member never entered becomes a hang."""

    min_s: float = 5.0  # resilience.hang_min_s
    k: float = 10.0  # resilience.hang_k: x the median step time
    warmup_steps: int = 3  # resilience.warmup_steps
    explicit_s: float = 0.0  # resilience.hang_s: when set, the threshold in every phase
    backstop_s: float = 300.0  # warm-up and long phases: parallel.timeout_s / 2

    @classmethod
    def from_config(cls, cfg: Any) -> HangRule:
        r = cfg.resilience
        return cls(min_s=r.hang_min_s, k=r.hang_k, warmup_steps=r.warmup_steps, explicit_s=r.hang_s,
                   backstop_s=cfg.parallel.timeout_s / 2)

    def threshold(self, laggard: dict, step_time_s: float | None) -> float:
        """How long the others may wait for `laggard` (its heartbeat) before it is hung."""
        if self.explicit_s > 0:
            return self.explicit_s
        training = (laggard.get("phase", "step") == "step"
                    and laggard.get("steps_done", self.warmup_steps) >= self.warmup_steps)
        if training and step_time_s is not None:
            return max(self.min_s, self.k * step_time_s)
        return self.backstop_s


def _laggards(beats: dict[int, dict], candidates: list[int], now: float
              ) -> dict[int, tuple[dict, list[int], float]]:
    """Per candidate that never entered a collective others are (or were, when they failed)
    waiting in: (that collective, every rank waiting in it, the longest wait), the longest
    wait's collective where there are several."""
    found: dict[int, tuple[dict, list[int], float]] = {}
    for rank, beat in beats.items():
        flight = beat.get("inflight")
        if not flight:
            continue
        # A final heartbeat ("failed") stopped the clock: the wait ended with the process.
        waited = flight["waiting_s"] + (max(0.0, now - beat["time"]) if beat.get("state") == "running" else 0.0)
        where = (flight["group"], flight["seq"])
        for other in flight["ranks"]:
            if other not in candidates or other not in beats or beats[other]["entered"].get(where[0], 0) >= where[1]:
                continue  # not a candidate, or it did enter
            previous = found.get(other)
            if previous is not None and (previous[0]["group"], previous[0]["seq"]) == where:
                found[other] = (flight, previous[1] + [rank], max(previous[2], waited))
            elif previous is None or previous[2] < waited:  # the longest wait's collective
                found[other] = (flight, [rank], waited)
    return {rank: (flight, sorted(waiting), waited) for rank, (flight, waiting, waited) in found.items()}


def _laggard(beats: dict[int, dict], candidates: list[int], now: float, min_wait_s: float
             ) -> tuple[int, dict, list[int], float] | None:
    """The candidate others have waited for longest, if at least min_wait_s:
    (culprit, the collective, every rank waiting in it, the longest wait)."""
    found = _laggards(beats, candidates, now)
    if not found:
        return None
    culprit, (flight, waiting, waited) = max(found.items(), key=lambda item: item[1][2])
    if waited < min_wait_s:
        return None
    return culprit, flight, waiting, waited


def abrupt(beat: dict) -> bool:
    """Gone without a last word: its final heartbeat never said "failed" (an exception exit)."""
    return beat.get("state") == "running"


def collateral_of(beats: dict[int, dict], culprit: int, gone: list[int]) -> list[int]:
    """The other ranks that failed: gone, or alive but reporting their group broke ("failed")."""
    return sorted(r for r, b in beats.items() if r != culprit and (r in gone or b.get("state") == "failed"))


def find_crash(beats: dict[int, dict], gone: list[int], now: float) -> Verdict | None:
    """`gone`: ranks whose process has ended without reporting a clean finish, first seen first."""
    if not gone:
        return None
    found = _laggards(beats, gone, now)
    if found:
        # Among the ranks others waited for, one that died abruptly is the cause; a rank that
        # left through an exception before entering may itself have been collateral elsewhere.
        rank = max(found, key=lambda r: (abrupt(beats[r]), found[r][2], -gone.index(r)))
        flight, waiting, _ = found[rank]
        beat = beats[rank]
        return Verdict("crash", rank, beat["host"], beat["pid"], flight["group"], flight["op"], flight["seq"],
                       beat["step"], onset=beat["time"], waiting_ranks=waiting,
                       collateral=collateral_of(beats, rank, gone),
                       detail=f"gone before collective #{flight['seq']} of group {flight['group']}, "
                              f"in which ranks {waiting} waited")
    # No evidence of who left the others waiting: an abrupt death beats an exception exit.
    rank = min(gone, key=lambda r: (not abrupt(beats[r]), gone.index(r)))
    beat = beats[rank]
    flight = beat.get("inflight")
    if flight:
        where = (flight["group"], flight["op"], flight["seq"])
        detail = f"process gone; last seen in {flight['op']} #{flight['seq']} of group {flight['group']}"
    else:
        where = tuple(beat.get("last") or ("", "", 0))
        detail = (f"process gone after completing {where[1]} #{where[2]} of group {where[0]}" if where[0]
                  else "process gone")
    if beat.get("state") == "failed":
        detail += " (it exited with an error)"
    return Verdict("crash", rank, beat["host"], beat["pid"], *where, beat["step"], onset=beat["time"], detail=detail,
                   collateral=collateral_of(beats, rank, gone))


def median_step_time(beats: dict[int, dict]) -> float | None:
    times = [s[2] for b in beats.values() for s in b.get("steps", [])]
    return statistics.median(times) if times else None


def find_hang(beats: dict[int, dict], now: float, hang_s: float = 0.0, rule: HangRule | None = None
              ) -> Verdict | None:
    """A live member the others have waited for past its threshold (`rule`, or `hang_s` everywhere)."""
    rule = rule or HangRule(explicit_s=hang_s)
    live = [r for r, b in beats.items() if b.get("training") and b.get("state") == "running"]
    step_time = median_step_time(beats)
    overdue = {r: found for r, found in _laggards(beats, live, now).items()
               if found[2] >= rule.threshold(beats[r], step_time)}
    if not overdue:
        return None
    rank, (flight, waiting, waited) = max(overdue.items(), key=lambda item: item[1][2])
    beat = beats[rank]
    threshold = rule.threshold(beat, step_time)
    return Verdict("hang", rank, beat["host"], beat["pid"], flight["group"], flight["op"], flight["seq"],
                   beat["step"], onset=now - waited, waiting_ranks=waiting,
                   detail=f"ranks {waiting} waited {waited:.1f} s in collective #{flight['seq']} "
                          f"of group {flight['group']}, which rank {rank} never entered "
                          f"(threshold {threshold:.1f} s, rank {rank} in phase {beat.get('phase', 'step')})")


def lateness_by_rank(beats: dict[int, dict], window: int) -> tuple[dict[int, list[float]], list[float]] | None:
    """Per rank, its lateness in each of the last `window` steps all ranks reported; and step times."""
    per_rank = {r: {s[0]: s for s in b.get("steps", [])} for r, b in beats.items()}
    common = set.intersection(*(set(s) for s in per_rank.values())) if per_rank else set()
    steps = sorted(common)[-window:]
    if window == 0 or len(steps) < window:
        return None
    late: dict[int, list[float]] = {r: [] for r in per_rank}
    for step in steps:
        waits = {r: per_rank[r][step][1] for r in per_rank}
        most = max(waits.values())
        for r, wait in waits.items():
            late[r].append(most - wait)
    step_times = [per_rank[r][s][2] for r in per_rank for s in steps]
    return late, step_times


def find_slow(beats: dict[int, dict], k: float, window: int, min_fraction: float,
              min_s: float = 0.0) -> list[Verdict]:
    measured = lateness_by_rank(beats, window)
    if measured is None:
        return []
    late, step_times = measured
    pooled = [x for values in late.values() for x in values]
    centre = statistics.median(pooled)
    mad = statistics.median(abs(x - centre) for x in pooled)
    floor = max(min_fraction * statistics.median(step_times), min_s)
    threshold = centre + max(k * MAD_TO_SIGMA * mad, floor)
    verdicts = []
    for rank, values in sorted(late.items()):
        typical = statistics.median(values)
        if typical > threshold:
            beat = beats[rank]
            # The collective the punctual ranks waited in longest, in the newest step.
            others = [b["steps"][-1] for r, b in beats.items() if r != rank and b.get("steps")]
            group, op = (others[0][3], others[0][4]) if others else ("", "")
            verdicts.append(Verdict(
                "slow", rank, beat["host"], beat["pid"], group, op, 0, beat["step"],
                detail=f"arrives {typical:.3f} s late per step (median of {window} steps; "
                       f"threshold {threshold:.3f} s = median {centre:.3f} s + max({k:g} MADs, "
                       f"{min_fraction:g} of a {statistics.median(step_times):.3f} s step, {min_s:g} s))"))
    return verdicts


def process_gone(pid: int) -> bool:
    """True when `pid` (on this host) has exited, zombies included (not yet reaped by the agent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False


HEARTBEAT_FIELDS = {"rank": int, "generation": int, "pid": int, "host": str, "state": str, "time": (int, float),
                    "step": int, "entered": dict, "completed": dict, "steps": list}


def parse_heartbeat(raw: bytes, rank: int) -> dict | None:
    """A heartbeat as the watchdog writes it (JSON with the expected fields), else None: the
    store is reachable by other local processes, and what they write is data, never trusted."""
    try:
        beat = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(beat, dict) or beat.get("rank") != rank:
        return None
    if not all(isinstance(beat.get(name), kind) for name, kind in HEARTBEAT_FIELDS.items()):
        return None
    return beat


class Monitor:
    """A launcher thread: reads heartbeats, names faults in events.jsonl and on stderr, kills a hung rank."""

    def __init__(self, store: Any, world_size: int, run_dir: Path, heartbeat_s: float, hang_s: float,
                 slow_k: float, slow_window: int, slow_min_fraction: float, restart: bool,
                 slow_min_s: float = 0.0, local_pids: Callable[[], dict[int, int]] | None = None,
                 hang_rule: HangRule | None = None, settle_s: float = 0.0):
        """`hang_s`: an explicit hang threshold for every phase (0: `hang_rule` decides);
        `settle_s`: how long to gather evidence after the first rank is seen gone."""
        self.store, self.world_size, self.run_dir = store, world_size, run_dir
        self.poll_s = min(0.05, heartbeat_s / 2)
        self.stale_s = max(20 * heartbeat_s, 10.0)  # a heartbeat this old on another host: crashed
        self.restart = restart
        self.hang_rule = hang_rule if hang_rule is not None else HangRule(explicit_s=hang_s)
        if hang_s > 0 and hang_rule is not None:
            self.hang_rule = dataclasses.replace(hang_rule, explicit_s=hang_s)
        self.settle_s = settle_s
        self.first_gone_at: float | None = None  # when this generation's first exit was seen
        self.elastic = False  # resilience.mode=elastic: the survivors go on in place
        self.slow = (slow_k, slow_window, slow_min_fraction, slow_min_s)
        # rank -> pid of the workers this launcher started (the current generation). Only these
        # are ever signalled, and their liveness is read from them, never from a heartbeat's pid:
        # the store is reachable by any local process, and a forged heartbeat must not make the
        # monitor kill or judge another process.
        self.local_pids = local_pids
        self.host = host_label()
        self.generation = -1  # the newest worker generation seen
        self.handled: set[int] = set()  # generations whose crash or hang has been reported
        self.slow_reported: set[tuple[int, int]] = set()
        self.gone: list[int] = []
        self.verdicts: list[Verdict] = []
        self.verdict_of: dict[int, Verdict] = {}  # generation -> its crash or hang
        self._decided = threading.Condition()
        self._used_markers: set[tuple] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plait-monitor", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _read(self) -> dict[int, dict]:
        beats = {}
        for rank in range(self.world_size):
            key = KEY.format(rank=rank)
            if self.store.check([key]):
                beat = parse_heartbeat(self.store.get(key), rank)
                if beat is not None:
                    beats[rank] = beat
        newest = max((b["generation"] for b in beats.values()), default=-1)
        if newest > self.generation:  # the launcher restarted the workers: start afresh
            self.generation, self.gone, self.first_gone_at = newest, [], None
        return {r: b for r, b in beats.items() if b["generation"] == self.generation}

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                # Liveness first, heartbeats second: a rank that said "done" before it exited
                # is then always seen done, never as a crash.
                dead = self.dead_ranks(self._read(), time.time())
                self.check(self._read(), time.time(), dead)
            except Exception as exc:  # noqa: BLE001 - the monitor must never take the job down
                if self._stop.is_set():
                    return
                print(f"plait: monitor: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def dead_ranks(self, beats: dict[int, dict], now: float) -> set[int]:
        """Ranks whose process is gone (started by this launcher) or whose heartbeat stopped."""
        pids = self.local_pids() if self.local_pids is not None else {}
        dead = set()
        for rank, beat in beats.items():
            if rank in pids:
                gone = process_gone(pids[rank])
            elif self.local_pids is None and beat["host"] == self.host:  # (unit tests: no launcher)
                gone = process_gone(beat["pid"])
            else:
                gone = now - beat["time"] > self.stale_s
            if gone:
                dead.add(rank)
        return dead

    def check(self, beats: dict[int, dict], now: float, dead: set[int] | None = None) -> None:
        if self.generation in self.handled or not beats or usage_error_noted():
            return  # (a usage error ends the job: its exits are not faults)
        dead = self.dead_ranks(beats, now) if dead is None else dead
        self._add_silent_dead(beats, dead, now)
        for rank, beat in beats.items():
            if rank in dead and beat["state"] != "done" and rank not in self.gone:
                self.gone.append(rank)
        if self.gone and self.first_gone_at is None:
            self.first_gone_at = now
        if self.gone and now - self.first_gone_at < self.settle_s and len(dead) < len(beats):
            return  # the culprit's peers may still be failing: wait for their last heartbeats
        verdict = find_crash(beats, self.gone, now) or find_hang(beats, now, rule=self.hang_rule)
        if verdict is not None:
            # The ranks left waiting for the culprit fail with it, whether or not they have yet.
            verdict.collateral = sorted(set(collateral_of(beats, verdict.rank, self.gone))
                                        | set(verdict.waiting_ranks) - {verdict.rank})
            self.handled.add(self.generation)
            self._report(verdict, now)
            with self._decided:
                self.verdict_of[self.generation] = verdict
                self._decided.notify_all()
            pid = (self.local_pids() if self.local_pids is not None else {}).get(verdict.rank)
            # Only the process that published the silent heartbeat: under an elastic launcher a
            # rank number can pass to another worker between the heartbeat and this verdict.
            if verdict.kind == "hang" and pid is not None and pid == beats[verdict.rank]["pid"]:
                # Its peers would only fail at the collective timeout; end it now so the
                # launcher restarts the workers (or, in mode none, the job ends) sooner.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        running = {r: b for r, b in beats.items() if b["state"] == "running"}
        if len(running) == self.world_size:
            for verdict in find_slow(running, *self.slow):
                if (self.generation, verdict.rank) not in self.slow_reported:
                    self.slow_reported.add((self.generation, verdict.rank))
                    self._report(verdict, now)

    def _add_silent_dead(self, beats: dict[int, dict], dead: set[int], now: float) -> None:
        """A worker of this launcher that died before publishing a single heartbeat: an empty
        one (it entered nothing), so that it can be named, and its peers are not."""
        pids = self.local_pids() if self.local_pids is not None else {}
        for rank, pid in pids.items():
            if rank not in beats and 0 <= rank < self.world_size and process_gone(pid):
                beats[rank] = {"rank": rank, "generation": self.generation, "pid": pid, "host": self.host,
                               "state": "running", "time": now, "step": 0, "training": False, "entered": {},
                               "completed": {}, "inflight": None, "steps": [], "last": ["", "", 0]}
                dead.add(rank)

    def await_verdict(self, generation: int, timeout_s: float) -> Verdict | None:
        """The crash or hang of worker generation `generation`, once named (None after
        timeout_s): the launcher waits for it before it stops the survivors, whose deaths
        would otherwise read as more crashes."""
        with self._decided:
            self._decided.wait_for(lambda: generation in self.verdict_of, timeout=timeout_s)
            return self.verdict_of.get(generation)

    def _onset(self, verdict: Verdict) -> float | None:
        """When an injected fault fired (its marker), else the classifier's estimate."""
        for fired in reversed(fired_faults(self.run_dir)):
            key = (fired["kind"], fired["rank"], fired["time"])
            if fired["rank"] == verdict.rank and fired["kind"] == verdict.kind and key not in self._used_markers:
                self._used_markers.add(key)
                return fired["time"]
        return verdict.onset

    def _report(self, verdict: Verdict, now: float) -> None:
        onset = self._onset(verdict)
        latency = None if onset is None else round(max(0.0, now - onset), 3)
        if verdict.kind == "slow":
            action = "reported"
        elif self.elastic:
            action = "elastic"
        elif self.restart:
            action = "restart"
        else:
            action = "stop"
        record = {"event": "fault_detected", "time": now, **asdict(verdict), "collective": verdict.collective,
                  "detection_latency_s": latency, "generation": self.generation,
                  "world_size": self.world_size, "action": action}
        record.pop("onset")
        self.verdicts.append(verdict)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "events.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        where = f" [{verdict.collective}" + (f" #{verdict.seq}" if verdict.seq else "") + f", group {verdict.group}]"
        where = where if verdict.group else ""
        print(f"plait: fault detected: {verdict.kind} of rank {verdict.rank} (host {verdict.host}, pid "
              f"{verdict.pid}) at step {verdict.step}{where}: {verdict.detail}"
              + (f"; detected {latency:.2f} s after it began" if latency is not None else "")
              + (f"; ranks {verdict.collateral} failed in its wake" if verdict.collateral else "")
              + ("; restarting the workers" if action == "restart" else ""), file=sys.stderr, flush=True)
        if verdict.kind != "slow":
            self.store.set(FAULT_KEY.format(generation=self.generation), json.dumps(record))
