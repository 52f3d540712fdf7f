"""A Chrome / Perfetto trace of what each rank did: one file per rank, spans of time.

With log.trace = true every rank records a span for each forward, backward, weight-gradient
pass, send, receive and collective, and writes `trace-rank{R}.json` in the Chrome trace-event
format (open it in ui.perfetto.dev or chrome://tracing; load several ranks' files together to
see the pipeline and its bubbles). Spans are "complete" events (ph "X"): pid is the rank, and
each category gets its own row (tid) so compute and communication do not hide each other.

Timestamps are wall-clock microseconds (time.time_ns at start-up, advanced by the monotonic
perf_counter) so files from different processes line up on one timeline, while a span's
duration never suffers from the wall clock being adjusted.

Spans time the host. On an accelerator, kernels run asynchronously, so the caller must make a
span end when the work is done (e.g. synchronise the stream) for the durations to mean anything.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

COMPUTE = "compute"
SEND = "send"
RECV = "recv"
COLLECTIVE = "collective"


def trace_file_name(rank: int) -> str:
    return f"trace-rank{rank}.json"


class TraceRecorder:
    """Collects spans for one rank in memory; `write` saves them. Everything is a no-op when disabled."""

    def __init__(self, rank: int, enabled: bool = True):
        self.rank = rank
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []
        self._tids: dict[str, int] = {}
        self._wall_origin_ns = time.time_ns()
        self._perf_origin_ns = time.perf_counter_ns()

    def now_us(self) -> float:
        """The current time on this trace's clock (use it to mark a step's start and end)."""
        return (self._wall_origin_ns + time.perf_counter_ns() - self._perf_origin_ns) / 1000.0

    def _tid(self, category: str) -> int:
        # Rows are numbered in order of first use, so the same category keeps one row.
        if category not in self._tids:
            self._tids[category] = len(self._tids)
        return self._tids[category]

    def add(self, name: str, category: str, start_us: float, end_us: float, **args: Any) -> None:
        """Record a span whose times were measured elsewhere (e.g. an async op found complete later)."""
        if not self.enabled:
            return
        event: dict[str, Any] = {"name": name, "cat": category, "ph": "X", "ts": start_us,
                                 "dur": max(end_us - start_us, 0.0), "pid": self.rank, "tid": self._tid(category)}
        if args:
            event["args"] = args
        self.events.append(event)

    @contextmanager
    def span(self, name: str, category: str = COMPUTE, **args: Any) -> Iterator[None]:
        """Time the body as one span. Recorded even if the body raises: a failed op is worth seeing."""
        if not self.enabled:
            yield
            return
        start = self.now_us()
        try:
            yield
        finally:
            self.add(name, category, start, self.now_us(), **args)

    def _metadata(self) -> list[dict[str, Any]]:
        """Name the process and rows so the viewer shows 'rank 3 / compute' rather than numbers."""
        meta: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": self.rank, "tid": 0,
                                       "args": {"name": f"rank {self.rank}"}},
                                      {"name": "process_sort_index", "ph": "M", "pid": self.rank, "tid": 0,
                                       "args": {"sort_index": self.rank}}]
        for category, tid in self._tids.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid,
                         "args": {"name": category}})
        return meta

    def write(self, path: Path) -> None:
        """Write the whole trace (metadata first, then spans in recording order) atomically."""
        if not self.enabled:
            return
        document = {"traceEvents": self._metadata() + self.events, "displayTimeUnit": "ms"}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temporary file in the same folder, then rename: a reader never sees half a trace.
        # (Not plait.data's helper: that would make the tracer import torch and the data stack.)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(document))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def idle_fraction(events: Iterable[dict[str, Any]], start_us: float, end_us: float,
                  categories: Iterable[str] = (COMPUTE,)) -> float:
    """Fraction of [start_us, end_us] that no span of `categories` covers: a rank's bubble.

    Overlapping or nested spans count once, and spans are clipped to the window, so the answer
    is in [0, 1]. Averaged over a step's pipeline ranks this is the pp_bubble metric.
    """
    window = end_us - start_us
    if window <= 0:
        raise ValueError(f"empty window [{start_us}, {end_us}]")
    wanted = set(categories)
    intervals = sorted((max(e["ts"], start_us), min(e["ts"] + e["dur"], end_us))
                       for e in events if e.get("ph") == "X" and e.get("cat") in wanted)
    covered = 0.0
    reach = start_us  # end of the union so far
    for lo, hi in intervals:
        lo = max(lo, reach)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return 1.0 - covered / window
