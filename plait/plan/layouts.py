"""Layouts: one way to split a training job over devices, how to write one, and which exist.

`Layout` and the rules that decide which layouts run live in plait.layout, shared with config
validation. Rank order is tp (fastest varying), cp, dp, pp (slowest), the order Megatron-LM
uses: tensor parallel groups stay inside a node whenever tp <= gpus_per_node.
"""

from __future__ import annotations

import functools
from typing import Iterable, Iterator, Mapping

from plait.errors import ConfigError
from plait.layout import RECOMPUTE, Job, Layout, check_job
from plait.layout.pipeline import SCHEDULES, canonical_schedule
from plait.parallel.partition import balanced_counts, head_cost_in_layers
from plait.plan.models import ModelSpec

# What --layout may set (etp and pp_layers are runtime settings the estimator does not model yet).
PLANNER_KEYS = ("tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "schedule", "virtual_stages", "recompute",
                "sequence_parallel")
_INT_KEYS = {"tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "virtual_stages"}


def parse_pins(text: str) -> dict[str, object]:
    """Read `tp=8,pp=16,...` into the fields it fixes (nothing filled in)."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in PLANNER_KEYS:
            raise ConfigError(f"--layout item '{item}' must be key=value with key one of {', '.join(PLANNER_KEYS)}")
        if key in values:
            raise ConfigError(f"--layout {key} is given twice")
        if key in _INT_KEYS:
            try:
                number = int(value)
            except ValueError:
                raise ConfigError(f"--layout {key}={value!r} must be an integer") from None
            if number < (0 if key == "zero" else 1):
                raise ConfigError(f"--layout {key}={number} must be at least {0 if key == 'zero' else 1}")
            values[key] = number
        elif key == "sequence_parallel":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"--layout sequence_parallel={value!r} must be true or false")
            values[key] = value.lower() == "true"
        elif key == "schedule":
            values[key] = canonical_schedule(value)
            if values[key] not in SCHEDULES:
                raise ConfigError(f"--layout schedule={value!r} must be one of {', '.join(SCHEDULES)}")
        else:
            if value not in RECOMPUTE:
                raise ConfigError(f"--layout recompute={value!r} must be one of {', '.join(RECOMPUTE)}")
            values[key] = value
    return values


def check_pins(pins: dict[str, object], n_gpus: int) -> None:
    """Raise ConfigError naming the fields when the pinned degrees cannot fill n_gpus devices."""
    degrees = [k for k in ("tp", "pp", "cp", "dp") if k in pins]
    product = 1
    for key in degrees:
        product *= int(pins[key])  # type: ignore[call-overload]
    if len(degrees) == 4 and product != n_gpus:
        raise ConfigError(f"--layout tp x pp x dp x cp = {product} but --gpus is {n_gpus}")
    if n_gpus % product:
        names = " x ".join(f"{k}={pins[k]}" for k in degrees)
        raise ConfigError(f"--layout {names} = {product} does not divide --gpus {n_gpus}")


def parse_layout(text: str, n_gpus: int | None = None) -> Layout:
    """Read `tp=8,pp=16,...` as one exact layout: fields left out take their defaults, dp
    left out is n_gpus / (tp pp cp)."""
    values = parse_pins(text)
    if "dp" not in values and n_gpus is not None:
        others = int(values.get("tp", 1)) * int(values.get("pp", 1)) * int(values.get("cp", 1))  # type: ignore[call-overload]
        values["dp"] = max(1, n_gpus // others)
    if values.get("pp", 1) == 1 and "schedule" not in values:
        values["schedule"] = "1f1b"
    if values.get("schedule") == "interleaved" and "virtual_stages" not in values:
        values["virtual_stages"] = 2
    return Layout(**values)  # type: ignore[arg-type]


def check_layout(layout: Layout, model: ModelSpec, n_gpus: int, global_batch: int) -> str | None:
    """Why this layout cannot run, or None when it can: plait.layout's rules, the ones
    `plait train` validates its config with."""
    return check_job(Job(layout, model.shape(), n_gpus, global_batch))


def rank_chunk_layers(model: ModelSpec, layout: Layout) -> tuple[tuple[int, ...], ...]:
    """Layers of each model chunk of each pipeline rank, as plait splits them: the explicit
    `pp_layers` when given, else plait's cost balance (the last virtual stage also runs the
    LM head, so it takes fewer layers; plait.parallel.partition)."""
    v = layout.virtual_stages if layout.schedule == "interleaved" else 1
    return _rank_chunk_layers(model, layout.pp, v, layout.pp_layers)


@functools.lru_cache(maxsize=16384)
def _rank_chunk_layers(model: ModelSpec, pp: int, v: int, pp_layers: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    stages = pp * v
    if pp == 1:
        return ((model.n_layers,),)
    if model.n_layers < stages:  # check_layout refuses it; keep the arithmetic total
        return tuple((1,) * v for _ in range(pp))
    if pp_layers and len(pp_layers) == stages:
        counts = list(pp_layers)
    else:
        head_cost = head_cost_in_layers(model.dim, model.ffn_dim, model.vocab_size, model.seq_len,
                                        model.n_heads, model.n_kv_heads)
        counts = balanced_counts(model.n_layers, stages, 0.0, head_cost)
    return tuple(tuple(counts[c * pp + r] for c in range(v)) for r in range(pp))


def layers_per_stage(model: ModelSpec, layout: Layout) -> int:
    """Layers on the fullest pipeline rank (all its chunks)."""
    return max(sum(chunks) for chunks in rank_chunk_layers(model, layout))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _choices(pins: Mapping[str, object], key: str, default: Iterable) -> list:
    """The pinned value alone, or the searched candidates."""
    return [pins[key]] if key in pins else list(default)


def enumerate_layouts(model: ModelSpec, n_gpus: int, global_batch: int, gpus_per_node: int,
                      pinned: Mapping[str, object] | None = None) -> Iterator[Layout]:
    """Every layout that passes `check_layout` and keeps every pinned field; memory is checked
    later, by the estimator.

    Unpinned, tp and cp take powers of two up to two nodes' worth (beyond that their traffic
    crosses the slow network on every layer); pp takes every divisor up to n_layers (stages
    may hold unequal numbers of layers, as in Llama 3 405B); micro-batches 1..16; virtual
    stages 2, 3, 4, 6, 8 and the most the layers allow. A pinned value is used as given, even outside those lists.
    """
    pins = dict(pinned or {})
    for tp in _choices(pins, "tp", _powers_of_two(min(2 * gpus_per_node, model.n_heads))):
        for cp in _choices(pins, "cp", _powers_of_two(min(32, model.seq_len // 1024 or 1))):
            if n_gpus % (tp * cp):
                continue
            for pp in _choices(pins, "pp", _divisors(n_gpus // (tp * cp))):
                if pp > model.n_layers and "pp" not in pins:
                    break
                if n_gpus % (tp * cp * pp):
                    continue
                dp = n_gpus // (tp * cp * pp)
                if "dp" in pins and pins["dp"] != dp:
                    continue
                if global_batch % dp and "dp" not in pins:
                    continue
                yield from _inner(model, n_gpus, global_batch, tp, cp, pp, dp, pins)


def _inner(model: ModelSpec, n_gpus: int, global_batch: int, tp: int, cp: int, pp: int, dp: int,
           pins: Mapping[str, object]) -> Iterator[Layout]:
    per_replica = max(1, global_batch // dp)
    eps = [ep for ep in _powers_of_two(dp) if model.n_experts % ep == 0] if model.n_experts > 1 else [1]
    schedules: list[tuple[str, int]] = [("1f1b", 1)]
    if pp > 1:
        schedules += [("zb", 1), ("gpipe", 1)]
        # 2, 3, 4, 6, 8 and the most chunks the layers allow (7 for Llama 3 405B at pp 16)
        most = min(8, model.n_layers // pp)
        schedules += [("interleaved", v) for v in sorted({2, 3, 4, 6, 8, most}) if 2 <= v <= most]
    if "schedule" in pins:
        schedules = [c for c in schedules if c[0] == pins["schedule"]] or \
            [(str(pins["schedule"]), 2 if pins["schedule"] == "interleaved" else 1)]
    if "virtual_stages" in pins:
        virtual = int(pins["virtual_stages"])  # type: ignore[call-overload]
        # A pinned value outside the searched ones is still tried, so the rules can say why not.
        schedules = [c for c in schedules if c[1] == virtual] or \
            [(str(pins.get("schedule", "interleaved" if virtual > 1 else "1f1b")), virtual)]
    for micro_batch in _choices(pins, "micro_batch", (1, 2, 4, 8, 16)):
        if per_replica % micro_batch and "micro_batch" not in pins:
            continue
        for ep in _choices(pins, "ep", eps):
            for zero in _choices(pins, "zero", (0, 1, 2, 3)):
                for schedule, virtual in schedules:
                    for recompute in _choices(pins, "recompute", RECOMPUTE):
                        for sp in _choices(pins, "sequence_parallel", (False, True) if tp > 1 else (False,)):
                            layout = Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, zero=zero,
                                            micro_batch=micro_batch, schedule=schedule,
                                            virtual_stages=virtual, recompute=recompute,
                                            sequence_parallel=sp)
                            if check_layout(layout, model, n_gpus, global_batch) is None:
                                yield layout
