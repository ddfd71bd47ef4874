"""A device's identity lives in one place, its hardware catalog entry: the names torch reports for it (what detection
matches) and Ray's accelerator type (what a GPU pool's bundles ask for). Detection and pool validation, without a GPU
and without Ray."""

from __future__ import annotations

import json

import pytest
import ray.util.accelerators.accelerators as ray_accelerators  # every constant (the package re-exports a subset)
from pydantic import ValidationError

from app.serve.config import AppConfig, PoolConfig
from placement.hardware import catalog_entry, detect_hardware
from cost import HardwareError, get_hardware, load_catalog
from cost.hardware import CATALOG_FILE, CalibrationProfile, GemmSample

RAY_TYPES = {v for k, v in vars(ray_accelerators).items() if k.isupper() and isinstance(v, str)}
BUILT_IN = json.loads(CATALOG_FILE.read_text())["devices"]
GPUS = [name for name in BUILT_IN if name != "cpu"]

# What torch.cuda.get_device_name() reports for each catalog GPU (NVIDIA's product names, as nvidia-smi prints them).
DEVICE_NAMES = {
    "NVIDIA L4": "L4",
    "NVIDIA A10G": "A10G",
    "NVIDIA A100-SXM4-40GB": "A100-40GB-SXM",
    "NVIDIA A100-SXM4-80GB": "A100-80GB-SXM",
    "NVIDIA A100-PCIE-40GB": "A100-40GB-PCIe",
    "NVIDIA A100 80GB PCIe": "A100-80GB-PCIe",
    "NVIDIA H100 80GB HBM3": "H100-SXM",
    "NVIDIA H100 PCIe": "H100-PCIe",
    "NVIDIA H200": "H200",
}


@pytest.fixture(autouse=True)
def built_in_catalog(monkeypatch):
    monkeypatch.delenv("DYNPART_HARDWARE", raising=False)


@pytest.mark.parametrize("name", GPUS)
def test_gpu_entries_name_their_device(name):
    hw = load_catalog()[name]
    assert hw.detection_names, f"{name} has no detection_names"
    assert hw.accelerator_type in RAY_TYPES, f"{name}: {hw.accelerator_type!r} is not one of ray.util.accelerators"
    names = [n.lower() for n in hw.detection_names]  # most specific first: none is inside a later one
    assert not any(a in b for i, a in enumerate(names) for b in names[i + 1:]), hw.detection_names


def test_cpu_entry_has_no_device_identity():
    cpu = load_catalog()["cpu"]
    assert cpu.detection_names == () and cpu.accelerator_type is None


def test_every_catalog_gpu_is_detected_and_named_once():
    catalog = load_catalog()
    assert set(DEVICE_NAMES.values()) == set(GPUS)
    for device_name, entry in DEVICE_NAMES.items():
        assert catalog_entry(device_name, catalog) == entry, device_name
    needles = [n.lower() for hw in catalog.values() for n in hw.detection_names]
    assert len(needles) == len(set(needles)), "two entries share a detection name"


@pytest.mark.parametrize("device_name,entry", [
    ("NVIDIA H100 NVL", "H100-SXM"), ("nvidia h100 pcie", "H100-PCIe"),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "A100-40GB-SXM"),
])
def test_detection_variants(device_name, entry):
    assert catalog_entry(device_name, load_catalog()) == entry


@pytest.mark.parametrize("device_name", ["NVIDIA L40S", "NVIDIA GH200 480GB", "NVIDIA GeForce RTX 4090", ""])
def test_unknown_gpu_names_the_catalog_mechanism(device_name):
    # A name containing a known one inside a longer word ("L4" in "L40S") is not that device.
    with pytest.raises(HardwareError, match="not in the hardware catalog") as err:
        catalog_entry(device_name, load_catalog())
    assert "DYNPART_HARDWARE" in str(err.value) and "detection_names" in str(err.value)


def _extra_catalog(tmp_path, devices: dict) -> str:
    path = tmp_path / "extra.json"
    path.write_text(json.dumps({"devices": devices}))
    return str(path)


L40S = {"detection_names": ["L40S"], "accelerator_type": "L40S", "peak_tflops": 362, "memory_bandwidth_gbs": 864,
        "memory_gb": 48, "link": {"kind": "pcie-gen4", "bandwidth_gbs": 25, "latency_us": 20}}


def test_a_new_device_is_one_catalog_entry(tmp_path, monkeypatch):
    """The mechanism the error names works: an entry in a DYNPART_HARDWARE file is detected, priced, and defaults a
    pool's accelerator type."""
    monkeypatch.setenv("DYNPART_HARDWARE", _extra_catalog(tmp_path, {"L40S": L40S}))
    assert catalog_entry("NVIDIA L40S", load_catalog()) == "L40S"
    assert catalog_entry("NVIDIA L4", load_catalog()) == "L4"
    assert get_hardware("L40S").peak_tflops == 362
    assert PoolConfig(name="p", gpu=True, hardware="L40S").accelerator_type == "L40S"


def test_equally_specific_entries_are_ambiguous(tmp_path):
    extra = _extra_catalog(tmp_path, {"L4-custom": {**L40S, "detection_names": ["L4"]}})
    with pytest.raises(HardwareError, match="equally"):
        catalog_entry("NVIDIA L4", load_catalog([extra]))


def test_detect_hardware_reads_the_catalog(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100 80GB PCIe")
    assert detect_hardware() == "A100-80GB-PCIe"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_hardware() == "cpu"


def test_calibrated_entry_keeps_its_identity(tmp_path, monkeypatch):
    """A calibration profile replaces measured figures, never the device's names."""
    monkeypatch.setenv("DYNPART_PROFILE_DIR", str(tmp_path))
    profile = CalibrationProfile(hardware="L4", devices=1, gemm=(GemmSample(rows=16, tflops=50.0),))
    hw = get_hardware("L4", use_profile=False).calibrated(profile)
    assert hw.calibrated_from and hw.detection_names == ("L4",) and hw.accelerator_type == "L4"


# Pools: the accelerator type follows the hardware entry.

@pytest.mark.parametrize("hardware,ray_type", [("L4", "L4"), ("A100-80GB-SXM", "A100"), ("H100-PCIe", "H100"),
                                               ("H200", "H200")])
def test_gpu_pool_accelerator_type_defaults_from_hardware(hardware, ray_type):
    pool = PoolConfig(name="p", gpu=True, hardware=hardware)
    assert pool.accelerator_type == ray_type
    assert pool.bundle()[f"accelerator_type:{ray_type}"] == 0.001
    assert PoolConfig(name="p", gpu=True, hardware=hardware, accelerator_type=ray_type).accelerator_type == ray_type


def test_cpu_pool_asks_for_no_accelerator():
    pool = PoolConfig(name="p", hardware="L4")  # a what-if: priced as an L4, run on CPU processes
    assert pool.accelerator_type is None
    assert not any(k.startswith("accelerator_type:") for k in pool.bundle())
    assert PoolConfig(name="p", gpu=True, hardware="cpu").accelerator_type is None  # an entry without a type


def test_mismatched_accelerator_type_is_a_config_error():
    with pytest.raises(ValidationError) as err:
        AppConfig(pools=[{"name": "a100", "gpu": True, "hardware": "A100-80GB-SXM", "accelerator_type": "L4"}])
    text = str(err.value)
    assert "'L4'" in text and "'A100-80GB-SXM'" in text and "'A100'" in text


def test_entry_without_accelerator_type_accepts_any(tmp_path, monkeypatch):
    untyped = {k: v for k, v in L40S.items() if k != "accelerator_type"}
    monkeypatch.setenv("DYNPART_HARDWARE", _extra_catalog(tmp_path, {"mystery": untyped}))
    assert PoolConfig(name="p", gpu=True, hardware="mystery").accelerator_type is None
    assert PoolConfig(name="p", gpu=True, hardware="mystery", accelerator_type="L40S").accelerator_type == "L40S"


def test_gpu_pool_with_unknown_hardware_is_a_config_error():
    with pytest.raises(ValidationError, match="unknown hardware 'Z9'"):
        PoolConfig(name="p", gpu=True, hardware="Z9")
