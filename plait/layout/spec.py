"""What the layout rules look at: the layout, the model's shape, the job's size and features."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from plait.layout import batch

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """One way to split a job over devices.

    Rank order is tp (fastest varying), cp, dp, pp (slowest); ep and etp are folded into the
    tp x cp x dp ranks of a pipeline stage, they do not multiply the world size.
    """

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
    etp: int = 1
    pp_layers: tuple[int, ...] = ()  # layers per virtual stage; (): balanced by cost

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def to_dict(self) -> dict:
        """The planner's fields always (its JSON contract), the others only when not at their default."""
        shown = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.name in _ALWAYS_SHOWN or value != spec.default:
                shown[spec.name] = list(value) if isinstance(value, tuple) else value
        return shown

    def short(self) -> str:
        """`tp=2,pp=1,...`, the fields of `to_dict`."""
        return ",".join(f"{k}={_text(v)}" for k, v in self.to_dict().items())


_ALWAYS_SHOWN = ("tp", "pp", "dp", "cp", "ep", "zero", "micro_batch", "schedule", "virtual_stages",
                 "recompute", "sequence_parallel")


def _text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + " ".join(map(str, value)) + "]"
    return str(value)


@dataclass(frozen=True)
class ModelShape:
    """The model fields that decide whether a layout can split it."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    seq_len: int
    n_experts: int = 0  # routed experts per MoE layer; 0: a dense model


@dataclass(frozen=True)
class Features:
    """What else a job uses that not every layout can carry (the planner leaves the defaults)."""

    compile: bool = False
    chunked_ce: str = "auto"  # auto | on | off
    optimizer: str = "adamw"
    sync: str = "every_step"  # every_step | diloco | noloco | co2
    grad_compression: str = "none"


@dataclass(frozen=True)
class Job:
    layout: Layout
    model: ModelShape
    world_size: int
    global_batch: int
    features: Features = Features()

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on each data-parallel rank (the pipeline's micro-batches); the
        same on every rank, enough for the one with the most rows (batch.py)."""
        return batch.micro_batches(self.global_batch, self.layout.micro_batch, self.layout.dp)
