"""Pipeline schedules without processes: valid order, memory bound, and the published bubbles.

Unit costs (see pipeline_sim): a rank's forward of one micro-batch costs 1, its full backward 2,
split 1 + 1 for zero bubble; a chunk of an interleaved rank costs 1/v of that. Under those
costs the simulated idle fractions must equal the formulas up to float rounding (1e-12).
"""

import pytest

from plait.parallel.pipeline_sim import ScheduleError, peak_in_flight, simulate, validate_order
from plait.parallel.schedules import Op, build_schedule, check_schedule_config

GRID = [(p, m) for p in (2, 4) for m in (p, 2 * p, 4 * p)]
EXACT = 1e-12


def _one_f_one_b_idle(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


@pytest.mark.parametrize("p,m", GRID)
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble_is_exact(name, p, m):
    schedule = build_schedule(name, p, m)
    validate_order(schedule)
    result = simulate(schedule)
    for idle in result.idle_fraction:  # every rank, not just the mean
        assert idle == pytest.approx(_one_f_one_b_idle(p, m), abs=EXACT)
    assert result.mean_idle_fraction == pytest.approx(_one_f_one_b_idle(p, m), abs=EXACT)


@pytest.mark.parametrize("p,m", GRID)
def test_in_flight_gpipe_holds_everything_1f1b_at_most_p_minus_rank(p, m):
    assert simulate(build_schedule("gpipe", p, m)).peak_in_flight == [m] * p
    assert simulate(build_schedule("1f1b", p, m)).peak_in_flight == [min(p - r, m) for r in range(p)]


@pytest.mark.parametrize("p,m", GRID)
@pytest.mark.parametrize("v", [2, 3])
def test_interleaved_bubble_is_exact_and_memory_within_megatron_bound(p, m, v):
    schedule = build_schedule("interleaved", p, m, v)
    validate_order(schedule)
    result = simulate(schedule)
    expected = (p - 1) / (v * m + p - 1)
    for idle in result.idle_fraction:
        assert idle == pytest.approx(expected, abs=EXACT)
    # Megatron: warm-up of 2(p - r - 1) + (v - 1)p chunk forwards, plus one in the steady state;
    # counted in (micro-batch, chunk) activations, each 1/v of a whole stage's.
    bound = [min(m * v, 2 * (p - r - 1) + (v - 1) * p + 1) for r in range(p)]
    assert all(peak <= b for peak, b in zip(result.peak_in_flight, bound))
    # The first rank's activation memory is 1 + (p-1)/(p v) times 1F1B's (Korthikanti et al.).
    if m > p:
        assert result.peak_in_flight[0] / v == pytest.approx(p * (1 + (p - 1) / (p * v)))


@pytest.mark.parametrize("p,m", GRID)
def test_zero_bubble_h1_is_a_third_of_1f1b_at_the_same_peak_memory(p, m):
    zb = build_schedule("zb", p, m)
    validate_order(zb)
    zb_result = simulate(zb)
    base = simulate(build_schedule("1f1b", p, m))
    # ZB-H1's bubble is (p-1)(F + B - W) against 1F1B's (p-1)(F + B + W) with B the input-gradient
    # part (Qi et al. 2023): with F = B = W = 1 that is exactly a third of the idle *time*.
    for zb_idle, idle in zip(zb_result.idle_time, base.idle_time):
        assert zb_idle == pytest.approx(idle / 3, abs=EXACT)
    # Same total work, so the idle *fraction* is (p-1)/(3m+p-1): between a third and a half of
    # 1F1B's, approaching a third as m grows.
    assert zb_result.mean_idle_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=EXACT)
    assert max(zb_result.peak_in_flight) == max(base.peak_in_flight) == p


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb"])
def test_fewer_microbatches_than_stages_still_runs(name):
    schedule = build_schedule(name, 4, 3)
    validate_order(schedule)
    result = simulate(schedule)
    if name == "zb":
        # With m < p there are too few W passes to fill the bubbles: rank 0 cannot start B0
        # before the forward and backward chains (4 + 3 units) and still has 3 B + 3 W to do,
        # so the step is 13 units, not 3m + p - 1 = 12. Still better than 1F1B's 18.
        assert result.makespan == pytest.approx(13, abs=EXACT)
    else:
        assert result.mean_idle_fraction == pytest.approx(_one_f_one_b_idle(4, 3), abs=EXACT)


def test_single_stage_has_no_bubble():
    for name in ("gpipe", "1f1b", "zb"):
        assert simulate(build_schedule(name, 1, 4)).mean_idle_fraction == pytest.approx(0.0, abs=EXACT)


# ---- what validation must catch ------------------------------------------------------------

def test_backward_before_its_forward_is_a_deadlock():
    schedule = build_schedule("1f1b", 2, 4)
    last = schedule[1]
    last[0], last[1] = last[1], last[0]  # B0 before F0 on the last rank
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_order(schedule)


def test_crossed_order_between_ranks_is_a_deadlock():
    # Each rank's order is fine on its own, but rank 0 wants B0 (from rank 1) before sending F1,
    # and rank 1 wants F1 (from rank 0) before doing F0 and B0: a cycle, so both wait forever.
    schedule = [[Op("F", 0, 0), Op("B", 0, 0), Op("F", 1, 0), Op("B", 1, 0)],
                [Op("F", 1, 1), Op("F", 0, 1), Op("B", 0, 1), Op("B", 1, 1)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_order(schedule)
    schedule[1] = [Op("F", 0, 1), Op("B", 0, 1), Op("F", 1, 1), Op("B", 1, 1)]
    validate_order(schedule)  # the same ops in a consistent order run


def test_weight_gradient_before_its_backward_is_a_deadlock():
    schedule = build_schedule("zb", 2, 2)
    rank0 = schedule[0]
    w = rank0.index(Op("W", 0, 0))
    b = rank0.index(Op("B", 0, 0))
    rank0[w], rank0[b] = rank0[b], rank0[w]
    with pytest.raises(ScheduleError, match="deadlock"):
        validate_order(schedule)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s[0].pop(), "missing"),
    (lambda s: s[0].append(s[0][0]), "twice"),
    (lambda s: s[0].append(Op("F", 0, 1)), "op of rank 1"),
])
def test_incomplete_schedules_are_rejected(mutate, message):
    schedule = build_schedule("1f1b", 2, 4)
    mutate(schedule)
    with pytest.raises(ScheduleError, match=message):
        validate_order(schedule)


def test_peak_in_flight_holds_activation_until_weight_gradient():
    ops = [Op("F", 0, 0), Op("B", 0, 0), Op("F", 1, 0), Op("W", 0, 0), Op("B", 1, 0), Op("W", 1, 0)]
    assert peak_in_flight(ops) == 2


# ---- config errors, before any process starts ------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    ((4, 6, 2, 16, "interleaved"), "parallel.pp_microbatches (6) to be a multiple of parallel.pp (4)"),
    ((4, 8, 1, 16, "interleaved"), "parallel.pp_virtual_stages >= 2"),
    ((1, 8, 2, 16, "interleaved"), "parallel.pp >= 2"),
    ((4, 8, 2, 7, "interleaved"), "model.n_layers=7 is fewer than the 8 pipeline stages"),
    ((4, 8, 1, 3, "1f1b"), "model.n_layers=3"),
    ((2, 4, 2, 16, "1f1b"), "parallel.pp_virtual_stages=2 needs parallel.pp_schedule='interleaved'"),
    ((2, 4, 1, 16, "pipedream"), "parallel.pp_schedule='pipedream' is not one of"),
    ((2, 0, 1, 16, "gpipe"), "parallel.pp_microbatches=0"),
])
def test_config_errors_name_the_field(args, fragment):
    reason = check_schedule_config(*args)
    assert reason is not None and fragment in reason and "\n" not in reason
    if "model.n_layers" not in reason:  # the schedule itself does not know the layer count
        with pytest.raises(ValueError, match="parallel"):
            build_schedule(args[4], args[0], args[1], args[2])


@pytest.mark.parametrize("args", [(4, 8, 2, 8, "interleaved"), (4, 2, 1, 4, "zb"), (2, 4, 1, 2, "gpipe")])
def test_runnable_configs_pass(args):
    assert check_schedule_config(*args) is None
