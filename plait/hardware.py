"""Accelerators plait knows: datasheet peak FLOP/s, memory and bandwidths, in one table.

The training loop reads the peak to report MFU (`plait/train/flops.py`); the planner builds
its cluster presets from the same rows (`plait/plan/cluster.py`), so the two can never
disagree. Peaks are dense bf16 datasheet figures; achieved fractions of them belong to the
planner's calibration, not here. A device that is not in the table has no MFU: it is
reported as null, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    peak_flops: float  # dense bf16 FLOP/s
    memory_gb: float
    hbm_tbs: float
    # Per device and direction inside a node (NVLink / Infinity Fabric), and its usual NIC;
    # 0: no standard node of this device (no planner preset).
    intra_node_gbs: float = 0.0
    nic_gbit: float = 0.0


ACCELERATORS: dict[str, Accelerator] = {
    "a100-40gb": Accelerator(312e12, 40, 1.555, 300, 200),  # NVLink 3, HDR InfiniBand
    "a100-80gb": Accelerator(312e12, 80, 2.039, 300, 200),  # DGX A100 / Selene
    "h100-pcie": Accelerator(756e12, 80, 2.0),
    "h100-nvl": Accelerator(835e12, 94, 3.9),
    "h100-sxm": Accelerator(989.5e12, 80, 3.35, 450, 400),  # NVLink 4, NDR
    "h200": Accelerator(989.5e12, 141, 4.8, 450, 400),
    "b200": Accelerator(2250e12, 180, 8.0, 900, 400),  # NVLink 5, ConnectX-7
    # One MI250X package (two GCDs) is one device; Infinity Fabric between packages, Slingshot 200G.
    "mi250x": Accelerator(383e12, 128, 3.2, 200, 200),
    "mi300x": Accelerator(1307.4e12, 192, 5.3),
}

# Matched in order against the name the driver reports (torch.cuda.get_device_name());
# the first substring that appears wins, so the specific variants come first.
DEVICE_NAMES: list[tuple[str, str]] = [
    ("H100 PCIe", "h100-pcie"),
    ("H100 NVL", "h100-nvl"),
    ("H100", "h100-sxm"),  # e.g. "NVIDIA H100 80GB HBM3"
    ("H200", "h200"),  # also matches GH200, whose GPU has the same peak
    ("A100-SXM4-40GB", "a100-40gb"),
    ("A100-PCIE-40GB", "a100-40gb"),
    ("A100", "a100-80gb"),
    ("B200", "b200"),
    ("MI250X", "mi250x"),
    ("MI300X", "mi300x"),
]


def accelerator_named(device_name: str) -> Accelerator | None:
    """The table's row for a device as its driver names it, or None when plait does not know it."""
    for fragment, key in DEVICE_NAMES:
        if fragment in device_name:
            return ACCELERATORS[key]
    return None
