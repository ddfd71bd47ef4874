"""Which catalog entry describes the devices this process sees, and how much memory a replica may spend on replicas."""

from __future__ import annotations

import os

import torch

# Substrings of torch.cuda.get_device_name() -> hardware catalog names (strategies/cost/hardware.json).
_GPU_NAMES = [("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100-SXM"), ("A100-SXM4-80GB", "A100-80GB-SXM"),
              ("A100 80GB PCIe", "A100-80GB-PCIe"), ("A100-PCIE-40GB", "A100-40GB-PCIe"), ("A100", "A100-40GB-SXM"),
              ("L4", "L4"), ("A10G", "A10G")]


def detect_hardware() -> str:
    """The catalog name of local device 0: a known GPU, else ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    for needle, entry in _GPU_NAMES:
        if needle in name:
            return entry
    raise ValueError(f"GPU {name!r} is not in the hardware catalog: add it to a file named by DYNPART_HARDWARE")


def replica_budget_bytes(devices: int, fraction: float = 0.25) -> int:
    """Default memory per device that ``projection_replicated`` may fill with replicas: a fraction of the device's
    free memory (GPU), or of the machine's physical memory shared by the p emulated devices (CPU)."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free * fraction)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * fraction / devices)
