"""The one thin layer every collective in plait goes through.

Each call is tagged with its group's name and a per-group sequence number, and records
the bytes this rank sends and when it entered and left the collective. That record is
what `comm_bytes` in metrics.jsonl is summed from, and what fault detection reads. Gloo
fallbacks for collectives or dtypes that only NCCL has live here too, once.

Bytes sent per rank follow the ring algorithms (nccl-tests' conventions): all-reduce of
B bytes over n ranks sends 2(n-1)/n B; all-gather and reduce-scatter (n-1)/n of the full
buffer; broadcast and point-to-point B.
"""

from __future__ import annotations

import datetime
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

# Traffic with these tags (gathering step statistics, writing checkpoints) is left out of
# comm_bytes, so that the metric measures the training algorithm's own traffic.
BOOKKEEPING = "bookkeeping"
CHECKPOINT = "checkpoint"
UNMETERED = frozenset({BOOKKEEPING, CHECKPOINT})


@dataclass
class Group:
    """A named process group and this rank's place in it; a size-1 group needs no process group."""

    name: str
    ranks: list[int]
    rank: int  # this process's index within `ranks`
    process_group: Any = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    @staticmethod
    def single(name: str, global_rank: int) -> "Group":
        return Group(name=name, ranks=[global_rank], rank=0)


def new_group(ranks: list[int], timeout_s: float | None) -> Any:
    """A process group over `ranks` (collective over the whole world, as torch's new_group is).

    `timeout_s` should be the job's `parallel.timeout_s`: torch gives a new group its backend's
    default timeout (30 minutes for gloo), not the world group's, so a collective with a lost
    peer in a sub-group would otherwise outlast every fault deadline."""
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    return dist.new_group(ranks, timeout=timeout)


@dataclass
class CollectiveRecord:
    group: str
    seq: int
    op: str
    tag: str
    bytes_sent: int
    entered: float
    left: float | None = None
    ranks: tuple[int, ...] = ()  # the group's global ranks (fault detection compares them)


class Handle:
    """An in-flight collective; `wait()` blocks until it is done and records when it left."""

    def __init__(self, work: Any, record: CollectiveRecord | None,
                 on_done: Callable[[CollectiveRecord], None] | None = None):
        self._work = work
        self._record = record
        self._on_done = on_done

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._record is not None and self._record.left is None:
            self._record.left = time.monotonic()
            if self._on_done is not None:
                self._on_done(self._record)


@dataclass
class Comm:
    """Collectives with accounting. One instance per process, passed explicitly to whoever communicates."""

    history: deque = field(default_factory=lambda: deque(maxlen=4096))
    sequence: Counter = field(default_factory=Counter)  # per group name
    bytes_by_tag: Counter = field(default_factory=Counter)
    calls: int = 0
    # Called with each finished record (tracing, fault detection); keep them cheap.
    observers: list[Callable[[CollectiveRecord], None]] = field(default_factory=list)
    # Called with (group name, op) before a collective is entered (fault injection).
    before_collective: list[Callable[[str, str], None]] = field(default_factory=list)

    # --- accounting -------------------------------------------------------------------
    def _enter(self, group: Group, op: str, tag: str, bytes_sent: float) -> CollectiveRecord:
        self.sequence[group.name] += 1
        self.calls += 1
        record = CollectiveRecord(
            group=group.name, seq=self.sequence[group.name], op=op, tag=tag,
            bytes_sent=int(round(bytes_sent)), entered=time.monotonic(), ranks=tuple(group.ranks),
        )
        self.bytes_by_tag[tag] += record.bytes_sent
        self.history.append(record)
        return record

    def _finished(self, record: CollectiveRecord) -> None:
        for observer in self.observers:
            observer(record)

    def take_bytes(self) -> int:
        """Bytes sent since the last call, unmetered tags excluded; resets the counters."""
        total = sum(n for tag, n in self.bytes_by_tag.items() if tag not in UNMETERED)
        self.bytes_by_tag.clear()
        return total

    def _run(self, group: Group, op: str, tag: str, bytes_sent: float, launch, async_op: bool) -> Handle | None:
        for hook in self.before_collective:
            hook(group.name, op)
        record = self._enter(group, op, tag, bytes_sent)
        handle = Handle(launch(), record, self._finished if self.observers else None)
        if async_op:
            return handle
        handle.wait()
        return None

    # --- collectives --------------------------------------------------------------------
    def all_reduce(
        self, tensor: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM,
        async_op: bool = False, tag: str = "grads",
    ) -> Handle | None:
        if group.size == 1:
            return Handle(None, None) if async_op else None
        n = group.size
        sent = 2 * (n - 1) / n * tensor.numel() * tensor.element_size()
        launch = lambda: dist.all_reduce(tensor, op=op, group=group.process_group, async_op=async_op)  # noqa: E731
        return self._run(group, "all_reduce", tag, sent, launch, async_op)

    def all_gather_into(
        self, output: torch.Tensor, shard: torch.Tensor, group: Group,
        async_op: bool = False, tag: str = "params",
    ) -> Handle | None:
        """Concatenate every rank's `shard` (equal sizes) into `output` along dim 0."""
        if group.size == 1:
            output.copy_(shard.reshape(output.shape))
            return Handle(None, None) if async_op else None
        n = group.size
        sent = (n - 1) / n * output.numel() * output.element_size()
        launch = lambda: dist.all_gather_single(output, shard, group=group.process_group, async_op=async_op)  # noqa: E731
        return self._run(group, "all_gather", tag, sent, launch, async_op)

    def reduce_scatter(
        self, output: torch.Tensor, full: torch.Tensor, group: Group,
        async_op: bool = False, tag: str = "grads",
    ) -> Handle | None:
        """Sum `full` over the group and leave this rank's equal 1/n slice (along dim 0) in `output`."""
        if group.size == 1:
            output.copy_(full.reshape(output.shape))
            return Handle(None, None) if async_op else None
        n = group.size
        sent = (n - 1) / n * full.numel() * full.element_size()
        launch = lambda: dist.reduce_scatter_single(output, full, group=group.process_group, async_op=async_op)  # noqa: E731
        return self._run(group, "reduce_scatter", tag, sent, launch, async_op)

    def broadcast(self, tensor: torch.Tensor, src_rank: int, group: Group, tag: str = "state") -> None:
        """Broadcast from the group's member `src_rank` (an index into group.ranks)."""
        if group.size == 1:
            return
        sent = tensor.numel() * tensor.element_size()
        src = group.ranks[src_rank]
        self._run(group, "broadcast", tag, sent,
                  lambda: dist.broadcast(tensor, src=src, group=group.process_group), async_op=False)

    def all_gather_object(self, obj: Any, group: Group, tag: str = BOOKKEEPING) -> list[Any]:
        if group.size == 1:
            return [obj]
        out: list[Any] = [None] * group.size
        self._run(group, "all_gather_object", tag, 0,
                  lambda: dist.all_gather_object(out, obj, group=group.process_group), async_op=False)
        return out

    def broadcast_object(self, obj: Any, src_rank: int, group: Group, tag: str = BOOKKEEPING) -> Any:
        if group.size == 1:
            return obj
        box = [obj]
        src = group.ranks[src_rank]
        self._run(group, "broadcast_object", tag, 0,
                  lambda: dist.broadcast_object_list(box, src=src, group=group.process_group), async_op=False)
        return box[0]

    def barrier(self, group: Group) -> None:
        if group.size == 1:
            return
        self._run(group, "barrier", BOOKKEEPING, 0,
                  lambda: dist.barrier(group=group.process_group), async_op=False)

    # --- point-to-point -----------------------------------------------------------------
    def send_recv_async(
        self, send_tensor: torch.Tensor, dst_rank: int, recv_tensor: torch.Tensor, src_rank: int,
        group: Group, tag: str = "activations", message_tag: int = 0,
    ) -> Handle:
        """Send `send_tensor` to the group's member `dst_rank` and receive `recv_tensor` from
        member `src_rank` (indices into group.ranks), both in flight at once: the ring step of
        ring attention. `message_tag` keeps concurrent exchanges between the same pair apart.
        Bytes sent are the send tensor's bytes."""
        if group.size == 1:
            recv_tensor.copy_(send_tensor)  # a ring of one passes the block to itself
            return Handle(None, None)
        sent = send_tensor.numel() * send_tensor.element_size()
        dst, src = group.ranks[dst_rank], group.ranks[src_rank]

        def launch() -> _AllWorks:
            ops = [
                dist.P2POp(dist.isend, send_tensor, dst, group=group.process_group, tag=message_tag),
                dist.P2POp(dist.irecv, recv_tensor, src, group=group.process_group, tag=message_tag),
            ]
            return _AllWorks(dist.batch_isend_irecv(ops))

        return self._run(group, "send_recv", tag, sent, launch, async_op=True)

    def send_async(self, tensor: torch.Tensor, dst_rank: int, group: Group,
                   tag: str = "activations", message_tag: int = 0) -> Handle:
        """Start sending `tensor` to the group's member `dst_rank` (pipeline stage to stage).

        The tensor must stay unchanged until the handle is waited on. `message_tag` must match
        the receiver's, and keeps messages in flight between the same pair apart."""
        if group.size == 1:
            raise ValueError("point-to-point send within a group of one")
        sent = tensor.numel() * tensor.element_size()
        dst = group.ranks[dst_rank]
        launch = lambda: dist.isend(tensor, dst, group=group.process_group, tag=message_tag)  # noqa: E731
        return self._run(group, "send", tag, sent, launch, async_op=True)

    def recv_async(self, tensor: torch.Tensor, src_rank: int, group: Group,
                   tag: str = "activations", message_tag: int = 0) -> Handle:
        """Start receiving into `tensor` (shape and dtype fixed by the caller) from member `src_rank`."""
        if group.size == 1:
            raise ValueError("point-to-point receive within a group of one")
        src = group.ranks[src_rank]
        launch = lambda: dist.irecv(tensor, src, group=group.process_group, tag=message_tag)  # noqa: E731
        return self._run(group, "recv", tag, 0, launch, async_op=True)


class _AllWorks:
    """Several in-flight works waited on as one (batch_isend_irecv returns one per op)."""

    def __init__(self, works: list[Any]):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()
