"""Parallelism is something done *to* a plain model, here, in one fixed order:

1. tensor parallel (+ sequence parallel): shard the layers over the tp group (tensor.py);
2. context parallel: attention becomes ring attention over the cp group (context.py);
3. activation recomputation (recompute.py);
4. data parallel with ZeRO over dp x cp (zero.py; ZeRO-3 gathering in zero3.py).

The result, `ParallelModel`, also answers the questions the training loop has that depend on
the layout: which part of a batch this rank computes, how the loss is taken, and how the
full, layout-free state is gathered for checkpoints and loaded back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.config import Config
from plait.mesh import Mesh
from plait.parallel.comm import Comm
from plait.parallel.context import apply_context_parallel, split_for_cp
from plait.parallel.full_state import State, gather_full_state, local_state
from plait.parallel.recompute import apply_recompute
from plait.parallel.tensor import TensorShard, apply_tensor_parallel, vocab_parallel_cross_entropy
from plait.parallel.zero import ZeroEngine
from plait.parallel.zero3 import Zero3Gatherer, transformer_units


@dataclass
class ParallelModel:
    model: nn.Module
    engine: ZeroEngine
    tp_shards: dict[str, TensorShard]
    mesh: Mesh
    comm: Comm
    vocab_size: int

    def local_batch(self, inputs: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's tokens, targets and global positions (context parallel splits the sequence)."""
        cp = self.mesh.cp
        if cp.size == 1:
            return inputs, targets, None
        local_inputs, positions = split_for_cp(inputs, cp.rank, cp.size)
        local_targets, _ = split_for_cp(targets, cp.rank, cp.size)
        return local_inputs, local_targets, positions.to(inputs.device)

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of this rank's tokens, in fp32 whatever the compute dtype."""
        if self.mesh.tp.size > 1:  # logits are this rank's slice of the vocabulary
            return vocab_parallel_cross_entropy(logits, targets, self.mesh.tp, self.comm, self.vocab_size).sum()
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")

    def full_state(self, optimizer: bool = True) -> State:
        """Full tensors by parameter name, on every rank (collective over the whole mesh)."""
        return gather_full_state(self.engine, self.tp_shards, self.mesh.tp, self.comm, optimizer)

    def load_full_state(self, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]) -> None:
        self.engine.load_full_state(*local_state(params, optim, self.tp_shards, self.mesh.tp))


def parallelize(model: nn.Module, cfg: Config, mesh: Mesh, comm: Comm, device: torch.device) -> ParallelModel:
    """Apply every configured form of parallelism to a built, initialised dense model."""
    p = cfg.parallel
    tp_shards: dict[str, TensorShard] = {}
    if p.tp > 1:
        # seed=None: shards are slices of the dense model just initialised from (seed, name, shape).
        tp_shards = apply_tensor_parallel(model, mesh.tp, comm, p.sequence_parallel, seed=None)
    if p.cp > 1:
        apply_context_parallel(model, mesh.cp, comm)
    if cfg.train.recompute != "none":
        apply_recompute(model, cfg.train.recompute)
    engine = ZeroEngine(
        model, comm, mesh.dp_cp, cfg.optim, stage=p.zero, dtype=cfg.train.dtype, reduce_dtype=p.reduce_dtype,
        bucket_bytes=int(p.bucket_mb * 2**20), device=device, offload=p.offload == "optimizer",
        units=transformer_units(model) if p.zero == 3 else None, tp_group=mesh.tp,
    )
    if p.zero == 3:
        Zero3Gatherer(engine, model)
    return ParallelModel(model, engine, tp_shards, mesh, comm, cfg.model.vocab_size)
