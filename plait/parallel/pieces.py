"""This rank's share of the training state, described as boxes of full, named tensors.

A checkpoint must not gather the model anywhere, yet any layout must be able to load it. So
each rank describes what it owns in layout-free terms: for every parameter (and every
per-element optimizer tensor) the boxes (offsets and sizes in the full tensor) it holds,
each with a view of its own data. The layouts compose:

- tensor parallelism: the rank's tensor is a slice of the full one along `_tp_dim`
  (vocabulary padding at the end is not part of the full tensor);
- expert parallelism: the rank's stacked experts are a slice along dim 0;
- ZeRO: the rank owns a flat range of each bucket, i.e. a flat range of each parameter's
  local tensor. A flat range of a box is not a box, but it is a short list of boxes (a
  partial row, whole rows, a partial row, recursively per dimension), each contiguous.

Replicas (plain data parallel, context parallel, parameters that tensor parallelism does
not split, the tied embedding's copy on the last pipeline stage, local-SGD workers) hold
the same boxes; exactly one holder is marked to write each of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from plait.parallel.expert import expert_slice
from plait.parallel.folding import MoEEngine, is_expert_param
from plait.parallel.tensor import TensorShard
from plait.parallel.zero import ZeroEngine

MODEL = "model"  # key prefix of parameters (fp32 masters) in a checkpoint
OPTIMIZER = "optim"  # key prefix of optimizer state: optim/<parameter>/<state key>
STEP_KEY = "optim/step"  # the optimizer's step count, one 0-d tensor for every parameter

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass
class Piece:
    key: str  # the full tensor's name: model/<parameter> or optim/<parameter>/<state key>
    full_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # where the box starts in the full tensor
    tensor: torch.Tensor  # this rank's data for the box: a view of its own state
    write: bool  # this rank is the one holder that writes the box

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The flat (row-major) range [start, stop) of a tensor of `shape` as boxes, in order;
    each box is contiguous in that flattening."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], start - first * inner,
                                                                    stop - first * inner)]
    boxes: list[Box] = []
    full_from, full_to = first, last + 1
    if start % inner:
        boxes += [((first, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], start % inner, inner)]
        full_from = first + 1
    tail = []
    if stop % inner:
        tail = [((last, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], 0, stop % inner)]
        full_to = last
    if full_from < full_to:
        boxes.append(((full_from, *[0] * (len(shape) - 1)), (full_to - full_from, *shape[1:])))
    return boxes + tail


@dataclass(frozen=True)
class Placement:
    """Where a rank's local tensor of a parameter lies in the full tensor: along `dim`
    (None: the whole tensor), from `start`, `valid` entries of it (the rest is padding)."""

    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    valid: int = 0

    def to_full(self, offsets: tuple[int, ...], view: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """A local box (offsets, view) in full-tensor offsets, padding cut off; None if all padding."""
        if self.dim is None:
            return offsets, view
        begin, length = offsets[self.dim], view.shape[self.dim]
        keep = min(length, self.valid - begin)
        if keep <= 0:
            return None
        if keep < length:
            view = view.narrow(self.dim, 0, keep)
        shifted = list(offsets)
        shifted[self.dim] += self.start
        return tuple(shifted), view


def engine_pieces(engine: ZeroEngine, placements: dict[str, Placement], writer: bool,
                  replicated: frozenset[str] = frozenset(), optimizer: bool = True,
                  create_state: bool = False, state_keys: tuple[str, ...] | None = None) -> list[Piece]:
    """Every box of masters (and optimizer state) that `engine` owns on this rank.

    `writer`: this rank writes what its engine group holds (ZeRO shards are each written by
    their owner; an unsharded engine's replicas by its group's rank 0). `replicated` names
    parameters that another rank writes (e.g. not split by tensor parallelism, tp rank > 0).
    `create_state` makes zero optimizer tensors first, for a load into a fresh optimizer;
    `state_keys` limits the optimizer tensors to those (the ones a checkpoint holds)."""
    pieces: list[Piece] = []
    keys = tuple(k for k in engine.moment_keys or () if state_keys is None or k in state_keys)
    owner_writes = writer and (engine.stage >= 1 or engine.group.rank == 0)
    for b, bucket in enumerate(engine.buckets):
        for seg, (opt_param, _, _) in zip(bucket.segments(engine.owner), engine.segments[b]):
            name = bucket.names[seg.param_index]
            local = bucket.params[seg.param_index]
            placement = placements.get(name, Placement(tuple(local.shape)))
            master = engine.masters[b][seg.shard_start:seg.shard_start + seg.length]
            state = engine.optimizer.state.get(opt_param)
            if optimizer and create_state and not state and keys:
                state = engine.optimizer.state[opt_param] = {
                    k: torch.zeros(opt_param.shape, dtype=torch.float32, device=engine.opt_device) for k in keys}
            sources = [(f"{MODEL}/{name}", master)]
            if optimizer and state:
                sources += [(f"{OPTIMIZER}/{name}/{k}", state[k].reshape(-1)) for k in keys if k in state]
            writes = owner_writes and name not in replicated
            for local_offsets, sizes in flat_range_boxes(tuple(local.shape), seg.param_start,
                                                         seg.param_start + seg.length):
                at = _flat_index(tuple(local.shape), local_offsets) - seg.param_start
                count = math.prod(sizes)
                for key, flat in sources:
                    placed = placement.to_full(local_offsets, flat[at:at + count].view(sizes))
                    if placed is not None:
                        pieces.append(Piece(key, placement.full_shape, placed[0], placed[1], writes))
    return pieces


def whole_state_pieces(engine: ZeroEngine, writer: bool,
                       stored: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
                       ) -> tuple[list[Piece], list[tuple[dict, str, torch.Tensor, type]]]:
    """Optimizer state that is not per element (GaLore's projections and projected moments):
    whole tensors per parameter, which that optimizer only runs with (ZeRO 0, no tensor
    parallelism). Python numbers in it (a step, a flag) travel as 0-d tensors.

    For a save, `stored` is None. For a load it gives the checkpoint's tensors (key -> shape, dtype):
    the pieces are then fresh tensors, and the returned assignments put them into the state
    once they are filled (state dict, key, tensor, the Python type to convert back to)."""
    pieces, assignments = [], []
    writes = writer and engine.group.rank == 0
    for b, bucket in enumerate(engine.buckets):
        for seg, (opt_param, _, _) in zip(bucket.segments(engine.owner), engine.segments[b]):
            prefix = f"{OPTIMIZER}/{bucket.names[seg.param_index]}/"
            if stored is None:
                for k, v in engine.optimizer.state.get(opt_param, {}).items():
                    tensor = v if torch.is_tensor(v) else torch.tensor(v)
                    pieces.append(Piece(prefix + k, tuple(tensor.shape), (0,) * tensor.ndim, tensor, writes))
                continue
            state = engine.optimizer.state[opt_param]
            for key, (shape, dtype) in stored.items():
                if key.startswith(prefix):
                    k = key[len(prefix):]
                    kind = bool if k == "left" else int if k == "step" else torch.Tensor
                    tensor = torch.empty(shape, dtype=dtype)
                    pieces.append(Piece(key, shape, (0,) * len(shape), tensor, False))
                    assignments.append((state, k, tensor, kind))
    return pieces, assignments


def assign_whole_state(assignments: list[tuple[dict, str, torch.Tensor, type]], device: torch.device) -> None:
    for state, key, tensor, kind in assignments:
        state[key] = tensor.to(device) if kind is torch.Tensor else kind(tensor.item())


def _flat_index(shape: tuple[int, ...], offsets: tuple[int, ...]) -> int:
    index = 0
    for size, offset in zip(shape, offsets):
        index = index * size + offset
    return index


def optimizer_step(engine: ZeroEngine) -> torch.Tensor | None:
    """The step count of the engine's optimizer (the same for every parameter), if it has stepped."""
    for state in engine.optimizer.state.values():
        if "step" in state:
            return state["step"]
    return None


def set_optimizer_step(engine: ZeroEngine, step: torch.Tensor) -> None:
    for state in engine.optimizer.state.values():
        state["step"] = step.clone().to(engine.opt_device if step.ndim else "cpu")


def tensor_parallel_placements(tp_shards: dict[str, TensorShard], tp_rank: int, tp_size: int
                               ) -> dict[str, Placement]:
    """Where each tensor-parallel shard lies in its full tensor (see tensor.shard_for_tp)."""
    placements = {}
    for name, info in tp_shards.items():
        length = info.full_shape[info.dim]
        part = -(-length // tp_size)
        start = tp_rank * part
        placements[name] = Placement(tuple(info.full_shape), info.dim, start, max(0, min(part, length - start)))
    return placements


def expert_placements(engine: ZeroEngine, ep_rank: int, ep_size: int) -> dict[str, Placement]:
    """Where each rank's stacked experts lie in the full [n_experts, ...] tensors."""
    placements = {}
    for bucket in engine.buckets:
        for name, param in zip(bucket.names, bucket.params):
            if is_expert_param(name):
                local = param.shape[0]
                first = expert_slice(local * ep_size, ep_rank, ep_size).start
                placements[name] = Placement((local * ep_size, *param.shape[1:]), 0, first, local)
    return placements


def engines_of(engine: ZeroEngine | MoEEngine) -> list[ZeroEngine]:
    return list(engine.engines) if isinstance(engine, MoEEngine) else [engine]
