"""Which transformer layers each pipeline stage holds.

The model is cut into S = pp * v contiguous virtual stages in model order; virtual stage s runs
on rank s % pp as its chunk s // pp (see `schedules`). The first stage also holds the token
embedding and the last the final norm, LM head and loss, so by default those two get fewer
layers: a pipeline runs at the pace of its slowest stage, so we minimise the largest stage cost.
"""

from __future__ import annotations

from plait.layout.pipeline import split_problem


def head_cost_in_layers(dim: int, ffn_dim: int, vocab_size: int, seq_len: int,
                        n_heads: int, n_kv_heads: int) -> float:
    """Forward FLOPs of the LM head per token, in units of one transformer layer's.

    Matmul FLOPs only: the cross-entropy over the vocabulary is elementwise and small next to
    the head matmul. Grows with vocab / dim, e.g. about 2 layers for Llama-3-8B, 0.15 for the
    default tiny model, so the last stage's share of layers depends on the model.
    """
    kv_dim = dim * n_kv_heads // n_heads
    projections = 2 * (2 * dim * dim + 2 * dim * kv_dim)  # q and o, k and v
    mlp = 2 * 3 * dim * ffn_dim  # SwiGLU: gate, up, down
    attention = 2 * seq_len * dim  # scores and weighted sum, halved by the causal mask
    head = 2 * dim * vocab_size
    return head / (projections + mlp + attention)


def check_explicit_split(counts: list[int], n_layers: int, stages: int) -> None:
    """Raise ValueError (one line naming parallel.pp_layers) unless `counts` is a usable split."""
    reason = split_problem(counts, n_layers, stages)
    if reason is not None:
        raise ValueError(reason)


def balanced_counts(n_layers: int, stages: int, embed_cost: float, head_cost: float) -> list[int]:
    """Layers per stage minimising the costliest stage (layer = 1, plus embedding/head at the ends).

    Each stage starts with one layer; every further layer goes to the currently cheapest stage.
    For identical unit items that greedy rule gives the smallest possible maximum. Ties go to
    the later stage because, under 1F1B, later ranks hold fewer micro-batches' activations.
    """
    if stages < 1 or n_layers < stages:
        raise ValueError(f"model.n_layers={n_layers} cannot fill {stages} pipeline stages with a layer each")
    counts = [1] * stages
    extra = [0.0] * stages
    extra[0] += embed_cost
    extra[-1] += head_cost
    for _ in range(n_layers - stages):
        cheapest = min(range(stages), key=lambda s: (counts[s] + extra[s], -s))
        counts[cheapest] += 1
    return counts


def partition_layers(n_layers: int, pp: int, v: int = 1, explicit: list[int] | None = None,
                     embed_cost: float = 0.0, head_cost: float = 1.0) -> list[list[int]]:
    """Layer indices of each virtual stage, in model order (index s = chunk * pp + rank).

    `explicit` is parallel.pp_layers: one layer count per virtual stage. Otherwise the split is
    balanced by cost, with `embed_cost` and `head_cost` in units of one layer (the embedding is
    a lookup, hence 0 by default; pass `head_cost_in_layers(...)` for the real model).
    """
    stages = pp * v
    if explicit is not None:
        check_explicit_split(list(explicit), n_layers, stages)
        counts = list(explicit)
    else:
        counts = balanced_counts(n_layers, stages, embed_cost, head_cost)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(stages)]


def rank_chunks(stages: list[list[int]], pp: int, rank: int) -> list[list[int]]:
    """The layer indices of each of `rank`'s model chunks, chunk 0 first."""
    return stages[rank::pp]
