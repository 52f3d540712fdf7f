"""Stage-to-stage messages of the pipeline runtime: fixed-shape, tagged, asynchronous.

A message is named by (direction, micro-batch, sending virtual stage), and that triple is its
point-to-point tag, so messages between the same pair of ranks never get mixed up whatever order
they are posted in. Every message has its micro-batch's hidden-state shape [b, s, dim] and the
dtype, fixed up front, so a receive's buffer is allocated when it is posted. Micro-batches may
differ in rows b (a global batch shared out unevenly, layout/batch.py): every rank of the
pipeline is told each micro-batch's rows, so sender and receiver agree on every message's size.
Since tags repeat from step to step, `finish` (end of step) checks that every receive of the
step was consumed.

A send's buffer is kept until the send is done, and no longer: kept to the end of the step,
a middle rank's sends add up to 2·m·v activation-sized tensors. Gloo cannot say whether a send
is done short of waiting for it (`is_completed` stays False until `wait`), and waiting before
the receiver has posted its receive could stall a pass on a neighbour that is itself waiting
for this rank. So a send is waited for once the schedule proves its receive posted: the
receiver posts it at a known pass (`posted_at`), and a message the receiver sent in that pass
or a later one (`sent_at`) has arrived here. The wait then covers only the transfer itself.
Sends that the step never proves are waited for in `finish`.

A failed wait (peer process gone: connection closed; or the collective timeout) becomes
`PipelinePeerLost` naming the global rank it was exchanging with -- or, given a shared store,
the rank whose loss some stage noticed first (failures cascade along the pipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from plait.comm import Comm, Group, Handle
from plait.trace import RECV, SEND, TraceRecorder

ACTIVATION, GRADIENT = 0, 1


class PipelinePeerLost(RuntimeError):
    """A neighbouring pipeline stage stopped answering (its process died or hung past the timeout)."""

    def __init__(self, peer_rank: int, message: str):
        super().__init__(message)
        self.peer_rank = peer_rank


@dataclass(frozen=True)
class Message:
    direction: int  # ACTIVATION (stage s -> s + 1) or GRADIENT (s -> s - 1)
    microbatch: int
    sender: int  # virtual stage

    def tag(self, n_stages: int) -> int:
        return (self.microbatch * n_stages + self.sender) * 2 + self.direction

    def describe(self) -> str:
        what = "activation" if self.direction == ACTIVATION else "gradient"
        return f"the {what} of micro-batch {self.microbatch} from virtual stage {self.sender}"


class StageMessenger:
    """This rank's in-flight pipeline messages for one step; `finish` closes the step.

    `sent_at` and `posted_at` time the step's messages by the pass (an index into the rank's
    list of passes) at which their sender sends them and their receiver posts the receive.
    Without them every send is kept until `finish`. `peak_pending_sends` is the most send
    buffers this rank held at once. `shape` is a message's [b, s, dim]; `rows`, where given,
    replaces b per micro-batch (micro-batches of unequal rows).
    """

    def __init__(self, group: Group, comm: Comm, n_stages: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, trace: TraceRecorder, store: Any = None,
                 sent_at: Mapping[Message, int] | None = None, posted_at: Mapping[Message, int] | None = None,
                 rows: Sequence[int] | None = None):
        self.group, self.comm, self.n_stages = group, comm, n_stages
        self.pp = group.size
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.rows = None if rows is None else list(rows)
        self.trace, self.store = trace, store
        self.sent_at, self.posted_at = sent_at or {}, posted_at or {}
        self._posted: dict[Message, tuple[torch.Tensor, Handle]] = {}
        self._sends: list[tuple[Handle, Message, torch.Tensor]] = []
        self._heard: dict[int, int] = {}  # per peer: the latest pass it sent a message in that arrived here
        self.peak_pending_sends = 0

    def is_posted(self, message: Message) -> bool:
        return message in self._posted

    def _peer(self, message: Message, sending: bool) -> int:
        """Group index of the other end: the receiver when sending, the sender when receiving."""
        if not sending:
            return message.sender % self.pp
        step = 1 if message.direction == ACTIVATION else -1
        return (message.sender + step) % self.pp

    def shape_of(self, microbatch: int) -> tuple[int, ...]:
        """The shape of every message of `microbatch`, activation or gradient."""
        if self.rows is None:
            return self.shape
        return (self.rows[microbatch],) + self.shape[1:]

    def post(self, message: Message) -> None:
        buffer = torch.empty(self.shape_of(message.microbatch), dtype=self.dtype, device=self.device)
        peer = self._peer(message, sending=False)
        handle = self._guard(peer, f"posting a receive for {message.describe()}",
                             lambda: self.comm.recv_async(buffer, peer, self.group, tag="pipeline",
                                                          message_tag=message.tag(self.n_stages)))
        self._posted[message] = (buffer, handle)

    def take(self, message: Message) -> torch.Tensor:
        """Wait for a posted receive and hand over its buffer."""
        if message not in self._posted:
            self.post(message)
        buffer, handle = self._posted.pop(message)
        peer = self._peer(message, sending=False)
        with self.trace.span(f"recv {'act' if message.direction == ACTIVATION else 'grad'} "
                             f"mb{message.microbatch}", RECV, peer=self.group.ranks[peer]):
            self._guard(peer, f"waiting for {message.describe()}", handle.wait)
        if message in self.sent_at:
            self._heard[peer] = max(self._heard.get(peer, -1), self.sent_at[message])
            self._release_sends()
        return buffer

    def send(self, tensor: torch.Tensor, message: Message) -> None:
        peer = self._peer(message, sending=True)
        tensor = tensor.contiguous()
        with self.trace.span(f"send {'act' if message.direction == ACTIVATION else 'grad'} "
                             f"mb{message.microbatch}", SEND, peer=self.group.ranks[peer]):
            handle = self._guard(peer, f"sending {message.describe()}",
                                 lambda: self.comm.send_async(tensor, peer, self.group, tag="pipeline",
                                                              message_tag=message.tag(self.n_stages)))
        self._sends.append((handle, message, tensor))
        self.peak_pending_sends = max(self.peak_pending_sends, len(self._sends))
        self._release_sends()  # the receiver may have posted long ago

    def _release_sends(self) -> None:
        """Wait for the sends whose receives are known to be posted, and let their buffers go."""
        pending = []
        for handle, message, tensor in self._sends:
            peer = self._peer(message, sending=True)
            if message in self.posted_at and self._heard.get(peer, -1) >= self.posted_at[message]:
                self._guard(peer, f"sending {message.describe()}", handle.wait)
            else:
                pending.append((handle, message, tensor))
        self._sends = pending

    def finish(self) -> None:
        with self.trace.span("wait sends", SEND, count=len(self._sends)):
            for handle, message, _ in self._sends:
                peer = self._peer(message, sending=True)
                self._guard(peer, f"sending {message.describe()}", handle.wait)
        self._sends.clear()
        if self._posted:  # cannot happen for a valid schedule; would leave receives dangling
            raise RuntimeError(f"pipeline step ended with {len(self._posted)} unconsumed receives")

    def _guard(self, peer: int, doing: str, action):
        try:
            return action()
        except RuntimeError as error:
            if isinstance(error, PipelinePeerLost):
                raise
            rank, me = self.group.ranks[peer], self.group.ranks[self.group.rank]
            lost = self._first_lost(rank)
            if lost == me:
                message = (f"pipeline rank {me} was declared unreachable by another stage (it stalled past "
                           f"the timeout) and rank {rank} gave up while rank {me} was {doing}: {error}")
            elif lost == rank:
                message = f"pipeline peer rank {rank} is unreachable ({doing} on rank {me}): {error}"
            else:
                message = (f"pipeline peer rank {lost} is unreachable (reported by another stage first; "
                           f"rank {rank} then failed while rank {me} was {doing}): {error}")
            raise PipelinePeerLost(lost, message) from error

    def _first_lost(self, rank: int) -> int:
        """The rank whose loss was noticed first anywhere in the pipeline (needs `store`).

        A failure cascades: when rank 2 dies, rank 1 notices and fails, and then rank 0 sees rank 1
        vanish. The first rank to notice records the lost rank in the store (first writer wins),
        so every later error names rank 2, not the neighbour that merely failed after it.
        """
        if self.store is None:
            return rank
        try:
            key = f"plait/pipeline/{self.group.name}/lost_rank"
            return int(self.store.compare_set(key, "", str(rank)))
        except Exception:  # noqa: BLE001 - the store may have died with the rank that served it
            return rank

    def check(self, tensor: torch.Tensor | None, what: str, microbatch: int) -> None:
        shape = self.shape_of(microbatch)
        if tensor is None or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            got = None if tensor is None else (tuple(tensor.shape), tensor.dtype)
            raise ValueError(f"pipeline stage {what} is {got}, not the fixed message shape "
                             f"{shape} {self.dtype}")
