"""One pipeline rank's share of the dense model, under the dense model's parameter names.

The model is cut into S = pp * v virtual stages of contiguous blocks (`partition.partition_layers`);
rank r runs virtual stages r, r + pp, ... as its chunks 0, 1, ... (`schedules`). A `StageModule`
keeps the modules of this rank's chunks and drops the rest: the token embedding where the rank
runs virtual stage 0, the final norm and LM head where it runs stage S - 1, and its blocks in a
ModuleDict keyed by their index in the dense model. So `blocks.5.attn.wq.weight` is called that
on whichever rank holds block 5, and checkpoints move 1:1 between pipeline and dense layouts.

Tied embeddings with pp > 1: the first and the last rank each hold a copy of `embed.weight`
(the last uses it as its LM head; its `lm_head.weight` is the same tensor, so it is named once,
as `embed.weight`, exactly as in the dense model). The copies start identical (layout-invariant
init or a checkpoint) and stay identical because `sync_tied_grads` sums their gradients over a
two-rank group made by `tied_embedding_group`, before any optimizer update.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.comm import Comm, Group, new_group
from plait.model.llama import Transformer, rotary_tables
from plait.parallel.partition import rank_chunks


class StageModule(nn.Module):
    """The chunks of pipeline rank `rank` of `pp`, taken (not copied) from a dense `model`.

    `stage_layers` is `partition_layers(...)`: the layer indices of every virtual stage in model
    order (so `len(stage_layers) = pp * v`). The dense model's other modules are simply not
    referenced; drop the dense model after building the stage to free them.
    """

    def __init__(self, model: Transformer, rank: int, pp: int, stage_layers: list[list[int]]):
        super().__init__()
        if pp < 1 or len(stage_layers) % pp != 0:
            raise ValueError(f"{len(stage_layers)} virtual stages cannot be spread over pp={pp} ranks")
        flat = [i for layers in stage_layers for i in layers]
        if flat != list(range(len(model.blocks))) or any(not layers for layers in stage_layers):
            raise ValueError(f"stage_layers {stage_layers} must cover blocks 0..{len(model.blocks) - 1} "
                             f"in order, at least one per stage")
        self.cfg = model.cfg
        self.rank, self.pp = rank, pp
        self.v = len(stage_layers) // pp
        self.n_stages = len(stage_layers)
        self.chunk_layers = rank_chunks(stage_layers, pp, rank)
        self.holds_embedding = self.is_first_stage(0)
        self.holds_head = self.is_last_stage(self.v - 1)
        self.tied = model.lm_head.weight is model.embed.weight
        # Registration order decides which name a shared tensor gets: embed first, as in the dense model.
        self.embed = model.embed if self.holds_embedding or (self.holds_head and self.tied) else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for layers in self.chunk_layers for i in layers})
        self.norm = model.norm if self.holds_head else None
        self.lm_head = model.lm_head if self.holds_head else None

    def virtual_stage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def is_first_stage(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == 0

    def is_last_stage(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == self.n_stages - 1

    def chunk_modules(self, chunk: int) -> list[nn.Module]:
        """The modules chunk `chunk` runs, in order (what its parameters are)."""
        modules: list[nn.Module] = [self.embed] if self.is_first_stage(chunk) else []
        modules += [self.blocks[str(i)] for i in self.chunk_layers[chunk]]
        if self.is_last_stage(chunk):
            modules += [self.norm, self.lm_head]
        return modules

    def forward_chunk(self, chunk: int, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run chunk `chunk`: tokens [b, s] in on the first stage, else hidden states [b, s, dim];
        logits [b, s, vocab] out of the last stage, else hidden states."""
        if self.is_first_stage(chunk):
            x = self.embed(x)
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rotary_tables(self.cfg.dim // self.cfg.n_heads, positions, self.cfg.rope_theta)
        for i in self.chunk_layers[chunk]:
            x = self.blocks[str(i)](x, cos, sin)
        if self.is_last_stage(chunk):
            x = self.lm_head(self.norm(x))
        return x

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        return self.forward_chunk(chunk, x)

    def sync_tied_grads(self, comm: Comm, tied_group: Group | None) -> None:
        """Sum the tied embedding's gradient over its two copies (first and last rank).

        A collective of the two ranks in `tied_group` (None on the others, where this is a no-op):
        every rank of the pipeline calls it at the same point of the step, after `PipelineRunner.step`
        and before gradients are clipped or applied. Summing is linear, so it may come before or
        after the data-parallel reduction.
        """
        if not self.tied or self.pp == 1 or tied_group is None or tied_group.size == 1:
            return
        weight = self.embed.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        comm.all_reduce(weight.grad, tied_group, tag="grads")


def tied_embedding_group(pp_groups: list[list[int]], rank: int, timeout_s: float | None = None) -> Group | None:
    """The {first, last} rank group of this rank's pipeline, or None if this rank is in neither.

    Collective over the whole world (torch's new_group is): every rank calls it with the same
    `pp_groups` (e.g. `ParallelDims.group_ranks("pp")`), even ranks that own no tied copy.
    """
    mine = None
    for ranks in pp_groups:
        if len(ranks) < 2:
            continue
        pair = [ranks[0], ranks[-1]]
        process_group = new_group(pair, timeout_s)
        if rank in pair:
            mine = Group("pp_tied", pair, pair.index(rank), process_group)
    return mine
