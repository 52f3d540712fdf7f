"""Collective cost laws (nccl-tests PERFORMANCE.md volumes) and placement on heterogeneous NICs."""

import pytest

from plait.errors import ConfigError
from plait.plan import comm_model as comm
from plait.plan.cluster import GB, PRESETS, cluster_from_dict, load_cluster
from plait.plan.estimate import evaluate
from plait.plan.layouts import Layout
from plait.plan.models import PRESETS as MODELS

H100 = PRESETS["h100-sxm"]
NET = comm.NetworkEfficiency(intra_node=1.0, inter_node=1.0)


def test_group_span_follows_rank_order():
    assert comm.group_span(8, 1, 8) == comm.Span(8, 8, 1)  # tp inside a node
    assert comm.group_span(4, 8, 8) == comm.Span(4, 1, 4)  # dp across nodes when tp fills them
    assert comm.group_span(4, 2, 8) == comm.Span(4, 4, 1)
    assert comm.group_span(16, 2, 8) == comm.Span(16, 4, 4)


def test_intra_node_all_reduce_is_two_n_minus_one_over_n():
    nbytes = 1e9
    t = comm.all_reduce_time(nbytes, comm.group_span(8, 1, 8), H100, NET)
    expected = 2 * 7 / 8 * nbytes / H100.intra_node_bw + 14 * H100.intra_node_latency
    assert t == pytest.approx(expected)
    gather = comm.all_gather_time(nbytes, comm.group_span(8, 1, 8), H100, NET)
    assert gather == pytest.approx(7 / 8 * nbytes / H100.intra_node_bw + 7 * H100.intra_node_latency)


def test_inter_node_all_reduce_uses_every_members_nic():
    nbytes = 8e9
    one_per_node = comm.all_reduce_time(nbytes, comm.group_span(4, 8, 8), H100, NET)
    assert one_per_node == pytest.approx(2 * 3 / 4 * nbytes / H100.inter_node_bw, rel=1e-3)
    # eight members per node: the inter-node part moves 1/8 of the bytes per NIC
    eight_per_node = comm.all_reduce_time(nbytes, comm.group_span(32, 1, 8), H100, NET)
    expected = 2 * 7 / 8 * nbytes / H100.intra_node_bw + 2 * 3 / 4 * nbytes / 8 / H100.inter_node_bw
    assert eight_per_node == pytest.approx(expected, rel=1e-2)  # plus a few latency steps


def test_tree_wins_for_small_messages_on_many_nodes():
    span = comm.group_span(4096, 8, 8)
    ring_latency = 2 * 4095 * H100.inter_node_latency
    assert comm.all_reduce_time(1e3, span, H100, NET) < ring_latency / 10


def test_ring_bytes_sent_matches_trainer_definition():
    assert comm.ring_all_reduce_bytes_sent(1000.0, 1) == 0.0
    assert comm.ring_all_reduce_bytes_sent(1000.0, 2) == 1000.0
    assert comm.ring_all_reduce_bytes_sent(1000.0, 4) == 1500.0


HETERO = {
    "gpus_per_node": 8, "device_memory_gb": 80, "peak_tflops": 989.5, "intra_node_gbs": 450,
    "node_groups": [{"nodes": 4, "inter_node_gbit": 400}, {"nodes": 4, "inter_node_gbit": 100}],
}


def test_busiest_stages_get_the_fastest_nics():
    cluster = cluster_from_dict(HETERO)
    fast, slow = 400 / 8 * GB, 100 / 8 * GB
    # first and last stage carry the embedding and head gradients
    traffic = [3.0, 1.0, 1.0, 2.0]
    assert comm.place_stages(traffic, 16, cluster) == [fast, slow, slow, fast]
    assert comm.naive_placement(4, 16, cluster) == [fast, fast, slow, slow]


def test_heterogeneous_cluster_is_between_its_fast_and_slow_halves():
    model = MODELS["llama3-8b"]
    layout = Layout(tp=8, pp=4, dp=2, micro_batch=1, zero=1)
    hetero = cluster_from_dict(HETERO)
    fast = cluster_from_dict({**HETERO, "node_groups": [{"nodes": 8, "inter_node_gbit": 400}]})
    slow = cluster_from_dict({**HETERO, "node_groups": [{"nodes": 8, "inter_node_gbit": 100}]})
    times = [evaluate(model, c, layout, 64).time_s["dp"] for c in (fast, hetero, slow)]
    assert times[0] < times[1] < times[2]


def test_cluster_toml_errors_name_the_field(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("gpus_per_node = 8\ndevice_memory_gb = -1\n")
    with pytest.raises(ConfigError, match="device_memory_gb"):
        load_cluster(str(bad))
    bad.write_text("gpus_per_node = 8\n")
    with pytest.raises(ConfigError, match="missing"):
        load_cluster(str(bad))
    with pytest.raises(ConfigError, match="neither"):
        load_cluster("no-such-cluster")


def test_cluster_presets_state_their_nics():
    for name in ("a100-40gb", "a100-80gb", "h100-sxm", "h200", "b200", "mi250x"):
        cluster = load_cluster(name)
        assert cluster.gpus_per_node == 8
        assert 200 / 8 * GB <= cluster.inter_node_bw <= 400 / 8 * GB
