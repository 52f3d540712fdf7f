"""Parallelism is something done *to* a plain model, here, in one fixed order:

1. tensor parallel (+ sequence parallel): shard the layers over the tp group (tensor.py);
2. context parallel: attention becomes ring attention over the cp group (context.py);
   then MoE layers: routed experts split over the folded ep groups (folding.py, expert.py);
3. activation recomputation (recompute.py);
4. pipeline parallel: keep this rank's stage of the model, run by a schedule (pipeline.py);
5. data parallel with ZeRO over dp x cp (zero.py; ZeRO-3 gathering in zero3.py); under local
   SGD only over each worker's cp ranks (`engine_group`; the outer steps are lowcomm's).

The result, `ParallelModel`, also answers the questions the training loop has that depend on
the layout: which part of a batch this rank computes, how a step and the loss are run, and
how the full, layout-free state is gathered for checkpoints and loaded back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from plait.comm import Comm, Group
from plait.config import Config
from plait.mesh import Mesh
from plait.parallel.context import apply_context_parallel, cp_positions, split_for_cp
from plait.parallel.full_state import State, gather_full_state, local_state
from plait.parallel.partition import head_cost_in_layers, partition_layers
from plait.parallel.pieces import (OPTIMIZER, STEP_KEY, Piece, assign_whole_state, engine_pieces, engines_of,
                                   expert_placements, optimizer_step, set_optimizer_step,
                                   tensor_parallel_placements, whole_state_pieces)
from plait.parallel.pipeline import PipelineRunner, gather_pp_bubble, pipeline_forward
from plait.parallel.pipeline_stage import StageModule, tied_embedding_group
from plait.parallel.recompute import apply_recompute
from plait.parallel.tensor import TensorShard, apply_tensor_parallel, vocab_parallel_cross_entropy
from plait.parallel.zero import ZeroEngine
from plait.parallel.zero3 import Zero3Gatherer, transformer_units
from plait.parallel.folding import ExpertGroups, MoEEngine, apply_moe_parallel


def is_local_sync(cfg: Config) -> bool:
    """Local SGD (diloco, noloco, co2): workers step on their own between outer syncs."""
    return cfg.train.sync != "every_step"


def engine_group(cfg: Config, mesh: Mesh) -> Group:
    """The group the engine reduces gradients over: the whole dp x cp, or one worker's cp."""
    return mesh.cp if is_local_sync(cfg) else mesh.dp_cp


@dataclass
class ParallelModel:
    model: nn.Module
    engine: ZeroEngine
    tp_shards: dict[str, TensorShard]
    mesh: Mesh
    comm: Comm
    vocab_size: int
    runner: PipelineRunner | None = None  # pipeline parallel only
    tied_group: Group | None = None  # the first and last pipeline rank, when embeddings are tied
    expert_groups: ExpertGroups | None = None  # MoE models: the folded ep / edp / token groups
    second_copies: frozenset[str] = frozenset()  # parameters another stage holds too (the tied embedding)
    local_sync: bool = False  # local SGD: dp workers hold their own weights between outer syncs
    gatherer: Zero3Gatherer | None = None  # ZeRO-3: which blocks' full parameters are resident

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
        return gather_full_state(self.engine, self.tp_shards, self.mesh.tp, self.comm, optimizer,
                                 pp_group=self.mesh.groups["pp"])

    def load_full_state(self, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]) -> None:
        names = {n for n, _ in self.model.named_parameters()}
        self.engine.load_full_state(*local_state(params, optim, self.tp_shards, self.mesh.tp, names))

    def state_pieces(self, optimizer: bool = True) -> list[Piece]:
        """This rank's boxes of the full, named masters and optimizer tensors (pieces.py), each
        marked for the one rank that writes it: what a sharded checkpoint saves."""
        pieces, _ = self._pieces(optimizer, stored=None)
        return pieces

    def load_targets(self, stored: dict[str, tuple[tuple[int, ...], torch.dtype]]
                     ) -> tuple[list[Piece], Callable[[], None]]:
        """What to read from a checkpoint holding `stored` (key -> full shape, dtype): this rank's
        pieces as views of its own state (optimizer tensors made first when the checkpoint has
        any), and the call that finishes the load once they are filled."""
        return self._pieces(any(k.startswith(OPTIMIZER + "/") for k in stored), stored)

    def _pieces(self, optimizer: bool, stored: dict[str, tuple[tuple[int, ...], torch.dtype]] | None
                ) -> tuple[list[Piece], Callable[[], None]]:
        loading = stored is not None
        # Replicas that the engine cannot see: parameters tensor parallelism does not split (tp
        # rank 0 writes them), the last pipeline stage's tied copy, local-SGD workers other than 0.
        writer = not (self.local_sync and self.mesh.coords["dp"] > 0)
        not_split = frozenset(n for n, _ in self.model.named_parameters() if n not in self.tp_shards)
        dense_replicas = self.second_copies | (not_split if self.mesh.tp.rank > 0 else frozenset())
        placements = tensor_parallel_placements(self.tp_shards, self.mesh.tp.rank, self.mesh.tp.size)
        engines = engines_of(self.engine)
        state_keys = tuple({k.rsplit("/", 1)[1] for k in stored if k.startswith(OPTIMIZER + "/")}) if loading else None
        pieces, assignments = [], []
        for engine in engines:
            whole_state = engine.moment_keys is None  # GaLore: whole matrices, see pieces.py
            elementwise = optimizer and not whole_state
            if self.expert_groups is not None and engine is self.engine.experts:
                ep = self.expert_groups.ep
                pieces += engine_pieces(engine, expert_placements(engine, ep.rank, ep.size), writer,
                                        optimizer=elementwise, create_state=loading, state_keys=state_keys)
            else:
                pieces += engine_pieces(engine, placements, writer, dense_replicas, elementwise, loading, state_keys)
            if optimizer and whole_state:
                found, assigned = whole_state_pieces(engine, writer, stored)
                pieces += found
                assignments += assigned
        step = None
        elementwise_engines = [e for e in engines if e.moment_keys is not None]
        if optimizer and elementwise_engines:
            if loading and STEP_KEY in stored:
                step = torch.zeros((), dtype=stored[STEP_KEY][1])
                pieces.append(Piece(STEP_KEY, (), (), step, False))
            elif not loading and (step := optimizer_step(elementwise_engines[0])) is not None:
                pieces.append(Piece(STEP_KEY, (), (), step.detach().cpu().reshape(()), self.mesh.rank == 0))

        def finish() -> None:
            for engine in engines:
                if step is not None and engine.moment_keys is not None:
                    set_optimizer_step(engine, step)
                engine.publish_masters()
            assign_whole_state(assignments, engines[0].opt_device)

        return pieces, finish

    def pipeline_step(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                      tokens_per_step: int) -> torch.Tensor:
        """All micro-batches of a step through the pipeline schedule, then the gradient reduction.
        Returns this rank's share of the loss (non-zero on the last stage only). Every rank of
        the pipeline holds the step's batches, so all agree on each micro-batch's rows, which
        may differ by one (a global batch shared out unevenly, layout/batch.py)."""
        with self.engine.deferred():  # micro-batches interleave: reduce once, after all of them
            loss = self.runner.step([b[0] for b in batches], [b[1] for b in batches],
                                    lambda logits, targets: self.loss_sum(logits, targets) / tokens_per_step,
                                    rows=[b[0].shape[0] for b in batches])
        self.runner.stage.sync_tied_grads(self.comm, self.tied_group)
        self.engine.sync_gradients()
        return loss

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor | None:
        """Logits for evaluation; under pipeline parallelism only on the last stage (else None)."""
        if self.runner is None:
            return self.model(inputs, positions)
        # Every rank holds `inputs`: the messages take its rows, which may be fewer than a
        # training micro-batch's (the last evaluation chunk).
        shape = (inputs.shape[0],) + tuple(self.runner.activation_shape[1:])
        return pipeline_forward(self.runner.stage, self.mesh.groups["pp"], self.comm, inputs,
                                shape, self.runner.dtype, self.runner.positions)

    def pp_bubble(self) -> float | None:
        if self.runner is None or self.runner.last_stats is None:
            return None
        return gather_pp_bubble(self.comm, self.mesh.groups["pp"], self.runner.last_stats)


def parallelize(model: nn.Module, cfg: Config, mesh: Mesh, comm: Comm, device: torch.device) -> ParallelModel:
    """Apply every configured form of parallelism to a built, initialised dense model."""
    p = cfg.parallel
    tp_shards: dict[str, TensorShard] = {}
    if p.tp > 1:
        # seed=None: shards are slices of the dense model just initialised from (seed, name, shape).
        tp_shards = apply_tensor_parallel(model, mesh.tp, comm, p.sequence_parallel, seed=None)
    if p.cp > 1:
        apply_context_parallel(model, mesh.cp, comm)
    expert_groups = None
    if cfg.model.n_experts:  # MoE layers: experts over the folded ep groups (folding.py)
        expert_groups = apply_moe_parallel(model, mesh, comm, p.ep)
    if cfg.train.recompute != "none":
        apply_recompute(model, cfg.train.recompute)
    runner, tied_group, norm_exclude = None, None, frozenset()
    if p.pp > 1:
        runner, tied_group = _pipeline(model, cfg, mesh, comm)
        model = runner.stage
        if runner.stage.tied and runner.stage.holds_head and not runner.stage.holds_embedding:
            norm_exclude = frozenset({"embed.weight"})  # the last stage's copy: count it once
    engine_type = ZeroEngine if expert_groups is None else functools.partial(MoEEngine, expert_groups=expert_groups)
    engine = engine_type(
        model, comm, engine_group(cfg, mesh), cfg.optim, stage=p.zero, dtype=cfg.train.dtype, reduce_dtype=p.reduce_dtype,
        bucket_bytes=int(p.bucket_mb * 2**20), device=device, offload=p.offload == "optimizer",
        units=transformer_units(model) if p.zero == 3 else None, tp_group=mesh.tp,
        pp_group=mesh.groups["pp"], norm_exclude=norm_exclude,
    )
    # ZeRO-3 under a pipeline too: the units are the stage's own blocks (and its root, if any),
    # gathered per pass; the pipeline's deferred reduction reduce-scatters them once a step.
    gatherer = Zero3Gatherer(engine, model) if p.zero == 3 else None
    if runner is not None:
        runner.dtype = engine.compute_dtype  # the engine may have cast parameters to bf16
    return ParallelModel(model, engine, tp_shards, mesh, comm, cfg.model.vocab_size, runner, tied_group,
                         expert_groups, second_copies=norm_exclude, local_sync=is_local_sync(cfg),
                         gatherer=gatherer)


def _pipeline(model: nn.Module, cfg: Config, mesh: Mesh, comm: Comm) -> tuple[PipelineRunner, Group | None]:
    p, m = cfg.parallel, cfg.model
    head_cost = head_cost_in_layers(m.dim, m.ffn_dim, m.vocab_size, m.seq_len, m.n_heads, m.n_kv_heads)
    layers = partition_layers(m.n_layers, p.pp, p.pp_virtual_stages, explicit=p.pp_layers or None,
                              head_cost=head_cost)
    stage = StageModule(model, rank=mesh.coords["pp"], pp=p.pp, stage_layers=layers)
    # Collective over the world: every rank builds every pipeline's {first, last} group.
    tied_group = tied_embedding_group(mesh.dims.group_ranks("pp"), mesh.rank, mesh.timeout_s)
    seq = m.seq_len // p.cp // (p.tp if p.tp > 1 and p.sequence_parallel else 1)
    # Explicit positions: a stage cannot infer them from hidden states that sequence parallelism
    # has split; under context parallelism they are this rank's global token positions.
    positions = cp_positions(m.seq_len, mesh.cp.rank, p.cp, device=next(stage.parameters()).device)
    runner = PipelineRunner(stage, mesh.groups["pp"], comm, p.pp_schedule, p.pp_microbatches,
                            p.pp_virtual_stages, (cfg.train.micro_batch, seq, m.dim), torch.float32,
                            positions=positions)
    return runner, tied_group
