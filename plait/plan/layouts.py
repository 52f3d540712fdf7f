"""Layouts: one way to split a training job over devices, how to write one, and which exist.

Rank order is tp (fastest varying), cp, dp, pp (slowest), with ep carved out of dp, the order
Megatron-LM uses: tensor parallel groups stay inside a node whenever tp <= gpus_per_node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from plait.errors import ConfigError
from plait.plan.models import ModelSpec

SCHEDULES = ("1f1b", "interleaved", "gpipe", "zb-h1")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    micro_batch: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def short(self) -> str:
        return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.to_dict().items())


_INT_KEYS = {"tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "virtual_stages"}


def parse_layout(text: str, n_gpus: int | None = None) -> Layout:
    """Read `tp=8,pp=16,...`; dp left out is n_gpus / (tp pp cp)."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in Layout.__dataclass_fields__:
            raise ConfigError(f"--layout item '{item}' must be key=value with key one of {', '.join(Layout.__dataclass_fields__)}")
        if key in _INT_KEYS:
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"--layout {key}={value!r} must be an integer") from None
        elif key == "sequence_parallel":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"--layout sequence_parallel={value!r} must be true or false")
            values[key] = value.lower() == "true"
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
    """Why this layout cannot run (divisibility, unknown names), or None when it can."""
    for key in ("tp", "pp", "dp", "cp", "ep", "micro_batch", "virtual_stages"):
        if getattr(layout, key) < 1:
            return f"{key}={getattr(layout, key)} must be at least 1"
    if layout.schedule not in SCHEDULES:
        return f"schedule={layout.schedule!r} is not one of {', '.join(SCHEDULES)}"
    if layout.recompute not in RECOMPUTE:
        return f"recompute={layout.recompute!r} is not one of {', '.join(RECOMPUTE)}"
    if layout.zero not in (0, 1, 2, 3):
        return f"zero={layout.zero} must be 0, 1, 2 or 3"
    if layout.world_size != n_gpus:
        return f"tp x pp x dp x cp = {layout.world_size} != {n_gpus} GPUs"
    if model.n_heads % layout.tp or (model.n_kv_heads % layout.tp and layout.tp % model.n_kv_heads):
        return f"tp={layout.tp} does not divide the {model.n_heads} heads / {model.n_kv_heads} kv heads"
    if model.ffn_dim % layout.tp:
        return f"tp={layout.tp} does not divide ffn_dim={model.ffn_dim}"
    if layout.sequence_parallel and layout.tp == 1:
        return "sequence_parallel needs tp > 1"
    if model.seq_len % (layout.cp * (2 if layout.cp > 1 else 1)):
        return f"seq_len={model.seq_len} is not divisible by 2 x cp={layout.cp} (load-balanced chunks)"
    if model.seq_len // layout.cp % layout.tp and layout.sequence_parallel:
        return f"seq_len / cp = {model.seq_len // layout.cp} is not divisible by tp={layout.tp}"
    if layout.ep > 1 and (model.n_experts % layout.ep or layout.dp % layout.ep):
        return f"ep={layout.ep} must divide n_experts={model.n_experts} and dp={layout.dp}"
    chunks = layout.pp * layout.virtual_stages
    if chunks > model.n_layers:
        return f"pp x virtual_stages = {chunks} exceeds n_layers={model.n_layers}"
    if layout.schedule == "interleaved" and (layout.pp == 1 or layout.virtual_stages < 2):
        return "the interleaved schedule needs pp > 1 and virtual_stages >= 2"
    if layout.schedule != "interleaved" and layout.virtual_stages != 1:
        return f"virtual_stages={layout.virtual_stages} needs schedule=interleaved"
    if global_batch % (layout.dp * layout.micro_batch):
        return f"global batch {global_batch} is not divisible by dp x micro_batch = {layout.dp * layout.micro_batch}"
    micro_batches = global_batch // (layout.dp * layout.micro_batch)
    if layout.schedule == "interleaved" and micro_batches % layout.pp:
        return f"the interleaved schedule needs the {micro_batches} micro-batches to be a multiple of pp={layout.pp}"
    return None


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
        schedules += [("zb-h1", 1), ("gpipe", 1)]
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
