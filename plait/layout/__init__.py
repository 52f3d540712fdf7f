"""Layouts and the one set of rules that says which of them can run.

A `Layout` is one way to split a training job over devices (tp, pp, dp, cp, ep, ZeRO stage,
micro-batch, pipeline schedule, recompute, ...). `check_job` walks the rules that each parallel
strategy owns (one module per strategy in this package, in `rules.RULES`) and returns the first
reason a job cannot run, or None. Config validation (`plait.config.validate`) and the planner
(`plait plan`) both ask it, so the two can never disagree about a layout.

This package is pure arithmetic on plain dataclasses: it imports nothing of torch or of the
strategies themselves, so it sits below the config in the package layers.
"""

from plait.layout.rules import RULES, check_job
from plait.layout.spec import RECOMPUTE, Features, Job, Layout, ModelShape

__all__ = ["RECOMPUTE", "RULES", "Features", "Job", "Layout", "ModelShape", "check_job"]
