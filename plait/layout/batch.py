"""How a step's global batch is shared out: over the data-parallel ranks, then into micro-batches.

Any dp serves any global batch (elastic training shrinks and grows dp under a fixed batch):

- the step's rows go to the dp ranks as evenly as possible, in order, the first
  `global_batch % dp` ranks taking one row more (numpy's `array_split`);
- every dp rank runs the same number of micro-batches, `micro_batches`, because ZeRO-3 gathers
  weights and the pipeline schedule exchanges messages once per micro-batch, collectively; a
  rank splits its rows into that many micro-batches as evenly as possible (sizes differ by at
  most one, the larger first), so `micro_batch` is the most rows one forward pass takes.

Where micro_batch x dp divides the global batch this is the old equal split, row for row.
The loss is normalised by the global token count and gradients are summed over the ranks, so
unequal shares change nothing in the update.
"""

from __future__ import annotations


def rows_per_rank(global_batch: int, dp: int) -> list[int]:
    """Rows each dp rank takes of a step, in dp-rank order."""
    base, extra = divmod(global_batch, dp)
    return [base + (1 if rank < extra else 0) for rank in range(dp)]


def micro_batches(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches per step on every dp rank: enough for the rank with the most rows."""
    most_rows = -(-global_batch // dp)
    return -(-most_rows // micro_batch)


def micro_batch_sizes(rows: int, count: int) -> list[int]:
    """`rows` split into `count` micro-batches as evenly as possible (the larger ones first)."""
    base, extra = divmod(rows, count)
    return [base + (1 if index < extra else 0) for index in range(count)]


def smallest_micro_batch(global_batch: int, dp: int) -> int:
    """The smallest train.micro_batch that leaves no dp rank with an empty micro-batch
    (1 when dp divides the global batch, else 2); needs global_batch >= dp."""
    most, fewest = -(-global_batch // dp), global_batch // dp
    return -(-most // fewest)


def batch_problem(global_batch: int, micro_batch: int, dp: int) -> str | None:
    """Why this global batch cannot be shared out over dp ranks in micro-batches of at most
    `micro_batch` rows, or None when it can. Degrees below 1 are reported by other rules."""
    if global_batch < dp:
        return (f"train.global_batch={global_batch} is smaller than dp={dp}: "
                "every data-parallel rank needs at least one sequence per step")
    count, fewest = micro_batches(global_batch, micro_batch, dp), global_batch // dp
    if fewest < count:
        # The rank with the fewest rows would run an empty micro-batch (it must run as many as
        # the others, for the collectives inside each).
        return (f"train.micro_batch={micro_batch} needs {count} micro-batches per rank but some of dp={dp} "
                f"ranks hold only {fewest} of train.global_batch={global_batch} sequences; set "
                f"train.micro_batch={smallest_micro_batch(global_batch, dp)} or more")
    return None
