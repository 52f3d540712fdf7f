"""Flat buckets: how parameters are laid out for communication and sharding.

A bucket is a run of parameters placed end to end in one flat buffer, padded so that it
splits into `shards` equal, contiguous slices; data-parallel rank r owns slice r of every
bucket (its optimizer state, master weights and, from ZeRO-2 on, its gradients). This is
pure arithmetic; the buffers themselves live in data_parallel.py and zero.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Segment:
    """The part of one parameter that falls inside one rank's shard of a bucket."""

    param_index: int  # index into Bucket.params
    param_start: int  # first element, in the flattened parameter
    shard_start: int  # where that element sits in the shard
    length: int


@dataclass
class Bucket:
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]  # where each parameter starts in the bucket
    numel: int  # elements of parameters (no padding)
    shards: int
    padded: int = field(init=False)

    def __post_init__(self) -> None:
        self.padded = -(-self.numel // self.shards) * self.shards

    @property
    def shard_size(self) -> int:
        return self.padded // self.shards

    def shard_range(self, rank: int) -> tuple[int, int]:
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def segments(self, rank: int) -> list[Segment]:
        lo, hi = self.shard_range(rank)
        out = []
        for index, (param, start) in enumerate(zip(self.params, self.offsets)):
            begin, end = max(lo, start), min(hi, start + param.numel())
            if begin < end:
                out.append(Segment(index, begin - start, begin - lo, end - begin))
        return out


def make_buckets(
    named_params: list[tuple[str, nn.Parameter]], bucket_bytes: int, shards: int,
    boundaries: set[str] | None = None,
) -> list[Bucket]:
    """Group parameters, in the order given, into buckets of about `bucket_bytes`.

    `boundaries` (parameter names) forces a new bucket to start at those parameters, so a
    bucket never spans two units that are gathered at different times (ZeRO-3 blocks).
    """
    groups: list[list[tuple[str, nn.Parameter]]] = []
    size = 0
    for name, param in named_params:
        if not groups or size >= bucket_bytes or (boundaries and name in boundaries):
            groups.append([])
            size = 0
        groups[-1].append((name, param))
        size += param.numel() * param.element_size()
    buckets = []
    for group in groups:
        offsets, total = [], 0
        for _, param in group:
            offsets.append(total)
            total += param.numel()
        buckets.append(Bucket([n for n, _ in group], [p for _, p in group], offsets, total, shards))
    return buckets
