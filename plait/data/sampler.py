"""Deterministic sample order: step t's global batch depends only on (seed, t).

A split of n tokens is cut into n_windows = (n - 1) // seq_len non-overlapping windows
(window w starts at token w * seq_len; the +1 is the target of the last input). Global
sample g = (step - 1) * global_batch + i reads window perm_e[g % n_windows] with
e = g // n_windows and perm_e a permutation seeded by (seed, e). So every window is seen
once per epoch, every rank computes the same batch whatever the data-parallel degree (each
takes its rows), and resuming at any step needs no saved state.
"""

from __future__ import annotations

import numpy as np
import torch


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
    index = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    rows = torch.from_numpy(np.asarray(tokens)[index].astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
