"""Alpha-beta costs of collectives on a two-level topology (NVLink inside a node, NICs across).

A group of n ranks with `stride` consecutive ranks between members puts k = min(n, gpus_per_node
/ stride) members in each node and spans N = n / k nodes. Collectives run hierarchically: the
intra-node part over NVLink, the inter-node part over the k members' own NICs in parallel, so
each NIC carries 1/k of the data. Volumes per rank (nccl-tests): all-reduce 2(n-1)/n x bytes,
reduce-scatter and all-gather (n-1)/n, all-to-all (n-1)/n. Latency: a ring pays alpha per step
(2(n-1) for an all-reduce), a tree 2 log2(nodes) across nodes; NCCL picks the faster, and so do we.

`place_stages` handles heterogeneous NICs: the stages that move the most bytes over the network
get the fastest nodes, the slowest nodes host the stages with the least traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plait.plan.cluster import Cluster


@dataclass(frozen=True)
class NetworkEfficiency:
    # Achieved bus bandwidth / link bandwidth for large messages (about 0.8 for NCCL rings on
    # A100 NVLink 3 and on InfiniBand NICs; fitted by --calibrate).
    intra_node: float = 0.80
    inter_node: float = 0.80
    # Fraction of the last micro-batch's backward that bucketed data-parallel gradient traffic
    # hides behind (buckets start as soon as their gradients are final; the first bucket waits).
    dp_overlap: float = 0.8


@dataclass(frozen=True)
class Span:
    size: int  # ranks in the group
    per_node: int  # members inside one node
    nodes: int


def group_span(size: int, stride: int, gpus_per_node: int) -> Span:
    if size <= 1:
        return Span(1, 1, 1)
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    return Span(size, per_node, math.ceil(size / per_node))


def _level_times(volume_factor_intra: float, volume_factor_inter: float, nbytes: float, span: Span,
                 cluster: Cluster, net: NetworkEfficiency, nic_bw: float) -> tuple[float, float]:
    intra = volume_factor_intra * nbytes / (cluster.intra_node_bw * net.intra_node) if span.per_node > 1 else 0.0
    inter = volume_factor_inter * nbytes / span.per_node / (nic_bw * net.inter_node) if span.nodes > 1 else 0.0
    return intra, inter


def all_reduce_time(nbytes: float, span: Span, cluster: Cluster, net: NetworkEfficiency,
                    nic_bw: float | None = None) -> float:
    if span.size <= 1 or nbytes <= 0:
        return 0.0
    k, nodes = span.per_node, span.nodes
    intra, inter = _level_times(2 * (k - 1) / k, 2 * (nodes - 1) / nodes, nbytes, span, cluster, net,
                                nic_bw or cluster.inter_node_bw)
    ring_latency = 2 * (k - 1) * cluster.intra_node_latency + 2 * (nodes - 1) * cluster.inter_node_latency
    # NCCL's tree: a chain inside each node, a double binary tree across nodes. It moves about
    # 2 x bytes per NIC whatever the node count, but its latency grows with log2(nodes), not nodes.
    tree_latency = 2 * (k - 1) * cluster.intra_node_latency + 2 * math.log2(nodes) * cluster.inter_node_latency
    tree_inter = 2 * nbytes / k / ((nic_bw or cluster.inter_node_bw) * net.inter_node) if nodes > 1 else 0.0
    return min(intra + inter + ring_latency, intra + tree_inter + tree_latency)


def all_gather_time(nbytes: float, span: Span, cluster: Cluster, net: NetworkEfficiency,
                    nic_bw: float | None = None) -> float:
    """Also the cost of a reduce-scatter; `nbytes` is the full (gathered) size."""
    if span.size <= 1 or nbytes <= 0:
        return 0.0
    k, nodes = span.per_node, span.nodes
    intra, inter = _level_times((k - 1) / k, (nodes - 1) / nodes, nbytes, span, cluster, net,
                                nic_bw or cluster.inter_node_bw)
    return intra + inter + (k - 1) * cluster.intra_node_latency + (nodes - 1) * cluster.inter_node_latency


def all_to_all_time(nbytes: float, span: Span, cluster: Cluster, net: NetworkEfficiency) -> float:
    """Each rank sends (n-1)/n of `nbytes`; the share bound for other nodes goes over its NIC."""
    if span.size <= 1 or nbytes <= 0:
        return 0.0
    n, k = span.size, span.per_node
    intra = nbytes * (k - 1) / n / (cluster.intra_node_bw * net.intra_node)
    inter = nbytes * (n - k) / n / (cluster.inter_node_bw * net.inter_node)
    latency = (k - 1) * cluster.intra_node_latency + (span.nodes - 1) * cluster.inter_node_latency
    return max(intra, inter) + latency


def p2p_time(nbytes: float, crosses_nodes: bool, cluster: Cluster, net: NetworkEfficiency,
             nic_bw: float | None = None) -> float:
    if nbytes <= 0:
        return 0.0
    if crosses_nodes:
        return cluster.inter_node_latency + nbytes / ((nic_bw or cluster.inter_node_bw) * net.inter_node)
    return cluster.intra_node_latency + nbytes / (cluster.intra_node_bw * net.intra_node)


def ring_all_reduce_bytes_sent(nbytes: float, n: int) -> float:
    """Bytes each rank sends in a ring all-reduce (what plait's trainer reports as comm_bytes)."""
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def place_stages(stage_traffic: list[float], devices_per_stage: int, cluster: Cluster) -> list[float]:
    """NIC bandwidth each pipeline stage gets when the busiest stages take the fastest nodes.

    Devices are handed out fastest node group first; stages are served in decreasing order of
    the bytes they send over the network; a stage spread over two groups runs at the slower one.
    """
    groups = cluster.group_bandwidths()
    if len(groups) == 1:
        return [groups[0][1]] * len(stage_traffic)
    device_bw = [bw for nodes, bw in groups for _ in range(nodes * cluster.gpus_per_node)]
    order = sorted(range(len(stage_traffic)), key=lambda i: -stage_traffic[i])
    result = [0.0] * len(stage_traffic)
    for slot, stage in enumerate(order):
        start = slot * devices_per_stage
        result[stage] = min(device_bw[start:start + devices_per_stage])
    return result


def naive_placement(n_stages: int, devices_per_stage: int, cluster: Cluster) -> list[float]:
    """Stage i on the i-th block of devices in the order the groups were written (for comparison)."""
    groups = [(g.nodes, g.inter_node_bw) for g in cluster.node_groups] or [(0, cluster.inter_node_bw)]
    if len(groups) == 1:
        return [groups[0][1]] * n_stages
    device_bw = [bw for nodes, bw in groups for _ in range(nodes * cluster.gpus_per_node)]
    return [min(device_bw[i * devices_per_stage:(i + 1) * devices_per_stage]) for i in range(n_stages)]
