"""The parallel layout: the degree of each dimension, each rank's coordinates, and the
process group of every dimension.

Ranks are laid out on a grid with tensor parallel varying fastest, then context, data and
pipeline parallel (Megatron's order, which keeps the chattiest groups on neighbouring ranks,
i.e. inside a node): rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i.
Expert parallelism is folded into the same ranks and gets its own groups when it lands.
Groups are objects passed to whoever communicates; nothing here is global state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch.distributed as dist

from plait.comm import Group, new_group

# Outermost first; the last dimension varies fastest across consecutive ranks.
GRID_ORDER = ("pp", "dp", "cp", "tp")
# The process groups a mesh builds. Parameters are replicated over dp and cp (context
# parallel ranks hold different tokens of the same sequences), so gradients are reduced,
# and ZeRO shards, over "dp_cp".
GROUPS = {"pp": ("pp",), "dp": ("dp",), "cp": ("cp",), "tp": ("tp",), "dp_cp": ("dp", "cp")}


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    cp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.cp * self.pp

    def degree(self, dim: str) -> int:
        return getattr(self, dim)

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for dim in reversed(GRID_ORDER):
            out[dim] = rank % self.degree(dim)
            rank //= self.degree(dim)
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for dim in GRID_ORDER:
            rank = rank * self.degree(dim) + coords[dim]
        return rank

    def group_ranks(self, *dims: str) -> list[list[int]]:
        """Every group over `dims`: the ranks that differ only in those coordinates."""
        others = [d for d in GRID_ORDER if d not in dims]
        inner = [d for d in GRID_ORDER if d in dims]
        groups = []
        for fixed in itertools.product(*(range(self.degree(d)) for d in others)):
            base = dict(zip(others, fixed))
            members = itertools.product(*(range(self.degree(d)) for d in inner))
            groups.append([self.rank_of({**base, **dict(zip(inner, m))}) for m in members])
        return groups


@dataclass
class Mesh:
    dims: ParallelDims
    rank: int
    coords: dict[str, int]
    groups: dict[str, Group]
    timeout_s: float | None = None  # of every group made for this mesh (parallel.timeout_s)

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp(self) -> Group:
        return self.groups["dp"]

    @property
    def tp(self) -> Group:
        return self.groups["tp"]

    @property
    def cp(self) -> Group:
        return self.groups["cp"]

    @property
    def dp_cp(self) -> Group:
        return self.groups["dp_cp"]

    @property
    def world(self) -> Group:
        return self.groups["world"]

    @staticmethod
    def build(dims: ParallelDims, rank: int, timeout_s: float | None = None) -> "Mesh":
        """Create the process groups of every dimension (collective: all ranks must call it)."""
        initialised = dist.is_available() and dist.is_initialized()
        if not initialised and dims.world_size != 1:
            raise RuntimeError("a multi-rank mesh needs torch.distributed to be initialised")
        groups: dict[str, Group] = {}
        world_ranks = list(range(dims.world_size))
        groups["world"] = (
            Group("world", world_ranks, rank, dist.group.WORLD) if dims.world_size > 1
            else Group.single("world", rank)
        )
        for name, members in GROUPS.items():
            for ranks in dims.group_ranks(*members):
                if len(ranks) == 1:
                    if rank in ranks:
                        groups[name] = Group.single(name, rank)
                    continue
                if len(ranks) == dims.world_size:
                    process_group = dist.group.WORLD
                else:
                    # new_group is collective over the whole world, even for groups we are not in.
                    process_group = new_group(ranks, timeout_s)
                if rank in ranks:
                    groups[name] = Group(name, ranks, ranks.index(rank), process_group)
        return Mesh(dims=dims, rank=rank, coords=dims.coords(rank), groups=groups, timeout_s=timeout_s)

    def describe(self) -> str:
        return " x ".join(f"{d}={self.dims.degree(d)}" for d in ("dp", "tp", "cp", "pp"))
