"""Layer partitioning across pipeline stages: balanced by cost, or given by parallel.pp_layers."""

import pytest

from plait.parallel.partition import balanced_counts, head_cost_in_layers, partition_layers, rank_chunks


def _stage_costs(stages, embed_cost, head_cost):
    costs = [float(len(s)) for s in stages]
    costs[0] += embed_cost
    costs[-1] += head_cost
    return costs


def test_stages_are_contiguous_and_cover_every_layer_once():
    stages = partition_layers(10, 4)
    assert [layer for s in stages for layer in s] == list(range(10))
    assert all(len(s) >= 1 for s in stages)


def test_head_stage_gets_fewer_layers():
    assert balanced_counts(8, 4, embed_cost=0.0, head_cost=2.0) == [2, 2, 3, 1]
    assert balanced_counts(8, 4, embed_cost=0.0, head_cost=0.0) == [2, 2, 2, 2]


@pytest.mark.parametrize("n_layers,stages,embed,head", [(16, 4, 0.0, 1.0), (13, 4, 0.5, 2.5), (20, 6, 0.0, 2.1),
                                                        (5, 5, 0.0, 3.0), (24, 6, 1.0, 0.2)])
def test_balanced_split_minimises_the_costliest_stage(n_layers, stages, embed, head):
    """Brute force over every split for small cases: the greedy must match the optimum."""
    counts = balanced_counts(n_layers, stages, embed, head)
    best = _best_max_cost(n_layers, stages, embed, head)
    got = max(_stage_costs([[0] * c for c in counts], embed, head))
    assert got == pytest.approx(best)


def _best_max_cost(n_layers, stages, embed, head):
    def splits(n, k):
        if k == 1:
            yield [n]
            return
        for first in range(1, n - k + 2):
            for rest in splits(n - first, k - 1):
                yield [first] + rest
    return min(max(_stage_costs([[0] * c for c in split], embed, head)) for split in splits(n_layers, stages))


def test_interleaved_chunks_of_a_rank():
    stages = partition_layers(8, 2, v=2, head_cost=0.0)
    assert stages == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_chunks(stages, 2, 0) == [[0, 1], [4, 5]]  # virtual stages 0 and 2
    assert rank_chunks(stages, 2, 1) == [[2, 3], [6, 7]]


def test_explicit_split_is_used_as_given():
    assert partition_layers(6, 3, explicit=[1, 3, 2]) == [[0], [1, 2, 3], [4, 5]]


@pytest.mark.parametrize("explicit,fragment", [
    ([2, 2, 1], "sums to 5, not model.n_layers=6"),
    ([3, 3, 0], "at least one layer"),
    ([3, 3], "has 2 entries but there are 3 pipeline stages"),
])
def test_bad_explicit_split_is_one_line_naming_pp_layers(explicit, fragment):
    with pytest.raises(ValueError) as error:
        partition_layers(6, 3, explicit=explicit)
    message = str(error.value)
    assert "parallel.pp_layers" in message and fragment in message and "\n" not in message


def test_too_few_layers():
    with pytest.raises(ValueError, match="model.n_layers=3"):
        partition_layers(3, 2, v=2)


def test_head_cost_estimate_grows_with_vocabulary():
    tiny = head_cost_in_layers(dim=128, ffn_dim=384, vocab_size=256, seq_len=128, n_heads=4, n_kv_heads=2)
    llama_8b = head_cost_in_layers(dim=4096, ffn_dim=14336, vocab_size=128256, seq_len=8192, n_heads=32, n_kv_heads=8)
    assert 0.1 < tiny < 0.2
    assert 1.5 < llama_8b < 2.5
