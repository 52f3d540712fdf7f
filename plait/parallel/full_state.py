"""Full, layout-free tensors from this rank's pieces, and this rank's pieces from them.

Checkpoints, samples and exports use full tensors keyed by parameter name. A rank holds
pieces of them in two ways: ZeRO slices over the data-parallel group (the engine gathers
those) and tensor-parallel shards (gathered here, with the vocabulary padding removed).
"""

from __future__ import annotations

import torch

from plait.comm import CHECKPOINT, Comm, Group
from plait.parallel.tensor import TensorShard, gather_full, shard_for_tp
from plait.parallel.zero import ZeroEngine

State = tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]


def gather_full_state(engine: ZeroEngine, tp_shards: dict[str, TensorShard], tp_group: Group, comm: Comm,
                      optimizer: bool = True, pp_group: Group | None = None) -> State:
    """Every parameter and (optionally) its AdamW state in full, on every rank (collective).

    Pipeline stages hold different parameters: their dictionaries are merged (the tied
    embedding's two copies are identical, so either serves)."""
    params, optim = engine.full_state(optimizer=optimizer)
    if tp_group.size > 1:
        def gather(t: torch.Tensor, info: TensorShard) -> torch.Tensor:
            return gather_full(t.to(engine.device), info, tp_group, comm, tag=CHECKPOINT).cpu()

        for name, info in tp_shards.items():
            if name not in params:  # another pipeline stage's (tp peers share a stage: same names)
                continue
            params[name] = gather(params[name], info)
            for key in _moment_keys(optim.get(name)):
                optim[name][key] = gather(optim[name][key], info)
    if pp_group is not None and pp_group.size > 1:
        for stage_params, stage_optim in comm.all_gather_object((params, optim), pp_group, tag=CHECKPOINT):
            params.update(stage_params)
            optim.update(stage_optim)
    return params, optim


def local_state(params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]],
                tp_shards: dict[str, TensorShard], tp_group: Group, names: set[str]) -> State:
    """This rank's parameters (its pipeline stage's only) as tensor-parallel shards of the full
    tensors: what the engine then slices further."""
    params = {n: t for n, t in params.items() if n in names}
    optim = {n: dict(s) for n, s in optim.items() if n in names}
    if tp_group.size == 1:
        return params, optim
    for name, info in tp_shards.items():
        if name not in params:
            continue
        params[name] = shard_for_tp(params[name], info.dim, tp_group.rank, tp_group.size)
        for key in _moment_keys(optim.get(name)):
            optim[name][key] = shard_for_tp(optim[name][key], info.dim, tp_group.rank, tp_group.size)
    return params, optim


def _moment_keys(state: dict | None) -> list[str]:
    """The per-element tensors of a parameter's optimizer state (the 0-d step is shared)."""
    return [k for k, v in (state or {}).items() if torch.is_tensor(v) and v.ndim > 0]
