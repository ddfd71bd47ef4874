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


def fast_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype ``dtype: auto`` runs on ``device``: bfloat16 where the device multiplies it natively (a GPU that
    supports it; a CPU with AMX tiles or AVX512-BF16, through oneDNN), float32 elsewhere. A CPU without those units
    emulates bfloat16 GEMMs and runs them slower than float32 (about 3x on an AVX2-only EPYC, BENCHMARKS.md), so
    bfloat16 there would cost speed and exactness for nothing. Call it where the weights live (the worker)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return torch.bfloat16 if native and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def replica_budget_bytes(devices: int, device: torch.device | str = "cpu", kv_reserve_bytes: int = 0,
                         fraction: float = 0.25) -> int:
    """Memory this device may fill with ``projection_replicated``'s replicas, measured where the weights live (call
    it in the worker, after its shards are loaded): a fraction of what is free on its GPU, or of the host's available
    memory shared by the p emulated devices on it, and never what the KV cache has been promised
    (``kv_reserve_bytes``, e.g. ``kv_cache_memory_gb``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // devices
    return max(0, min(int(free * fraction), free - kv_reserve_bytes))
