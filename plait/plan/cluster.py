"""Clusters: devices, nodes, links. Presets for common machines and a TOML format for others.

Every preset is nodes of 8 devices with one network card per device, built from the
datasheet figures of plait/hardware.py; achieved fractions of them (matmul ceiling, HBM and
network efficiency) live in `compute.Efficiency` and `comm_model.NetworkEfficiency`, which `plait plan --calibrate` fits.

A cluster may list `[[node_groups]]` with different network cards (heterogeneous NICs);
`comm_model.place_stages` then decides which pipeline stages go to which group.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from plait.errors import ConfigError
from plait.hardware import ACCELERATORS, Accelerator

GB = 1e9


@dataclass(frozen=True)
class NodeGroup:
    nodes: int
    inter_node_bw: float  # bytes/s per device (its own NIC), one direction


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_node: int
    device_memory: float  # bytes
    peak_flops: float  # dense bf16 FLOP/s per device; 0: unknown (no MFU)
    hbm_bw: float  # bytes/s per device
    intra_node_bw: float  # bytes/s per device, one direction (NVLink / Infinity Fabric)
    inter_node_bw: float  # bytes/s per device (one NIC per device), one direction
    intra_node_latency: float = 5e-6  # seconds per step of a collective algorithm
    inter_node_latency: float = 10e-6
    # Memory the framework, CUDA context and allocator fragmentation take (not usable by the model).
    reserved_memory: float = 2 * GB
    node_groups: tuple[NodeGroup, ...] = field(default=())
    # The accelerator preset this cluster is built from ("" for a cluster file without one):
    # it selects the measured efficiencies of compute.DEVICE_EFFICIENCY.
    accelerator: str = ""
    # Overrides of compute.Efficiency fields, e.g. from `plait plan --calibrate` ((name, value), ...).
    efficiency: tuple[tuple[str, float], ...] = ()

    def group_bandwidths(self) -> list[tuple[int, float]]:
        """(nodes, NIC bytes/s) from fastest to slowest; one entry for a homogeneous cluster."""
        if not self.node_groups:
            return [(0, self.inter_node_bw)]
        return sorted(((g.nodes, g.inter_node_bw) for g in self.node_groups), key=lambda x: -x[1])


def _preset(name: str, accelerator: Accelerator) -> Cluster:
    return Cluster(name=name, gpus_per_node=8, device_memory=accelerator.memory_gb * GB,
                   peak_flops=accelerator.peak_flops, hbm_bw=accelerator.hbm_tbs * 1e12,
                   intra_node_bw=accelerator.intra_node_gbs * GB, inter_node_bw=accelerator.nic_gbit / 8 * GB,
                   accelerator=name)


# Built from plait's one hardware table: every accelerator with a standard 8-device node.
PRESETS: dict[str, Cluster] = {
    name: _preset(name, accelerator) for name, accelerator in ACCELERATORS.items()
    if accelerator.intra_node_gbs and accelerator.nic_gbit
}

_FIELDS = {
    "gpus_per_node": int, "device_memory_gb": float, "peak_tflops": float, "hbm_tbs": float,
    "intra_node_gbs": float, "inter_node_gbit": float, "intra_node_latency_us": float,
    "inter_node_latency_us": float, "reserved_memory_gb": float,
}
# compute.Efficiency's fields a cluster file may set (kept here: compute imports this module)
EFFICIENCY_KEYS = ("gemm_ceiling", "gemm_half_dim", "hbm_efficiency", "kernel_launch_s",
                   "attention_efficiency", "attention_half_seq")
_REQUIRED = ("gpus_per_node", "device_memory_gb", "peak_tflops", "intra_node_gbs", "inter_node_gbit")


def load_cluster(source: str) -> Cluster:
    """A preset name or a TOML file (see docs/plan.md for the keys)."""
    if source in PRESETS:
        return PRESETS[source]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--cluster '{source}' is neither a TOML file nor a preset ({', '.join(PRESETS)})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cluster file '{source}' is not valid TOML: {exc}") from None
    return cluster_from_dict(raw, name=path.stem)


def cluster_from_dict(raw: dict, name: str = "custom") -> Cluster:
    raw = dict(raw)
    groups_raw = raw.pop("node_groups", [])
    raw.pop("name", None)
    # `accelerator` names a preset whose measured efficiencies apply; [efficiency] overrides them
    # (what `plait plan --calibrate points.json` prints).
    accelerator = raw.pop("accelerator", "")
    if accelerator and accelerator not in ACCELERATORS:
        raise ConfigError(f"cluster accelerator={accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    efficiency_raw = raw.pop("efficiency", {})
    if not isinstance(efficiency_raw, dict):
        raise ConfigError("cluster efficiency must be a table ([efficiency])")
    efficiency = []
    for key, value in efficiency_raw.items():
        if key not in EFFICIENCY_KEYS:
            raise ConfigError(f"unknown cluster efficiency.{key} (known: {', '.join(EFFICIENCY_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"cluster efficiency.{key}={value!r} must be a positive number")
        efficiency.append((key, float(value)))
    values: dict[str, float] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown cluster key '{key}' (known: {', '.join(_FIELDS)}, node_groups)")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"cluster {key}={value!r} must be a positive number")
        values[key] = value
    for key in _REQUIRED:
        if key not in values and not (key == "inter_node_gbit" and groups_raw):
            raise ConfigError(f"cluster file is missing '{key}'")
    groups = []
    for i, group in enumerate(groups_raw):
        if set(group) != {"nodes", "inter_node_gbit"}:
            raise ConfigError(f"node_groups[{i}] must have exactly 'nodes' and 'inter_node_gbit'")
        if group["nodes"] < 1 or group["inter_node_gbit"] <= 0:
            raise ConfigError(f"node_groups[{i}] needs nodes >= 1 and inter_node_gbit > 0")
        groups.append(NodeGroup(int(group["nodes"]), group["inter_node_gbit"] / 8 * GB))
    nic = values.get("inter_node_gbit", 0) / 8 * GB or max(g.inter_node_bw for g in groups)
    cluster = Cluster(
        name=name, gpus_per_node=int(values["gpus_per_node"]),
        device_memory=values["device_memory_gb"] * GB, peak_flops=values["peak_tflops"] * 1e12,
        # Without a figure, assume HBM3-class bandwidth: it only sets the cost of element-wise ops.
        hbm_bw=values.get("hbm_tbs", 3.35) * 1e12,
        intra_node_bw=values["intra_node_gbs"] * GB, inter_node_bw=nic,
        intra_node_latency=values.get("intra_node_latency_us", 5.0) * 1e-6,
        inter_node_latency=values.get("inter_node_latency_us", 10.0) * 1e-6,
        reserved_memory=values.get("reserved_memory_gb", 2.0) * GB, node_groups=tuple(groups),
        accelerator=accelerator, efficiency=tuple(efficiency),
    )
    return cluster


def check_capacity(cluster: Cluster, n_gpus: int) -> None:
    """Raise ConfigError when heterogeneous node groups hold fewer than n_gpus devices."""
    if cluster.node_groups:
        available = sum(g.nodes for g in cluster.node_groups) * cluster.gpus_per_node
        if available < n_gpus:
            raise ConfigError(f"--gpus {n_gpus} exceeds the {available} devices in the cluster's node_groups")
