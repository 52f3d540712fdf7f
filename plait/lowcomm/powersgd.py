"""PowerSGD: all-reduce a low-rank approximation of each gradient matrix (Vogels et al. 2019).

Per gradient matrix M (n x m, this rank's gradient plus its error-feedback residual) and a
rank r with (n + m) * r < n * m:

    P = M Q              all-reduced (summed) over the group
    P <- orthonormal     (QR in fp32; every rank holds the same P, so the same result)
    Q = M^T P            all-reduced (summed)
    M_hat = P Q^T        the summed gradient projected on the column space of P

Sums, not means: plait sums gradients over data-parallel ranks (the loss is already
normalised by the global token count, see parallel/data_parallel.py), so M_hat approximates
sum_i M_i and replaces every rank's gradient.

Error feedback follows Vogels et al.: each rank keeps what its share of the approximation
missed, residual_i = M_i - M_hat / n, where M_hat / n is the approximation of the *mean*
gradient (their decompressed value). Summed over ranks that is sum_i M_i - M_hat, so after
any number of steps

    sum over steps of M_hat + sum over ranks of residual == sum over steps and ranks of raw grads,

nothing is lost, only delayed. Q is warm-started from the previous step (one power
iteration per step then tracks the slowly moving top subspace); its first value is drawn
from a generator seeded from the tensor's name, identically on every rank.

Tensors that would not shrink (vectors, small matrices) and every tensor during the first
`warmup_steps` steps go through a plain summed all-reduce. All P's travel in one flat
all-reduce, all Q's in a second, and all uncompressed tensors of one dtype in a third, so a
step costs three collectives whatever the number of layers.
"""

from __future__ import annotations

import zlib

import torch

from plait.comm import Comm, Group


def compressed_size(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """Elements sent for a rank-`rank` factorisation of a tensor of `shape`: (n + m) * r."""
    n, m = matrix_shape(shape)
    return (n + m) * rank


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The matrix a tensor is compressed as: first dimension by all the others."""
    n = shape[0]
    return n, (int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1)


def compresses(shape: torch.Size | tuple[int, ...], rank: int, min_compression: float = 1.0) -> bool:
    """Whether rank `rank` is worth it: a matrix (two or more dimensions) whose factors are
    at least `min_compression` times smaller than the matrix itself."""
    if len(shape) < 2 or rank < 1:
        return False
    n, m = matrix_shape(shape)
    return compressed_size(shape, rank) * min_compression < n * m


def orthonormalise(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning p's columns (reduced QR, fp32). Householder QR stays
    orthonormal even when p is rank-deficient (a zero gradient, a matrix of lower rank)."""
    q, _ = torch.linalg.qr(p.float(), mode="reduced")
    return q


def name_seed(name: str, seed: int) -> int:
    """A seed that depends only on the name and `seed`: Python's hash() of a str differs
    between processes (PYTHONHASHSEED), so it cannot be used to agree across ranks."""
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2**63)


class PowerSGDCompressor:
    """Compressed summed all-reduce of a step's gradients, with per-tensor state.

    rank: the default rank r; `ranks` (name -> rank) overrides it per tensor (the adaptive
    variant sets it). warmup_steps: steps 1..warmup_steps (plait counts steps from 1) use a
    plain all-reduce. min_compression: compress only where the factors are at least this
    many times smaller than the matrix (1.0: any saving). seed: for Q's first value.
    """

    def __init__(self, rank: int, warmup_steps: int = 0, min_compression: float = 1.0, seed: int = 0):
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be at least 1, got {rank}")
        self.rank, self.warmup_steps = rank, warmup_steps
        self.min_compression, self.seed = min_compression, seed
        self.ranks: dict[str, int] = {}
        self.q: dict[str, torch.Tensor] = {}  # warm start, m x r, fp32
        self.residual: dict[str, torch.Tensor] = {}  # error feedback, fp32, shape of the gradient

    def rank_of(self, name: str) -> int:
        return self.ranks.get(name, self.rank)

    def compressed_names(self, grads: dict[str, torch.Tensor]) -> list[str]:
        """Names that are compressed (after warm-up), in the order their factors are packed."""
        return [name for name in sorted(grads)
                if compresses(grads[name].shape, self.rank_of(name), self.min_compression)]

    def reduce(self, grads: dict[str, torch.Tensor], group: Group, comm: Comm, step: int) -> None:
        """Replace every gradient in `grads` by (an approximation of) its sum over `group`.

        Every rank must call this with the same names, shapes and `step`. A group of one
        has nothing to communicate and keeps its gradients exact.
        """
        if group.size == 1 or not grads:
            return
        names = sorted(grads)  # one order on every rank, whatever the dict's insertion order
        compressed = self.compressed_names(grads) if step > self.warmup_steps else []
        chosen = set(compressed)
        plain_handles = self._plain_all_reduce([n for n in names if n not in chosen], grads, group, comm)
        if compressed:
            self._compressed_all_reduce(compressed, grads, group, comm)
        for handle, finish in plain_handles:
            handle.wait()
            finish()

    # --- plain part -----------------------------------------------------------------------
    def _plain_all_reduce(self, names: list[str], grads: dict[str, torch.Tensor], group: Group, comm: Comm):
        """Start one flat all-reduce per dtype; returns (handle, unpack) pairs, so the plain
        traffic overlaps the compressed part's arithmetic."""
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in names:
            by_dtype.setdefault(grads[name].dtype, []).append(name)
        pending = []
        for dtype, members in by_dtype.items():
            flat = torch.cat([grads[n].reshape(-1) for n in members])
            handle = comm.all_reduce(flat, group, async_op=True, tag="grads")

            def unpack(flat=flat, members=members) -> None:
                offset = 0
                for n in members:
                    g = grads[n]
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

            pending.append((handle, unpack))
        return pending

    # --- compressed part ------------------------------------------------------------------
    def _q_for(self, name: str, m: int, r: int, device: torch.device) -> torch.Tensor:
        """This tensor's warm-start Q, resized when its rank changed (kept columns stay warm,
        new ones are drawn from the name's generator)."""
        q = self.q.get(name)
        if q is not None and q.shape[0] == m and q.shape[1] == r:
            return q
        fresh = torch.randn(m, r, generator=torch.Generator().manual_seed(name_seed(name, self.seed)))
        fresh = fresh.to(device)
        if q is not None and q.shape[0] == m:
            keep = min(r, q.shape[1])
            fresh[:, :keep] = q[:, :keep]
        self.q[name] = fresh
        return fresh

    def _compressed_all_reduce(self, names: list[str], grads: dict[str, torch.Tensor],
                               group: Group, comm: Comm) -> None:
        device = grads[names[0]].device
        matrices, shapes = [], []
        for name in names:
            g = grads[name]
            n, m = matrix_shape(g.shape)
            residual = self.residual.get(name)
            if residual is None:
                residual = self.residual[name] = torch.zeros(n, m, dtype=torch.float32, device=device)
            matrices.append(g.reshape(n, m).float() + residual)  # M = gradient + error feedback
            shapes.append((n, m, self.rank_of(name)))

        # P = M Q for every matrix, packed into one buffer, summed in one collective.
        p_flat = torch.empty(sum(n * r for n, _, r in shapes), dtype=torch.float32, device=device)
        ps, offset = [], 0
        for name, M, (n, m, r) in zip(names, matrices, shapes):
            p = p_flat[offset:offset + n * r].view(n, r)
            torch.matmul(M, self._q_for(name, m, r, device), out=p)
            ps.append(p)
            offset += n * r
        comm.all_reduce(p_flat, group, tag="grads")

        # Q = M^T P with P orthonormal, packed and summed the same way.
        q_flat = torch.empty(sum(m * r for _, m, r in shapes), dtype=torch.float32, device=device)
        qs, offset = [], 0
        for i, (M, (n, m, r)) in enumerate(zip(matrices, shapes)):
            ps[i] = orthonormalise(ps[i])
            q = q_flat[offset:offset + m * r].view(m, r)
            torch.matmul(M.t(), ps[i], out=q)
            qs.append(q)
            offset += m * r
        comm.all_reduce(q_flat, group, tag="grads")

        for name, M, p, q in zip(names, matrices, ps, qs):
            approx = p @ q.t()  # approximates the sum over ranks of M
            self.residual[name] = M - approx / group.size  # this rank's share of what was missed
            self.q[name] = q.clone()  # warm start for the next step
            grads[name].copy_(approx.view_as(grads[name]))

    # --- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Per-rank state to checkpoint: residuals differ between ranks, Q's do not."""
        return {"ranks": dict(self.ranks), "q": dict(self.q), "residual": dict(self.residual)}

    def load_state_dict(self, state: dict) -> None:
        self.ranks = dict(state["ranks"])
        self.q = dict(state["q"])
        self.residual = dict(state["residual"])
