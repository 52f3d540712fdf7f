"""Any data-parallel size serves any global batch: rows shared out as evenly as possible
(the first global_batch % dp ranks one more), the same number of micro-batches on every rank,
none empty; the split itself, the config's refusals, and the losses of uneven layouts (plain
data parallelism, ZeRO-3, a pipeline with micro-batches of unequal rows) against the
single-process run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from distributed import run_on_ranks
from plait.config import accumulation_steps, load_config, validate
from plait.errors import ConfigError
from plait.layout import Job, Layout, ModelShape
from plait.layout.batch import batch_problem, micro_batch_sizes, micro_batches, rows_per_rank
from plait.train.trainer import Trainer
from scenarios import run_many

STEPS = 5


def split(global_batch: int, micro_batch: int, dp: int) -> list[list[np.ndarray]]:
    """Every dp rank's micro-batches of one step, as the trainer cuts them."""
    starts = np.arange(100, 100 + global_batch) * 7  # distinct, recognisable window starts
    accum = micro_batches(global_batch, micro_batch, dp)
    return [Trainer._micro_batches(SimpleNamespace(mesh=SimpleNamespace(dp=SimpleNamespace(size=dp, rank=rank)),
                                                   accum=accum), starts)
            for rank in range(dp)]


ACCEPTED = [(g, mb, dp) for g in range(1, 25) for mb in range(1, 9) for dp in range(1, 7)
            if batch_problem(g, mb, dp) is None]


def test_every_row_once_in_equal_numbers_of_micro_batches():
    for global_batch, micro_batch, dp in ACCEPTED:
        check_split(global_batch, micro_batch, dp)


def check_split(global_batch: int, micro_batch: int, dp: int) -> None:
    ranks = split(global_batch, micro_batch, dp)
    starts = np.arange(100, 100 + global_batch) * 7
    # In dp-rank order, micro-batch order: the global batch exactly, each row once.
    assert np.array_equal(np.concatenate([mb for rank in ranks for mb in rank]), starts)
    # Ranks' shares differ by at most one, the larger first (np.array_split order).
    shares = [sum(len(mb) for mb in rank) for rank in ranks]
    assert shares == rows_per_rank(global_batch, dp) and max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)
    # The same number of micro-batches everywhere, none empty, none over micro_batch rows,
    # sizes within a rank differing by at most one.
    assert {len(rank) for rank in ranks} == {micro_batches(global_batch, micro_batch, dp)}
    for rank, share in zip(ranks, shares):
        sizes = [len(mb) for mb in rank]
        assert sizes == micro_batch_sizes(share, len(rank))
        assert min(sizes) >= 1 and max(sizes) <= micro_batch and max(sizes) - min(sizes) <= 1


def test_divisible_batches_split_as_before():
    divisible = [(g, mb, dp) for g, mb, dp in ACCEPTED if g % (mb * dp) == 0]
    assert len(divisible) > 100
    for global_batch, micro_batch, dp in divisible:
        starts = np.arange(100, 100 + global_batch) * 7
        for rank, got in enumerate(split(global_batch, micro_batch, dp)):
            # The trainer's former split, row for row.
            per_rank = global_batch // dp
            old = np.split(starts[rank * per_rank:(rank + 1) * per_rank], global_batch // (micro_batch * dp))
            assert len(got) == len(old) and all(np.array_equal(a, b) for a, b in zip(got, old))


@pytest.mark.parametrize("overrides, world, micro_batch, accumulation", [
    (["train.global_batch=8", "train.micro_batch=2"], 3, 2, 2),  # rows 3, 3, 2
    (["train.global_batch=6", "train.micro_batch=2"], 4, 2, 1),  # rows 2, 2, 1, 1
    (["train.global_batch=13"], 2, 7, 1),  # micro_batch derived: the fullest rank's rows
    (["train.global_batch=12", "train.micro_batch=8"], 2, 8, 1),  # micro_batch caps a forward's rows
    (["train.global_batch=16", "train.micro_batch=4"], 4, 4, 1),
    (["train.global_batch=16", "train.micro_batch=4"], 3, 4, 2),  # rows 6, 5, 5
    (["train.global_batch=7", "train.micro_batch=2", "parallel.pp=2"], 4, 2, 2),
])
def test_uneven_batches_are_accepted(overrides, world, micro_batch, accumulation):
    cfg = validate(load_config("tiny", overrides), world_size=world)
    assert (cfg.train.micro_batch, accumulation_steps(cfg)) == (micro_batch, accumulation)
    if cfg.parallel.pp > 1:
        assert cfg.parallel.pp_microbatches == accumulation


@pytest.mark.parametrize("overrides, world, message", [
    # rows 2, 2, 1, 1 in micro-batches of 1: ranks 2 and 3 would run an empty second one
    (["train.global_batch=6", "train.micro_batch=1"], 4,
     "train.micro_batch=1 needs 2 micro-batches per rank but some of dp=4 ranks hold only 1 of "
     "train.global_batch=6 sequences; set train.micro_batch=2 or more"),
    (["train.global_batch=3"], 4, "train.global_batch=3 is smaller than dp=4"),
    (["train.global_batch=3", "train.micro_batch=1"], 4, "train.global_batch=3 is smaller than dp=4"),
    # local SGD: each worker's loss is the mean over an equal share
    (["train.global_batch=7", "train.sync=diloco"], 2, "train.sync=diloco needs train.global_batch=7 divisible by dp=2"),
    (["train.global_batch=6", "parallel.pp=2", "parallel.pp_microbatches=4"], 2,
     "parallel.pp_microbatches=4 != train.global_batch / (train.micro_batch x dp) = 1; "
     "no train.micro_batch gives 4 micro-batches per rank; leave pp_microbatches at 0"),
    (["train.global_batch=7", "parallel.pp=2", "parallel.pp_microbatches=3"], 2,
     "parallel.pp_microbatches=3 != train.global_batch / (train.micro_batch x dp) = 1; "
     "set train.micro_batch=3 or leave pp_microbatches at 0"),
])
def test_impossible_shares_are_one_line_config_errors(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        validate(load_config("tiny", overrides), world_size=world)
    assert str(err.value) == message if message.endswith(("more", "at 0")) else message in str(err.value)
    assert "\n" not in str(err.value)


def test_planner_counts_micro_batches_by_the_same_rule():
    shape = ModelShape(n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, seq_len=128)
    job = Job(Layout(dp=3, micro_batch=2), shape, 3, 8)
    assert job.micro_batches == 2  # rows 3, 3, 2
    assert Job(Layout(dp=4, micro_batch=4), shape, 4, 16).micro_batches == 1  # divisible: as before
    assert Job(Layout(dp=2, micro_batch=2), shape, 2, 16).micro_batches == 4


def test_pipeline_messages_take_each_micro_batch_rows():
    import torch

    from plait.comm import Comm, Group
    from plait.parallel.pipeline_comm import StageMessenger
    from plait.trace import TraceRecorder

    messenger = StageMessenger(Group.single("pp", 0), Comm(), 2, (4, 16, 8), torch.float32, torch.device("cpu"),
                               TraceRecorder(0, enabled=False), rows=[4, 3])
    assert messenger.shape_of(0) == (4, 16, 8) and messenger.shape_of(1) == (3, 16, 8)
    messenger.check(torch.zeros(3, 16, 8), "output", 1)
    with pytest.raises(ValueError, match=r"not the fixed message shape \(3, 16, 8\)"):
        messenger.check(torch.zeros(4, 16, 8), "output", 1)


# --- the losses of uneven layouts against the single-process run ---------------------------------
SHORT = [f"train.steps={STEPS}", "checkpoint.every=0"]
G6 = ["train.global_batch=6", "train.micro_batch=2"]  # dp 4: rows 2, 2, 1, 1; one micro-batch each
G8 = ["train.global_batch=8", "train.micro_batch=2"]  # dp 3: rows 3, 3, 2 in micro-batches [2, 1], [2, 1], [1, 1]
G7 = ["train.global_batch=7", "train.micro_batch=2"]  # pp 2 x dp 2: rows 4, 3 in [2, 2], [2, 1]
ZERO3 = ["parallel.zero=3"]
# An MoE tiny whose global-batch load-balancing loss counts experts over the uneven dp shares
# and accumulation micro-batches (large coefficients, so a wrong share would show).
MOE = ["model.n_layers=2", "model.n_experts=4", "model.top_k=2", "model.moe_ffn_dim=96",
       "train.lbl_coef=1.0", "train.z_loss_coef=0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")

    def job(name, *overrides):
        return (name, SHORT + [o for group in overrides for o in group], str(root / name))

    one = run_on_ranks(1, run_many, [job("ref6", G6), job("ref8", G8), job("ref7", G7),
                                     job("ref8_moe", G8, MOE)])[0]
    three = run_on_ranks(3, run_many, [job("dp3_g8", G8), job("dp3_g8_zero3", G8, ZERO3),
                                       job("dp3_g8_moe", G8, MOE)])[0]
    four = run_on_ranks(4, run_many, [job("dp4_g6", G6), job("dp4_g6_zero3", G6, ZERO3),
                                      job("pp2_dp2_g7", G7, ["parallel.pp=2"])])[0]
    return {**one, **three, **four}


@pytest.mark.parametrize("name, reference", [
    ("dp3_g8", "ref8"), ("dp3_g8_zero3", "ref8"), ("dp4_g6", "ref6"), ("dp4_g6_zero3", "ref6"),
    ("pp2_dp2_g7", "ref7"), ("dp3_g8_moe", "ref8_moe"),
])
def test_uneven_layouts_match_the_single_process_run(runs, name, reference):
    ref, got = runs[reference]["losses"], runs[name]["losses"]
    assert len(ref) == len(got) == STEPS
    worst = max(abs(a - b) for a, b in zip(got, ref))
    assert worst <= 1e-5, f"largest loss difference {worst:.3g}: {got} vs {ref}"
    # The validation windows are shared out unevenly too: each is counted once, on any layout.
    assert abs(runs[name]["val_loss"] - runs[reference]["val_loss"]) <= 1e-5
