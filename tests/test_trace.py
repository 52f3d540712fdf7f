"""The Chrome/Perfetto trace writer and the idle fraction (pp_bubble) computed from its spans."""

import json

import pytest

from plait.parallel.pipeline_sim import simulate
from plait.parallel.schedules import build_schedule
from plait.trace import COMPUTE, SEND, TraceRecorder, idle_fraction, trace_file_name


def test_spans_are_complete_events_with_rank_and_category_rows(tmp_path):
    trace = TraceRecorder(rank=3)
    with trace.span("F", COMPUTE, microbatch=0, chunk=1):
        pass
    with trace.span("send", SEND, peer=4):
        pass
    with trace.span("B", COMPUTE, microbatch=0):
        pass
    path = tmp_path / trace_file_name(3)
    trace.write(path)
    assert path.name == "trace-rank3.json"
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in spans] == ["F", "send", "B"]
    assert all(e["pid"] == 3 and e["dur"] >= 0 for e in spans)
    assert spans[0]["tid"] == spans[2]["tid"] != spans[1]["tid"]
    assert spans[0]["args"] == {"microbatch": 0, "chunk": 1}
    assert spans[0]["ts"] <= spans[1]["ts"] <= spans[2]["ts"]
    rows = {e["args"]["name"]: e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert rows == {"compute": spans[0]["tid"], "send": spans[1]["tid"]}
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_span_is_recorded_when_the_body_raises():
    trace = TraceRecorder(rank=0)
    with pytest.raises(RuntimeError):
        with trace.span("F"):
            raise RuntimeError("boom")
    assert [e["name"] for e in trace.events] == ["F"]


def test_disabled_recorder_records_and_writes_nothing(tmp_path):
    trace = TraceRecorder(rank=0, enabled=False)
    with trace.span("F"):
        pass
    trace.add("B", COMPUTE, 0.0, 1.0)
    trace.write(tmp_path / "t.json")
    assert trace.events == [] and not (tmp_path / "t.json").exists()


def _span(ts, dur, cat=COMPUTE):
    return {"ph": "X", "cat": cat, "ts": ts, "dur": dur}


def test_idle_fraction_merges_overlaps_clips_to_window_and_ignores_other_categories():
    events = [_span(0, 10), _span(5, 10), _span(30, 20), _span(12, 5, cat=SEND), _span(-5, 7)]
    # window [0, 40]: compute covers [0, 15] and [30, 40] = 25 of 40.
    assert idle_fraction(events, 0, 40) == pytest.approx(15 / 40)
    assert idle_fraction(events, 0, 40, categories=(COMPUTE, SEND)) == pytest.approx(13 / 40)
    assert idle_fraction([], 0, 1) == 1.0
    with pytest.raises(ValueError):
        idle_fraction(events, 5, 5)


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("interleaved", 2), ("zb", 1)])
def test_trace_of_a_simulated_schedule_measures_the_schedule_bubble(name, v):
    """Spans recorded from a simulated step give back the simulator's idle fraction per rank."""
    result = simulate(build_schedule(name, 4, 8, v))
    for rank, timeline in enumerate(result.timelines):
        trace = TraceRecorder(rank)
        for span in timeline:
            trace.add(span.op.kind, COMPUTE, span.start * 1000, span.end * 1000, microbatch=span.op.microbatch)
        measured = idle_fraction(trace.events, 0, result.makespan * 1000)
        assert measured == pytest.approx(result.idle_fraction[rank], abs=1e-9)
