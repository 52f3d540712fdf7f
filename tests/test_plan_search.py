"""Pinned search: `--layout` fixes some fields, the planner searches the others and never
changes a pinned one; bad pins are one-line errors with exit status 2."""

import subprocess
import sys

import pytest

from plait.errors import ConfigError
from plait.plan.cluster import PRESETS as CLUSTERS
from plait.plan.layouts import enumerate_layouts, parse_pins
from plait.plan.models import PRESETS
from plait.plan.search import pinned_search

PINS = [
    "tp=2",
    "pp=4",
    "tp=2,pp=2,dp=4",
    "micro_batch=2,zero=1",
    "schedule=interleaved,virtual_stages=3",
    "pp=2,schedule=zb",
    "recompute=selective,sequence_parallel=false",
    "tp=4,sequence_parallel=true,recompute=full,zero=3",
    "cp=2,micro_batch=1",
    "virtual_stages=1",
]


@pytest.mark.parametrize("text", PINS)
def test_a_pinned_field_is_never_changed_by_the_search(text):
    model, cluster, gpus, batch = PRESETS["llama3-8b"], CLUSTERS["h100-sxm"], 16, 512
    pins = parse_pins(text)
    layouts = list(enumerate_layouts(model, gpus, batch, cluster.gpus_per_node, pins))
    assert layouts, text
    for layout in layouts:
        assert all(getattr(layout, key) == value for key, value in pins.items()), (text, layout)
    result = pinned_search(model, cluster, gpus, batch, pins)
    assert result.best is not None
    for estimate in (result.best, result.runner_up):
        if estimate is not None:
            assert all(getattr(estimate.layout, key) == value for key, value in pins.items())
    # every field that is not pinned was searched, and more than one layout was tried
    assert set(result.searched).isdisjoint(pins) and result.considered > 1


def test_the_search_returns_the_fastest_fitting_layout_and_a_slower_runner_up():
    model, cluster = PRESETS["llama3-70b"], CLUSTERS["h100-sxm"]
    result = pinned_search(model, cluster, 256, 512, parse_pins("tp=8,pp=4"))
    assert result.best.fits and result.runner_up.fits
    assert result.best.step_time_s < result.runner_up.step_time_s
    assert "step time" in result.runner_up_lost
    assert result.fitting <= result.considered


def test_nothing_fits_gives_the_closest_layout_and_why():
    result = pinned_search(PRESETS["llama3-405b"], CLUSTERS["a100-40gb"], 8, 8, parse_pins("tp=8"))
    assert result.best is None and result.closest is not None
    assert not result.closest.fits and "GB" in result.closest.why


@pytest.mark.parametrize("text,field", [
    ("tp=x", "tp"), ("zero=-1", "zero"), ("micro_batch=0", "micro_batch"), ("schedule=bogus", "schedule"),
    ("recompute=half", "recompute"), ("sequence_parallel=maybe", "sequence_parallel"), ("foo=1", "foo"),
])
def test_bad_pins_name_the_field(text, field):
    with pytest.raises(ConfigError, match=field):
        parse_pins(text)


def test_bad_layout_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "plait", "plan", "--model", "llama3-8b", "--gpus", "8",
                           "--layout", "micro_batch=zero"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "micro_batch" in lines[0] and "Traceback" not in proc.stderr
