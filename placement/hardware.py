"""Which catalog entry describes the devices this process sees, and how much memory a replica may spend on replicas."""

from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from cost import Hardware, HardwareError, load_catalog

def catalog_entry(device_name: str, catalog: Mapping[str, Hardware]) -> str:
    """The catalog entry a GPU reporting ``device_name`` (``torch.cuda.get_device_name()``) is: the entry with the
    longest of its ``detection_names`` found in the name as a whole word (not inside a longer one, so "L4" is not an
    "NVIDIA L40S"), case-insensitively; e.g. "NVIDIA H100 PCIe" -> H100-PCIe, "NVIDIA H100 80GB HBM3" -> H100-SXM.
    HardwareError when no entry names the device, or two name it equally specifically."""
    matches: dict[str, list[str]] = {}
    for entry in catalog.values():
        for needle in entry.detection_names:
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(needle)}(?![A-Za-z0-9])", device_name, re.IGNORECASE):
                matches.setdefault(needle.lower(), []).append(entry.name)
    if not matches:
        raise HardwareError(
            f"GPU {device_name!r} is not in the hardware catalog: add an entry naming it (\"detection_names\": "
            f"[a substring of {device_name!r}], \"accelerator_type\": Ray's name of it, and its figures, as in "
            f"cost/hardware.json) to a JSON file named by DYNPART_HARDWARE, or set the pool's `hardware`")
    longest = max(matches, key=len)
    entries = list(dict.fromkeys(matches[longest]))
    if len(entries) > 1:
        raise HardwareError(f"GPU {device_name!r} matches catalog entries {entries} equally ({longest!r}): give one "
                            f"a more specific detection name, or replace the other (same entry name) in its file")
    return entries[0]


def detect_hardware() -> str:
    """The catalog name of local device 0: the entry whose detection names match the GPU's (``catalog_entry``, over
    the catalog with ``DYNPART_HARDWARE``'s entries), else ``cpu`` without a GPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return catalog_entry(torch.cuda.get_device_name(0), load_catalog())


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
