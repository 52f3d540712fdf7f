"""The pipeline-parallel runtime: walk this rank's list of passes from `schedules`, moving
activations forward and gradients backward between neighbouring stages point to point.

Messages (`pipeline_comm`) have shapes fixed up front (per micro-batch: micro-batches may differ
in rows where a global batch is shared out unevenly) and a tag per (direction, micro-batch,
sending stage). Receives are posted `recv_lookahead` ops ahead of the op that consumes them, so
the transfer overlaps the compute before it; sends are posted as soon as their tensor exists,
and each is waited for (its buffer let go) once the schedule proves its receive posted, the
rest at the end of the step (`_message_timing`). Nothing blocks except a pass waiting for its
own input, which is the dependency the schedule simulator (`pipeline_sim`) assumes, so a
schedule it accepts cannot deadlock here.

Backward split (zb). "B" computes the input gradient (what the previous stage waits for) and
"W" the weight gradients of plain nn.Linear layers later. During the forward, a hook notes each
Linear's input and registers a tensor hook that keeps the gradient of its output when B passes
through; B is `torch.autograd.grad` with respect to the stage input and the chunk's other
parameters (norm weights, anything not an nn.Linear -- cheap elementwise work), which frees the
graph; W is then one matmul per Linear: dW = grad_out^T @ input. Autograd skips the weight
matmuls in B (nobody asked for those gradients), so B + W cost what one backward does.
The first virtual stage has no input gradient to hurry, so its B is the whole backward and its
W does nothing (its W follows its B immediately in ZB-H1 anyway). Not combined with activation
recomputation (a recomputed forward would note its Linears again).

Failure: a lost or stalled neighbour raises `PipelinePeerLost` naming the rank (`pipeline_comm`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from plait.comm import BOOKKEEPING, Comm, Group
from plait.parallel.pipeline_comm import ACTIVATION, GRADIENT, Message, PipelinePeerLost, StageMessenger
from plait.parallel.pipeline_sim import peak_in_flight
from plait.parallel.pipeline_stage import StageModule
from plait.parallel.schedules import Op, build_schedule
from plait.trace import COMPUTE, TraceRecorder

__all__ = ["PipelineRunner", "PipelinePeerLost", "StepStats", "pp_bubble", "gather_pp_bubble"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepStats:
    """One step on one rank: wall time, time spent computing passes, most activations held."""

    step_s: float
    busy_s: float
    peak_in_flight: int
    peak_pending_sends: int = 0  # most send buffers held at once (both directions)

    @property
    def idle_fraction(self) -> float:
        return min(max(1.0 - self.busy_s / self.step_s, 0.0), 1.0) if self.step_s > 0 else 0.0


def pp_bubble(stats: Sequence[StepStats]) -> float:
    """The pp_bubble metric: the fraction of the step each stage spent idle, averaged over stages."""
    return sum(s.idle_fraction for s in stats) / len(stats)


def gather_pp_bubble(comm: Comm, group: Group, stats: StepStats) -> float:
    """pp_bubble over the whole pipeline (collective over `group`; bookkeeping traffic)."""
    return pp_bubble(comm.all_gather_object(stats, group, tag=BOOKKEEPING))


@dataclass
class _LinearRecord:
    """What W needs for one nn.Linear call: its input, and the gradient of its output once B is done."""

    module: nn.Linear
    input: torch.Tensor
    grad_output: torch.Tensor | None = None


@dataclass
class _Held:
    """A (micro-batch, chunk) in flight: from its forward until its backward (or W) is done."""

    input: torch.Tensor | None  # the received activation (a leaf), None on the first stage
    output: torch.Tensor | None  # the chunk output, or the loss on the last stage
    linears: list[_LinearRecord] | None = None  # zb only


class PipelineRunner:
    """Runs one training step of a pipeline: this rank's passes over m micro-batches.

    `activation_shape` is (b, s, dim) of a micro-batch's hidden states and `dtype` theirs: every
    message has that shape, with b replaced by the micro-batch's rows where `step` is given
    `rows`. After `step`, each parameter of `stage` holds in `.grad` its gradient summed over
    the micro-batches (added to what was there); `last_stats` has the step's timings.
    """

    def __init__(self, stage: StageModule, group: Group, comm: Comm, schedule: str, microbatches: int,
                 virtual_stages: int, activation_shape: tuple[int, int, int], dtype: torch.dtype,
                 trace: TraceRecorder | None = None, recv_lookahead: int = 2,
                 positions: torch.Tensor | None = None, store: Any = None):
        if stage.pp != group.size or stage.v != virtual_stages or stage.rank != group.rank:
            raise ValueError(f"stage is rank {stage.rank} of pp={stage.pp} with v={stage.v}, but the group "
                             f"has size {group.size} (rank {group.rank}) and virtual_stages={virtual_stages}")
        self.stage, self.group, self.comm = stage, group, comm
        self.pp, self.v, self.m = group.size, virtual_stages, microbatches
        self.n_stages = self.pp * self.v
        schedule_ops = build_schedule(schedule, self.pp, microbatches, virtual_stages)
        self.ops = schedule_ops[group.rank]
        # Fixed for the runner's life: when a send may be waited for is worked out from it once.
        self.recv_lookahead = recv_lookahead
        self._sent_at, self._posted_at = _message_timing(schedule_ops, self.pp, self.n_stages, recv_lookahead)
        self.in_flight_limit = peak_in_flight(self.ops)
        self.split_backward = any(op.kind == "W" for op in self.ops)
        self.activation_shape, self.dtype = tuple(activation_shape), dtype
        self.device = next(stage.parameters()).device
        self.trace = trace or TraceRecorder(group.ranks[group.rank], enabled=False)
        self.positions = positions
        self.store = store  # a torch.distributed Store shared by the pipeline, to name the first lost rank
        self.last_stats: StepStats | None = None
        self._capture: list[_LinearRecord] | None = None
        self._hooks = [module.register_forward_hook(self._note_linear) for module in stage.modules()
                       if self.split_backward and type(module) is nn.Linear]

    def close(self) -> None:
        """Remove the forward hooks a zb runner put on the stage (before building another runner on it)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # --- the step -----------------------------------------------------------------------------
    def step(self, inputs: Sequence[torch.Tensor] | None, targets: Sequence[torch.Tensor] | None,
             loss_fn: LossFn, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Run every pass of this rank; return the sum of its micro-batch losses (0 off the last stage).

        `inputs` (m token tensors [b, s]) are needed where the rank runs the first stage and
        `targets` (m of them) where it runs the last; other ranks may pass None. `loss_fn(logits,
        targets)` returns the micro-batch's loss already normalised for the whole step (e.g. a
        sum-reduced cross-entropy divided by the step's token count), since gradients are summed.
        `rows` (m of them) are the micro-batches' row counts where they differ from
        activation_shape's b; every rank of the pipeline passes the same, so that each message's
        receiver allocates what its sender sends.
        """
        if rows is not None and len(rows) != self.m:
            raise ValueError(f"rows gives {len(rows)} micro-batches, the schedule runs {self.m}")
        if self.stage.holds_embedding and (inputs is None or len(inputs) != self.m):
            raise ValueError(f"the first pipeline stage needs {self.m} micro-batches of inputs")
        if self.stage.holds_head and (targets is None or len(targets) != self.m):
            raise ValueError(f"the last pipeline stage needs {self.m} micro-batches of targets")
        start = time.perf_counter()
        self._busy = 0.0
        self._loss = torch.zeros((), device=self.device)
        self._held: dict[tuple[int, int], _Held] = {}
        self._messages = StageMessenger(self.group, self.comm, self.n_stages, self.activation_shape, self.dtype,
                                        self.device, self.trace, self.store, self._sent_at, self._posted_at,
                                        rows=rows)
        peak = 0
        needs = [_incoming(op, self.pp, self.n_stages) for op in self.ops]
        for index, op in enumerate(self.ops):
            for message in needs[index:index + self.recv_lookahead + 1]:
                if message is not None and not self._messages.is_posted(message):
                    self._messages.post(message)
            if op.kind == "F":
                self._forward(op, inputs, targets, loss_fn)
            elif op.kind == "B":
                self._backward(op)
            else:
                self._weight_grad(op)
            peak = max(peak, len(self._held))
        self._messages.finish()
        self.last_stats = StepStats(time.perf_counter() - start, self._busy, peak,
                                    self._messages.peak_pending_sends)
        return self._loss

    def _forward(self, op: Op, inputs, targets, loss_fn: LossFn) -> None:
        stage = op.virtual_stage(self.pp)
        if stage == 0:
            x, leaf = inputs[op.microbatch].to(self.device), None
        else:
            leaf = self._messages.take(Message(ACTIVATION, op.microbatch, stage - 1)).requires_grad_()
            x = leaf
        held = _Held(input=leaf, output=None)
        with self._compute(op):
            if self.split_backward and stage > 0:
                self._capture = held.linears = []
            try:
                out = self.stage.forward_chunk(op.chunk, x, self.positions)
            finally:
                self._capture = None
            if stage == self.n_stages - 1:
                out = loss_fn(out, targets[op.microbatch].to(self.device))
                self._loss += out.detach()
        held.output = out
        self._held[(op.microbatch, op.chunk)] = held
        if stage < self.n_stages - 1:
            self._messages.check(out, "output", op.microbatch)
            self._messages.send(out.detach(), Message(ACTIVATION, op.microbatch, stage))

    def _backward(self, op: Op) -> None:
        stage = op.virtual_stage(self.pp)
        key = (op.microbatch, op.chunk)
        held = self._held[key] if self.split_backward else self._held.pop(key)
        last = stage == self.n_stages - 1
        grad = None if last else self._messages.take(Message(GRADIENT, op.microbatch, stage + 1))
        with self._compute(op):
            if held.linears is None:  # the whole backward
                torch.autograd.backward(held.output, grad)
                input_grad = held.input.grad if held.input is not None else None
            else:  # input gradient now, Linear weight gradients in W
                linear_weights = {id(r.module.weight) for r in held.linears}
                others = [p for m in self.stage.chunk_modules(op.chunk) for p in m.parameters()
                          if p.requires_grad and id(p) not in linear_weights]
                grads = torch.autograd.grad(held.output, [held.input] + others, grad, allow_unused=True)
                input_grad = grads[0]
                for param, g in zip(others, grads[1:]):
                    _accumulate(param, g)
            held.output = held.input = None  # the graph is freed; W keeps only its records
        if stage > 0:
            self._messages.check(input_grad, "input gradient", op.microbatch)
            self._messages.send(input_grad, Message(GRADIENT, op.microbatch, stage))

    def _weight_grad(self, op: Op) -> None:
        held = self._held.pop((op.microbatch, op.chunk))
        with self._compute(op), torch.no_grad():
            for record in held.linears or []:
                if record.grad_output is None:
                    raise RuntimeError(f"{op}: a Linear's output gradient was never seen in B "
                                       f"(is it outside the path from the stage input?)")
                g = record.grad_output.flatten(0, -2)
                weight = record.module.weight
                _accumulate(weight, (g.t() @ record.input.flatten(0, -2).to(g.dtype)).to(weight.dtype))
                if record.module.bias is not None:
                    _accumulate(record.module.bias, g.sum(0).to(record.module.bias.dtype))

    def _note_linear(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._capture is None or not output.requires_grad:
            return
        record = _LinearRecord(module, args[0].detach())
        self._capture.append(record)

        def keep(grad: torch.Tensor) -> None:
            record.grad_output = grad
        output.register_hook(keep)

    @contextmanager
    def _compute(self, op: Op) -> Iterator[None]:
        """A pass: traced as a compute span and added to the step's busy time."""
        with self.trace.span(op.kind, COMPUTE, microbatch=op.microbatch, chunk=op.chunk):
            start = time.perf_counter()
            try:
                yield
            finally:
                self._busy += time.perf_counter() - start


# --- messages ---------------------------------------------------------------------------------
def _incoming(op: Op, pp: int, n_stages: int) -> Message | None:
    """The message pass `op` waits for: its input activation (F) or output gradient (B)."""
    stage = op.virtual_stage(pp)
    if op.kind == "F" and stage > 0:
        return Message(ACTIVATION, op.microbatch, stage - 1)
    if op.kind == "B" and stage < n_stages - 1:
        return Message(GRADIENT, op.microbatch, stage + 1)
    return None


def _outgoing(op: Op, pp: int, n_stages: int) -> Message | None:
    """The message pass `op` sends: its output activation (F) or input gradient (B)."""
    stage = op.virtual_stage(pp)
    if op.kind == "F" and stage < n_stages - 1:
        return Message(ACTIVATION, op.microbatch, stage)
    if op.kind == "B" and stage > 0:
        return Message(GRADIENT, op.microbatch, stage)
    return None


def _message_timing(schedule: list[list[Op]], pp: int, n_stages: int,
                    lookahead: int) -> tuple[dict[Message, int], dict[Message, int]]:
    """For every message of a step: the pass its sender sends it in, and the pass at whose start
    its receiver posts the receive (`lookahead` passes before the one that consumes it), each an
    index into that rank's list of passes. `PipelineRunner.step` posts and sends in this order."""
    sent_at: dict[Message, int] = {}
    posted_at: dict[Message, int] = {}
    for ops in schedule:
        for index, op in enumerate(ops):
            outgoing, incoming = _outgoing(op, pp, n_stages), _incoming(op, pp, n_stages)
            if outgoing is not None:
                sent_at[outgoing] = index
            if incoming is not None:
                posted_at[incoming] = max(0, index - lookahead)
    return sent_at, posted_at


def _accumulate(param: torch.Tensor, grad: torch.Tensor | None) -> None:
    if grad is None:
        return
    if param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad += grad


@torch.no_grad()
def pipeline_forward(stage: StageModule, group: Group, comm: Comm, tokens: torch.Tensor | None,
                     activation_shape: tuple[int, int, int], dtype: torch.dtype,
                     positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Forward only, for evaluation: the virtual stages run one after another, each handing its
    hidden states to the next. Returns the logits on the rank that runs the last stage, else None.
    Every rank of the pipeline calls it, with the same `activation_shape` (its b: these tokens'
    rows); only the first stage needs `tokens`."""
    n_stages = stage.pp * stage.v
    device = next(stage.parameters()).device
    x = tokens
    for virtual in range(n_stages):
        owner, chunk = virtual % stage.pp, virtual // stage.pp
        if owner != group.rank:
            continue
        if virtual > 0:
            x = torch.empty(activation_shape, dtype=dtype, device=device)
            comm.recv_async(x, (virtual - 1) % stage.pp, group, tag="activations", message_tag=virtual).wait()
        x = stage.forward_chunk(chunk, x, positions)
        if virtual < n_stages - 1:
            comm.send_async(x.contiguous(), (virtual + 1) % stage.pp, group, tag="activations",
                            message_tag=virtual + 1).wait()
    return x if stage.holds_head else None
