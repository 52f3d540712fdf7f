"""Deterministic sample order: step t's global batch depends only on (seed, t).

A split of n tokens is cut into n_windows = (n - 1) // seq_len non-overlapping windows
(window w starts at token w * seq_len; the +1 is the target of the last input). Global
sample g = (step - 1) * global_batch + i reads window perm_e[g % n_windows] with
e = g // n_windows and perm_e a permutation seeded by (seed, e). So every window is seen
once per epoch, every rank computes the same batch whatever the data-parallel degree (each
takes its rows), and resuming at any step needs no saved state.

A mixture (data.mix) keeps that property. Its global samples come in blocks of MIX_BLOCK:
each block holds q_s samples of source s (q_s: the weights' largest-remainder share of
MIX_BLOCK, the same in every block) in an order permuted by (seed, block). Sample g of source
s is that source's k-th, k = block * q_s + its rank among the block's samples of s, and reads
window perm_{s,e}[k % n_windows_s] of source s, as above. So every source's share of tokens
is its weight to within 1/MIX_BLOCK, each source's windows are all seen once per its epoch,
and any step's batch is computed from (seed, step) alone.
"""

from __future__ import annotations

import numpy as np
import torch

from plait.data.dataset import PreparedData
from plait.data.prepared import TokenStream
from plait.errors import DataError

MIX_BLOCK = 4096


class GlobalSampler:
    def __init__(self, n_tokens: int, seq_len: int, global_batch: int, seed: int) -> None:
        self.n_windows = (n_tokens - 1) // seq_len
        if self.n_windows < 1 or global_batch < 1:
            raise ValueError(f"{n_tokens} tokens hold no window of seq_len + 1 = {seq_len + 1} tokens")
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}  # at most two epochs: a batch may straddle them

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._perms[epoch] = rng.permutation(self.n_windows)
        return self._perms[epoch]

    def global_batch_starts(self, step: int) -> np.ndarray:
        """Token offsets of the `global_batch` windows of 1-based `step`, int64."""
        if step < 1:
            raise ValueError(f"step must be 1-based, got {step}")
        first = (step - 1) * self.global_batch
        samples = np.arange(first, first + self.global_batch, dtype=np.int64)
        epochs = samples // self.n_windows
        windows = np.empty_like(samples)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            mask = epochs == epoch
            windows[mask] = self._perm(epoch)[samples[mask] % self.n_windows]
        return windows * self.seq_len


class MixtureSampler:
    """Global batches drawn from several token streams laid end to end, by weight (see above)."""

    def __init__(self, sizes: list[int], weights: list[float], seq_len: int, global_batch: int, seed: int,
                 names: list[str] | None = None) -> None:
        names = names or [f"data.mix source {i}" for i in range(len(sizes))]
        if global_batch < 1:
            raise ValueError(f"global_batch must be at least 1, got {global_batch}")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.offsets = np.cumsum([0] + list(sizes[:-1]), dtype=np.int64)
        self.n_windows = np.array([(n - 1) // seq_len for n in sizes], dtype=np.int64)
        for name, n, w in zip(names, sizes, self.n_windows):
            if w < 1:
                raise DataError(f"{name}: {n} tokens hold no window of seq_len + 1 = {seq_len + 1} tokens")
        self.quota = block_quota(weights, MIX_BLOCK)
        for name, q, w in zip(names, self.quota, weights):
            if q == 0:
                raise DataError(f"{name}: weight {w} is below 1/{MIX_BLOCK} of the total, too small to sample")
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot, its rank among the block's slots of that source)."""
        if block not in self._blocks:
            if len(self._blocks) >= 2:
                self._blocks.pop(min(self._blocks))
            rng = np.random.Generator(np.random.PCG64([self.seed, 0x6D6978, block]))  # 0x6D6978: "mix"
            source = rng.permutation(np.repeat(np.arange(len(self.quota)), self.quota))
            rank = np.empty(MIX_BLOCK, dtype=np.int64)
            for s in range(len(self.quota)):
                mask = source == s
                rank[mask] = np.arange(int(mask.sum()))
            self._blocks[block] = (source, rank)
        return self._blocks[block]

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2 * len(self.quota):
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.Generator(np.random.PCG64([self.seed, 0x736F75, source, epoch]))  # "sou"
            self._perms[key] = rng.permutation(int(self.n_windows[source]))
        return self._perms[key]

    def sources_of(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, that source's sample number k) of each global sample number."""
        samples = np.asarray(samples, dtype=np.int64)
        blocks, slots = samples // MIX_BLOCK, samples % MIX_BLOCK
        source = np.empty_like(samples)
        k = np.empty_like(samples)
        for block in np.unique(blocks):
            mask = blocks == block
            block_source, block_rank = self._block(int(block))
            source[mask] = block_source[slots[mask]]
            k[mask] = block * np.asarray(self.quota)[source[mask]] + block_rank[slots[mask]]
        return source, k

    def global_batch_starts(self, step: int) -> np.ndarray:
        """Token offsets (into the sources laid end to end) of 1-based `step`'s windows, int64."""
        if step < 1:
            raise ValueError(f"step must be 1-based, got {step}")
        first = (step - 1) * self.global_batch
        source, k = self.sources_of(np.arange(first, first + self.global_batch, dtype=np.int64))
        starts = np.empty_like(k)
        for s in np.unique(source):
            mask = source == s
            n = int(self.n_windows[s])
            epochs, index = k[mask] // n, k[mask] % n
            windows = np.empty_like(index)
            for epoch in np.unique(epochs):
                here = epochs == epoch
                windows[here] = self._perm(int(s), int(epoch))[index[here]]
            starts[mask] = self.offsets[s] + windows * self.seq_len
        return starts


def block_quota(weights: list[float], block: int) -> list[int]:
    """Largest-remainder shares of `block` slots in proportion to `weights` (summing to `block`)."""
    total = float(sum(weights))
    exact = [block * w / total for w in weights]
    quota = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in by_remainder[: block - sum(quota)]:
        quota[i] += 1
    return quota


def make_sampler(data: PreparedData, seq_len: int, global_batch: int, seed: int) -> GlobalSampler | MixtureSampler:
    """The run's sampler: over one corpus, or by weight over data.mix's corpora."""
    if data.mixture is None:
        return GlobalSampler(len(data.train), seq_len, global_batch, seed)
    names, sizes, weights = zip(*data.mixture)
    return MixtureSampler(list(sizes), list(weights), seq_len, global_batch, seed,
                          names=[f"data.mix.{name}" for name in names])


def eval_starts(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """`count` window starts spread evenly over a split (all windows if it has fewer), int64."""
    n_windows = (n_tokens - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{n_tokens} tokens hold no window of seq_len + 1 = {seq_len + 1} tokens")
    k = max(1, min(count, n_windows))
    # i * n // k is strictly increasing for k <= n, so no window is evaluated twice.
    return np.arange(k, dtype=np.int64) * n_windows // k * seq_len


def get_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) int64 [len(starts), seq_len]; targets are inputs shifted by one token."""
    if isinstance(tokens, TokenStream):  # several shards or corpora: a window may cross into the next
        rows = torch.from_numpy(tokens.windows(np.asarray(starts, dtype=np.int64), seq_len + 1))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    rows = torch.from_numpy(np.asarray(tokens)[index].astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
