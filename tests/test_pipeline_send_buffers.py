"""The pipeline runner lets each send buffer go once its send is done, not at the end of the step.

Kept to the end of the step, a rank would hold every activation and gradient it sent: 2·m·v
buffers on a middle rank (16 here for 1F1B with m = 8). Freed as the schedule proves each send's
receive posted, a rank holds about as many as it has micro-batches in flight, which the schedule
bounds whatever m is. The steps must still match the dense model's.
"""

from __future__ import annotations

import pytest

from distributed import run_on_ranks
from test_pipeline_runtime import TOL, pipeline_checks

PP, M = 4, 8


def _layouts() -> list[dict]:
    layouts = [dict(schedule=schedule, v=1, m=M, tied=False, n_layers=8) for schedule in ("gpipe", "1f1b", "zb")]
    layouts.append(dict(schedule="interleaved", v=2, m=M, tied=False, n_layers=8))
    layouts[1]["steps"] = 2  # the second step starts from a clean slate too
    return layouts


@pytest.mark.timeout(120)
def test_send_buffers_held_at_once_stay_within_the_micro_batches_in_flight(tmp_path):
    layouts = _layouts()
    per_rank = run_on_ranks(PP, pipeline_checks, layouts, str(tmp_path))
    for i, layout in enumerate(layouts):
        outs = [results[i] for results in per_rank]
        for rank, out in enumerate(outs):
            for step in out["steps"]:
                assert step["loss_diff"] < TOL and step["grad_diff"] < TOL, (layout, rank, step)
            peak, limit = out["stats"].peak_pending_sends, out["limit"]
            # `limit` is the most micro-batches this rank holds at once (pp - rank for 1F1B, m for
            # GPipe); one more, as a new send is counted before the proof lets an older one go.
            assert peak <= limit + 1, (layout["schedule"], rank, peak, limit)
            if layout["schedule"] != "gpipe":  # fewer than one per (micro-batch, chunk)
                assert peak < M * layout["v"], (layout["schedule"], rank, peak)
        senders = [out["stats"].peak_pending_sends for out in outs]
        assert max(senders) >= 1, (layout["schedule"], senders)  # the counter does count
