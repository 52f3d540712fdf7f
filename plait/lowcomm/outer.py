"""Local-SGD outer optimizers: DiLoCo, NoLoCo and CO2.

Each worker of the data-parallel group trains its own copy θ of the model with an ordinary
(inner) optimizer and no per-step communication. Every H inner steps an outer optimizer
moves a slow fp32 copy φ of the weights using the pseudo-gradient (how far the workers
moved), and the workers restart from φ. The classes here own φ and the outer state; the
caller owns the model and the inner optimizer and calls `after_inner_step(step)` after each
inner optimizer step, with `step` the number of inner steps taken so far (1, 2, ...).

All workers must start from identical weights (the caller's seeding). Every communication
goes through `Comm` with the tag "sync".
"""

from __future__ import annotations

from typing import Iterable

import torch

from plait.comm import Comm, Group, Handle

SYNC = "sync"


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One fp32 vector holding the tensors' values (a copy, whatever their dtype)."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _write(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` into `tensors` (casting to their dtype)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def partition_fragments(sizes: list[int], fragments: int) -> list[list[int]]:
    """Split parameter indices 0..len(sizes)-1 into `fragments` contiguous, non-empty runs of
    roughly equal element counts (streaming DiLoCo's fragments, in model order)."""
    if not 1 <= fragments <= len(sizes):
        raise ValueError(f"need 1 <= fragments <= {len(sizes)} parameters, got {fragments}")
    total = sum(sizes)
    parts: list[list[int]] = []
    current: list[int] = []
    seen = 0
    for index, size in enumerate(sizes):
        current.append(index)
        seen += size
        parts_left = fragments - len(parts) - 1  # after closing `current`
        params_left = len(sizes) - index - 1
        # Close the fragment at its share of the elements, or when each later one needs
        # exactly one of the parameters left.
        if parts_left and (seen * fragments >= total * (len(parts) + 1) or params_left == parts_left):
            parts.append(current)
            current = []
    parts.append(current)
    return parts


class DiLoCo:
    """DiLoCo (Douillard et al. 2023), optionally streaming.

    At a sync of fragment f: Δ = φ_f - θ_f averaged over the group (one all-reduce, fp32 or
    bf16 on the wire), then outer SGD on φ_f with Δ as the gradient: m <- β·m + Δ,
    φ <- φ - lr·(Δ + β·m) with Nesterov or φ <- φ - lr·m without (torch.optim.SGD's rule),
    then θ_f <- alpha·θ_f + (1 - alpha)·φ_f (alpha = 0, the default, is plain DiLoCo).

    With `fragments` = F > 1, the parameters are split into F contiguous fragments and
    fragment f synchronises at the steps s with s ≡ f·H//F (mod H), so the traffic of one
    round is spread over it (its first round is shorter than H; later rounds are H).
    """

    def __init__(self, params: Iterable[torch.Tensor], comm: Comm, group: Group, inner_steps: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True,
                 fragments: int = 1, alpha: float = 0.0, bf16_pseudo_grads: bool = False, tag: str = SYNC):
        self.params = list(params)
        if inner_steps < 1:
            raise ValueError("inner_steps must be at least 1")
        if not 1 <= fragments <= inner_steps:
            raise ValueError("fragments must be between 1 and inner_steps (their offsets must differ)")
        self.comm, self.group, self.inner_steps = comm, group, inner_steps
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.alpha, self.bf16_pseudo_grads, self.tag = alpha, bf16_pseudo_grads, tag
        self.fragments = partition_fragments([p.numel() for p in self.params], fragments)
        self.offsets = [f * inner_steps // fragments for f in range(fragments)]
        with torch.no_grad():
            self.global_weights = [_flatten(self._members(f)) for f in range(fragments)]  # φ, fp32
        self.momentum = [torch.zeros_like(phi) if outer_momentum else None for phi in self.global_weights]

    def state_dict(self) -> dict:
        return {"global_weights": [phi.clone() for phi in self.global_weights],
                "momentum": [None if m is None else m.clone() for m in self.momentum]}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.global_weights + self.momentum, state["global_weights"] + state["momentum"]):
            if mine is not None:
                mine.copy_(saved)

    def _members(self, fragment: int) -> list[torch.Tensor]:
        return [self.params[i] for i in self.fragments[fragment]]

    def fragments_due(self, step: int) -> list[int]:
        """The fragments that synchronise after inner step `step` (1-based)."""
        return [f for f, offset in enumerate(self.offsets)
                if step >= 1 and step % self.inner_steps == offset]

    def after_inner_step(self, step: int) -> bool:
        """Synchronise the fragments due at `step`; True if any was."""
        due = self.fragments_due(step)
        for fragment in due:
            self._sync(fragment)
        return bool(due)

    @torch.no_grad()
    def _sync(self, fragment: int) -> None:
        members, phi = self._members(fragment), self.global_weights[fragment]
        delta = phi - _flatten(members)
        delta /= self.group.size  # divide before summing: the sum is the mean, and bf16 stays in range
        if self.bf16_pseudo_grads:
            wire = delta.to(torch.bfloat16)
            self.comm.all_reduce(wire, self.group, tag=self.tag)
            delta = wire.float()
        else:
            self.comm.all_reduce(delta, self.group, tag=self.tag)
        step = delta
        if self.outer_momentum:
            momentum = self.momentum[fragment]
            momentum.mul_(self.outer_momentum).add_(delta)
            step = delta.add(momentum, alpha=self.outer_momentum) if self.nesterov else momentum
        phi.sub_(step, alpha=self.outer_lr)
        if self.alpha:
            _write(_flatten(members).mul_(self.alpha).add_(phi, alpha=1 - self.alpha), members)
        else:
            _write(phi, members)


def noloco_groups(step: int, world: int, group_size: int, seed: int = 0) -> list[list[int]]:
    """NoLoCo's groups for the sync at `step`: a permutation of 0..world-1 drawn from a
    generator seeded by (seed, step), so every rank computes the same one, cut into
    world // group_size groups whose sizes differ by at most one (group_size to
    2·group_size - 1 members; one group of everyone when world < 2·group_size).
    Members are indices into the data-parallel group, sorted within each group."""
    if world < 1 or group_size < 1:
        raise ValueError("world and group_size must be positive")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    order = torch.randperm(world, generator=generator).tolist()
    count = max(world // group_size, 1)
    base, extra = divmod(world, count)
    groups, start = [], 0
    for g in range(count):
        size = base + (1 if g < extra else 0)
        groups.append(sorted(order[start:start + size]))
        start += size
    return sorted(groups)


class NoLoCo:
    """NoLoCo: no all-reduce; every H steps each worker averages with a small group found by
    `noloco_groups`, by point-to-point exchange, and takes the modified Nesterov step

        m <- β·m + α·mean_group(Δ) + α·(mean_group(φ) - φ_i),  Δ_j = θ_j - φ_j
        φ_i <- φ_i + m;  θ_i <- φ_i

    The two α terms add up to α·(mean_group(θ) - φ_i), so only θ is exchanged (half the
    bytes of sending Δ and φ). Mapping to DiLoCo: when one group spans every worker, φ is the
    same on all of them, the pull term vanishes and m = -α·m_DiLoCo, so the step is exactly
    DiLoCo's with outer_lr = α, outer_momentum = β and nesterov=False (with β = 0 Nesterov
    and plain momentum coincide too).

    The group mean is gathered round a ring of the group's members (a pair is one exchange)
    and summed in member order, so the members of a group get bit-identical means.
    """

    def __init__(self, params: Iterable[torch.Tensor], comm: Comm, group: Group, inner_steps: int,
                 outer_lr: float = 0.7, outer_momentum: float = 0.5, group_size: int = 2, seed: int = 0,
                 tag: str = SYNC):
        self.params = list(params)
        if inner_steps < 1:
            raise ValueError("inner_steps must be at least 1")
        self.comm, self.group, self.inner_steps = comm, group, inner_steps
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.group_size, self.seed, self.tag = group_size, seed, tag
        with torch.no_grad():
            self.global_weights = _flatten(self.params)  # φ_i: this worker's slow weights
        self.momentum = torch.zeros_like(self.global_weights)
        self.last_groups: list[list[int]] = []

    def after_inner_step(self, step: int) -> bool:
        if step < 1 or step % self.inner_steps:
            return False
        self.last_groups = noloco_groups(step, self.group.size, self.group_size, self.seed)
        members = next(g for g in self.last_groups if self.group.rank in g)
        with torch.no_grad():
            mean_theta = self._group_mean(_flatten(self.params), members)
            self.momentum.mul_(self.outer_momentum).add_(mean_theta - self.global_weights, alpha=self.outer_lr)
            self.global_weights.add_(self.momentum)
            _write(self.global_weights, self.params)
        return True

    def state_dict(self) -> dict:
        return {"global_weights": self.global_weights.clone(), "momentum": self.momentum.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.global_weights.copy_(state["global_weights"])
        self.momentum.copy_(state["momentum"])

    def _group_mean(self, mine: torch.Tensor, members: list[int]) -> torch.Tensor:
        n = len(members)
        if n == 1:
            return mine
        position = members.index(self.group.rank)
        after, before = members[(position + 1) % n], members[(position - 1) % n]
        blocks = {self.group.rank: mine}
        outgoing = mine
        for hop in range(1, n):  # pass each block one place along the ring, n - 1 times
            incoming = torch.empty_like(mine)
            self.comm.send_recv_async(outgoing, after, incoming, before, self.group,
                                      tag=self.tag, message_tag=hop).wait()
            blocks[members[(position - hop) % n]] = incoming
            outgoing = incoming
        total = blocks[members[0]].clone()
        for member in members[1:]:
            total += blocks[member]
        return total / n


class CO2:
    """CO2: local SGD whose outer all-reduce overlaps the next H inner steps.

    Staleness, exactly: at the sync after round k (step k·H) this worker computes
    Δ_k = φ_start(k) - θ_k, with φ_start(k) the weights round k started from, and launches
    its asynchronous all-reduce; it then waits for the all-reduce launched at the previous
    sync and applies that average, Δ̄_(k-1), one round stale:

        m <- β·m + Δ̄_(k-1) / λ_gap;  m <- m·min(1, clip/|m|) if clip;  φ <- φ - η·m;  θ <- φ

    So round k+1 starts from φ that includes rounds up to k-1; the first sync applies
    nothing and round 2 restarts from the initial weights. `flush()` completes and applies
    the last round on demand; the trainer does not call it, so that a run's trajectory does
    not depend on where it stops: checkpoints keep the average in flight (`state_dict`).
    """

    def __init__(self, params: Iterable[torch.Tensor], comm: Comm, group: Group, inner_steps: int,
                 outer_lr: float = 1.0, outer_momentum: float = 0.5, gap_penalty: float = 1.0,
                 clip: float | None = None, tag: str = SYNC):
        self.params = list(params)
        if inner_steps < 1:
            raise ValueError("inner_steps must be at least 1")
        self.comm, self.group, self.inner_steps = comm, group, inner_steps
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.gap_penalty, self.clip, self.tag = gap_penalty, clip, tag
        with torch.no_grad():
            self.global_weights = _flatten(self.params)  # φ
        self.momentum = torch.zeros_like(self.global_weights)
        self._pending: tuple[torch.Tensor, Handle] | None = None  # (buffer, handle) in flight

    def after_inner_step(self, step: int) -> bool:
        if step < 1 or step % self.inner_steps:
            return False
        with torch.no_grad():
            # θ started this round from the current φ (nothing has updated it since).
            delta = (self.global_weights - _flatten(self.params)).div_(self.group.size)
            self._apply_pending()
            handle = self.comm.all_reduce(delta, self.group, async_op=True, tag=self.tag)
            self._pending = (delta, handle)
            _write(self.global_weights, self.params)
        return True

    def flush(self) -> None:
        """Wait for the all-reduce in flight, apply it and restart θ from the new φ."""
        with torch.no_grad():
            self._apply_pending()
            _write(self.global_weights, self.params)

    def state_dict(self) -> dict:
        """φ, m and the average still in flight (waited for, not yet applied)."""
        pending = None
        if self._pending is not None:
            self._pending[1].wait()
            pending = self._pending[0].clone()
        return {"global_weights": self.global_weights.clone(), "momentum": self.momentum.clone(),
                "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        self.global_weights.copy_(state["global_weights"])
        self.momentum.copy_(state["momentum"])
        pending = state["pending"]
        self._pending = None if pending is None else (pending.clone(), Handle(None, None))

    def _apply_pending(self) -> None:
        if self._pending is None:
            return
        averaged, handle = self._pending
        handle.wait()
        self._pending = None
        self.momentum.mul_(self.outer_momentum).add_(averaged, alpha=1.0 / self.gap_penalty)
        if self.clip is not None:
            norm = float(self.momentum.norm())
            if norm > self.clip:
                self.momentum.mul_(self.clip / norm)
        self.global_weights.sub_(self.momentum, alpha=self.outer_lr)
