"""Pipeline schedules as plain data: for each pipeline rank, the order of its passes.

A schedule is `list[list[Op]]`, one list per pipeline rank, executed strictly in order. It is
pure arithmetic so it can be generated, checked (`pipeline_sim.validate_order`) and simulated
(`pipeline_sim.simulate`) without processes; the runtime only walks the lists.

The model is cut into `pp * v` virtual stages. Rank r holds model chunks c = 0..v-1, and chunk c
is virtual stage `c * pp + r` (Megatron's interleaving: consecutive stages live on consecutive
ranks, so activations still flow rank r -> r + 1, wrapping from the last rank to rank 0 between
chunks). Without interleaving v = 1 and the virtual stage is the rank.

Pass kinds: "F" is a forward; "B" is a backward. In the zero-bubble schedule the backward is
split: "B" then computes only the input gradient (what the previous stage is waiting for) and
"W" the weight gradient (which nobody waits for, so it can fill the bubbles). In every other
schedule "B" is the whole backward and no "W" appears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.layout.pipeline import canonical_schedule, schedule_problem


OpKind = Literal["F", "B", "W"]


@dataclass(frozen=True)
class Op:
    kind: OpKind
    microbatch: int
    rank: int
    chunk: int = 0  # which of the rank's v model chunks

    def virtual_stage(self, pp: int) -> int:
        return self.chunk * pp + self.rank

    def __str__(self) -> str:  # compact, for error messages and debugging: F3.1@r2
        return f"{self.kind}{self.microbatch}.{self.chunk}@r{self.rank}"


def check_schedule_config(pp: int, microbatches: int, virtual_stages: int, n_layers: int,
                          schedule: str) -> str | None:
    """The one-line reason this pipeline cannot run, or None when it can (the layout rule)."""
    return schedule_problem(pp, microbatches, virtual_stages, n_layers, schedule)


def build_schedule(name: str, pp: int, microbatches: int, virtual_stages: int = 1) -> list[list[Op]]:
    """One ordered list of passes per pipeline rank. Raises ValueError for a config that cannot run."""
    reason = check_schedule_config(pp, microbatches, virtual_stages, pp * virtual_stages, name)
    if reason is not None:
        raise ValueError(reason)
    name = canonical_schedule(name)
    builders = {"gpipe": _gpipe_rank, "1f1b": _one_f_one_b_rank, "zb": _zero_bubble_h1_rank}
    if name == "interleaved":
        return [_interleaved_rank(r, pp, microbatches, virtual_stages) for r in range(pp)]
    return [builders[name](r, pp, microbatches) for r in range(pp)]


def _gpipe_rank(rank: int, pp: int, m: int) -> list[Op]:
    """All forwards, then all backwards: every micro-batch's activations are held at once."""
    # Backwards in reverse order: the last forward's activations are the freshest, and it does not
    # change the bubble (the last rank starts backwards as soon as its last forward is done).
    return [Op("F", i, rank) for i in range(m)] + [Op("B", i, rank) for i in reversed(range(m))]


def _one_f_one_b_rank(rank: int, pp: int, m: int) -> list[Op]:
    """1F1B (PipeDream-Flush): pp - rank forwards to fill the pipe, then alternate backward, forward.

    Rank r never holds more than pp - r micro-batches: a new forward only starts after a
    backward has freed one. The bubble is the same as GPipe's; only the memory shrinks.
    """
    warmup = min(pp - rank, m)
    ops = [Op("F", i, rank) for i in range(warmup)]
    for i in range(m):
        ops.append(Op("B", i, rank))
        if i + warmup < m:
            ops.append(Op("F", i + warmup, rank))
    return ops


def _zero_bubble_h1_rank(rank: int, pp: int, m: int) -> list[Op]:
    """ZB-H1 (Qi et al. 2023): 1F1B's forward/backward order with weight gradients deferred.

    The input-gradient pass B is on the critical path back to rank 0; the weight-gradient pass W
    is not. Rank r runs W(i) only after B(i + r), so while the first backwards travel towards
    rank 0 no rank delays them with a W, and rank r's r leftover W's fill its idle tail.
    Memory: rank r has pp - r forwards in warm-up plus at most r deferred W's holding
    activations, so no rank exceeds pp micro-batches in flight -- 1F1B's peak (rank 0's).
    """
    warmup = min(pp - rank, m)
    delay = rank
    ops = [Op("F", i, rank) for i in range(warmup)]
    for i in range(m):
        ops.append(Op("B", i, rank))
        # W before the next F, so the freed activation makes room for the new one.
        if i - delay >= 0:
            ops.append(Op("W", i - delay, rank))
        if i + warmup < m:
            ops.append(Op("F", i + warmup, rank))
    ops.extend(Op("W", i, rank) for i in range(max(m - delay, 0), m))
    return ops


def _interleaved_rank(rank: int, pp: int, m: int, v: int) -> list[Op]:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021) for v model chunks per rank.

    The rank's m * v (micro-batch, chunk) forwards are taken in groups of pp micro-batches:
    chunk 0 for micro-batches 0..pp-1, chunk 1 for the same group, ... chunk v-1, then the next
    group. Backwards go through the chunks in reverse. The warm-up is long enough that, when
    the first backward can start, the rank has forwards of every chunk queued:
    (v - 1) * pp for the other chunks plus 2 * (pp - rank - 1) to cover the round trip to
    the last rank. Peak in flight: that warm-up + 1 chunk activations.
    """
    total = m * v
    warmup = min(2 * (pp - rank - 1) + (v - 1) * pp, total)
    ops = [_interleaved_op("F", k, rank, pp, v) for k in range(warmup)]
    for k in range(total - warmup):
        ops.append(_interleaved_op("F", k + warmup, rank, pp, v))
        ops.append(_interleaved_op("B", k, rank, pp, v))
    ops.extend(_interleaved_op("B", k, rank, pp, v) for k in range(total - warmup, total))
    return ops


def _interleaved_op(kind: OpKind, k: int, rank: int, pp: int, v: int) -> Op:
    """The k-th forward (or backward) pass of a rank under interleaving."""
    group, within = divmod(k, pp * v)
    chunk = within // pp
    if kind == "B":
        chunk = v - 1 - chunk  # backwards start from the model's last chunk
    return Op(kind, group * pp + within % pp, rank, chunk)
