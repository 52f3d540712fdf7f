"""Layouts: one way to split a training job over devices, how to write one, and which exist.

`Layout` and the rules that decide which layouts run live in plait.layout, shared with config
validation. Rank order is tp (fastest varying), cp, dp, pp (slowest), the order Megatron-LM
uses: tensor parallel groups stay inside a node whenever tp <= gpus_per_node.
"""

from __future__ import annotations

from typing import Iterator

from plait.errors import ConfigError
from plait.layout import RECOMPUTE, Job, Layout, check_job
from plait.layout.pipeline import canonical_schedule
from plait.plan.models import ModelSpec

# What --layout may set (etp and pp_layers are runtime settings the estimator does not model yet).
PLANNER_KEYS = ("tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "schedule", "virtual_stages", "recompute",
                "sequence_parallel")
_INT_KEYS = {"tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "virtual_stages"}


def parse_layout(text: str, n_gpus: int | None = None) -> Layout:
    """Read `tp=8,pp=16,...`; dp left out is n_gpus / (tp pp cp)."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in PLANNER_KEYS:
            raise ConfigError(f"--layout item '{item}' must be key=value with key one of {', '.join(PLANNER_KEYS)}")
        if key in _INT_KEYS:
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"--layout {key}={value!r} must be an integer") from None
        elif key == "sequence_parallel":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"--layout sequence_parallel={value!r} must be true or false")
            values[key] = value.lower() == "true"
        elif key == "schedule":
            values[key] = canonical_schedule(value)
        else:
            values[key] = value
    if "dp" not in values and n_gpus is not None:
        others = int(values.get("tp", 1)) * int(values.get("pp", 1)) * int(values.get("cp", 1))
        values["dp"] = max(1, n_gpus // others)
    if values.get("pp", 1) == 1 and "schedule" not in values:
        values["schedule"] = "1f1b"
    if values.get("schedule") == "interleaved" and "virtual_stages" not in values:
        values["virtual_stages"] = 2
    return Layout(**values)


def check_layout(layout: Layout, model: ModelSpec, n_gpus: int, global_batch: int) -> str | None:
    """Why this layout cannot run, or None when it can: plait.layout's rules, the ones
    `plait train` validates its config with."""
    return check_job(Job(layout, model.shape(), n_gpus, global_batch))


def layers_per_stage(model: ModelSpec, layout: Layout) -> int:
    """Layers on the fullest stage: chunks of ceil(L / (pp v)) layers, v chunks per stage."""
    chunks = layout.pp * layout.virtual_stages
    return -(-model.n_layers // chunks) * layout.virtual_stages


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def enumerate_layouts(model: ModelSpec, n_gpus: int, global_batch: int, gpus_per_node: int) -> Iterator[Layout]:
    """Every layout that passes `check_layout`; memory is checked later, by the estimator.

    tp and cp take powers of two up to two nodes' worth (beyond that their traffic crosses the
    slow network on every layer); pp takes every divisor up to n_layers (stages may hold
    unequal numbers of layers, as in Llama 3 405B); micro-batches 1..16.
    """
    for tp in _powers_of_two(min(2 * gpus_per_node, model.n_heads)):
        for cp in _powers_of_two(min(32, model.seq_len // 1024 or 1)):
            if n_gpus % (tp * cp):
                continue
            for pp in _divisors(n_gpus // (tp * cp)):
                if pp > model.n_layers:
                    break
                dp = n_gpus // (tp * cp * pp)
                if global_batch % dp:
                    continue
                yield from _inner(model, n_gpus, global_batch, tp, cp, pp, dp)


def _inner(model: ModelSpec, n_gpus: int, global_batch: int, tp: int, cp: int, pp: int, dp: int) -> Iterator[Layout]:
    per_replica = global_batch // dp
    eps = [ep for ep in _powers_of_two(dp) if model.n_experts % ep == 0] if model.n_experts > 1 else [1]
    schedules: list[tuple[str, int]] = [("1f1b", 1)]
    if pp > 1:
        schedules += [("zb", 1), ("gpipe", 1)]
        schedules += [("interleaved", v) for v in (2, 3, 4, 6, 8) if pp * v <= model.n_layers]
    for micro_batch in (1, 2, 4, 8, 16):
        if per_replica % micro_batch:
            continue
        for ep in eps:
            for zero in (0, 1, 2, 3):
                for schedule, virtual in schedules:
                    for recompute in RECOMPUTE:
                        for sp in ((False, True) if tp > 1 else (False,)):
                            layout = Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, zero=zero,
                                            micro_batch=micro_batch, schedule=schedule,
                                            virtual_stages=virtual, recompute=recompute,
                                            sequence_parallel=sp)
                            if check_layout(layout, model, n_gpus, global_batch) is None:
                                yield layout
