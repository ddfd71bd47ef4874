"""Hardware catalog and calibration profiles: the only numbers about devices the cost model uses.

Datasheet figures live in ``hardware.json`` so a user can add a card without touching code (``DYNPART_HARDWARE``,
os.pathsep-separated, or the plan commands' ``--hardware-file`` names extra files whose entries add to or replace the
built-in ones). A GPU entry also carries the device's identity: the names ``torch.cuda.get_device_name()`` reports
for it (what ``placement.hardware.detect_hardware`` matches) and Ray's accelerator type (what a GPU pool's bundles
ask for), so a new device type is one catalog entry. A *calibration profile*
(written by ``dynpart calibrate``, one JSON file per catalog entry in the profile directory) replaces the guessed
efficiencies with what was measured on the machine; when none exists the datasheet entry (for ``cpu``: conservative
placeholders) is used and the plan says so.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CATALOG_FILE = Path(__file__).with_name("hardware.json")
CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all"]


class HardwareError(ValueError):
    """Unknown device name, or a catalog / profile file that does not parse."""


class Link(BaseModel):
    """Device-to-device link: achievable per-direction bandwidth (NCCL busBW) and per-step latency α."""

    model_config = ConfigDict(frozen=True)
    kind: str
    bandwidth_gbs: float = Field(gt=0)
    latency_us: float = Field(ge=0)


class CollectiveFit(BaseModel):
    """Alpha-beta fit of one measured collective: t = steps·α + bytes_per_device/β."""

    model_config = ConfigDict(frozen=True)
    latency_us: float = Field(ge=0)
    bandwidth_gbs: float = Field(gt=0)


class GemmSample(BaseModel):
    """Achieved matmul throughput on one device at a given number of token rows (K, N of a real layer)."""

    model_config = ConfigDict(frozen=True)
    rows: int = Field(gt=0)
    tflops: float = Field(gt=0)


class CalibrationProfile(BaseModel):
    """What ``dynpart calibrate`` measured on one machine; the planner consumes it through ``Hardware.calibrated``.

    Schema version 1. ``gemm`` is throughput against token rows (efficiency collapses at small row counts, which is
    what makes token sharding lose on short prompts); ``collectives`` are alpha-beta fits per collective kind,
    measured between ``devices`` workers; the optional fields replace the catalog's values when present.
    """

    model_config = ConfigDict(frozen=True)
    version: Literal[1] = 1
    hardware: str
    devices: int = Field(ge=1)
    backend: str = "gloo"
    dtype: str = "float32"
    bytes_per_element: int = Field(default=4, ge=1)
    host: str = ""
    created: str = ""
    gemm: tuple[GemmSample, ...] = Field(min_length=1)
    attention: tuple[GemmSample, ...] = ()  # causal attention throughput by query rows (= sequence length)
    attention_sharded: tuple[GemmSample, ...] = ()  # one zigzag token shard's attention, by its query rows (T/p),
    # as FLOPs the cost model counts for it (1/p of the causal pairs) per second
    memory_bandwidth_gbs: float | None = Field(default=None, gt=0)
    launch_overhead_us: float | None = Field(default=None, ge=0)
    prefetch_overlap: float | None = Field(default=None, ge=0, le=1)
    sync_overhead_us: float | None = Field(default=None, ge=0)
    collectives: dict[CollectiveKind, CollectiveFit] = Field(default_factory=dict)
    # the measurements' own noise: relative spread (σ / median, from the median absolute deviation) of repeated
    # timings; the planner cannot tell apart layouts predicted closer than this
    spread: float | None = Field(default=None, ge=0)


class Hardware(BaseModel):
    """One device type: roofline figures plus the link the devices of a pool talk over, and for a GPU its identity."""

    model_config = ConfigDict(frozen=True)
    name: str
    # Substrings of torch.cuda.get_device_name() that mean this entry, most specific first (the longest match wins).
    detection_names: tuple[str, ...] = ()
    accelerator_type: str | None = None  # Ray's accelerator type (ray.util.accelerators), e.g. "H100", "A100", "L4"
    peak_tflops: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)
    memory_gb: float = Field(gt=0)
    link: Link
    compute_efficiency: float = Field(default=0.7, gt=0, le=1)  # η_c at large row counts
    memory_efficiency: float = Field(default=0.8, gt=0, le=1)  # η_m
    half_efficiency_rows: float = Field(default=32, ge=0)  # rows at which a GEMM reaches half of η_c
    launch_overhead_us: float = Field(default=4, ge=0)  # κ per kernel
    prefetch_overlap: float = Field(default=1.0, ge=0, le=1)  # share of a prefetched gather that hides behind compute
    sync_overhead_us: float = Field(default=0, ge=0)  # per blocking collective: ranks' skew, waiting for the slowest
    bytes_per_element: int = Field(default=2, ge=1)  # bf16 on GPUs
    gemm_curve: tuple[GemmSample, ...] = ()  # measured; replaces the η_c(rows) guess when present
    attention_curve: tuple[GemmSample, ...] = ()  # measured attention throughput; else the GEMM figures apply
    sharded_attention_curve: tuple[GemmSample, ...] = ()  # token-sharded attention; else ``attention_curve``
    collectives: dict[CollectiveKind, CollectiveFit] = Field(default_factory=dict)
    calibrated_from: str | None = None
    price_per_hour: float | None = Field(default=None, ge=0)  # USD per device-hour (approximate; cost reports)
    prediction_spread: float = Field(default=0.0, ge=0)  # relative noise of the calibration: closer layouts tie

    def flops_per_s(self, rows: float, kernel: str = "gemm") -> float:
        """Achieved FLOP/s of a matmul with ``rows`` token rows: measured curve if calibrated, else η_c·rows/(rows+r½).

        ``kernel="attention"`` (or ``"attention_sharded"``) reads the measured attention curve where the profile has
        one (CPU attention kernels reach a different fraction of peak than GEMMs)."""
        if kernel == "attention_sharded" and self.sharded_attention_curve:
            return _interpolate_log(self.sharded_attention_curve, rows) * 1e12
        if kernel.startswith("attention") and self.attention_curve:
            return _interpolate_log(self.attention_curve, rows) * 1e12
        if self.gemm_curve:
            return _interpolate_log(self.gemm_curve, rows) * 1e12
        eff = self.compute_efficiency * rows / (rows + self.half_efficiency_rows)
        return self.peak_tflops * 1e12 * eff

    @property
    def memory_bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs * 1e9 * self.memory_efficiency

    def alpha_beta(self, kind: CollectiveKind) -> tuple[float, float]:
        """(α seconds per step, β bytes/s) for one collective kind: measured fit if any, else the link's figures."""
        fit = self.collectives.get(kind)
        if fit is not None:
            return fit.latency_us * 1e-6, fit.bandwidth_gbs * 1e9
        return self.link.latency_us * 1e-6, self.link.bandwidth_gbs * 1e9

    def time_shared(self, share: float) -> "Hardware":
        """This device given ``share`` of its processor, as CPU ranks are when a pool puts more ranks than cores on a
        node: compute, memory bandwidth and per-op overhead scale by the share. The entry's figures are per rank, so
        a share of one or more changes nothing."""
        if share >= 1:
            return self

        def scaled(curve: tuple[GemmSample, ...]) -> tuple[GemmSample, ...]:
            return tuple(s.model_copy(update={"tflops": s.tflops * share}) for s in curve)

        return self.model_copy(update={
            "peak_tflops": self.peak_tflops * share, "memory_bandwidth_gbs": self.memory_bandwidth_gbs * share,
            "launch_overhead_us": self.launch_overhead_us / share, "gemm_curve": scaled(self.gemm_curve),
            "attention_curve": scaled(self.attention_curve),
            "sharded_attention_curve": scaled(self.sharded_attention_curve)})

    def calibrated(self, profile: CalibrationProfile, source: str = "profile") -> "Hardware":
        """This entry with the profile's measurements replacing the guesses (memory size stays the catalog's)."""
        update: dict = {"gemm_curve": tuple(sorted(profile.gemm, key=lambda s: s.rows)),
                        "attention_curve": tuple(sorted(profile.attention, key=lambda s: s.rows)),
                        "sharded_attention_curve": tuple(sorted(profile.attention_sharded, key=lambda s: s.rows)),
                        "collectives": dict(profile.collectives), "bytes_per_element": profile.bytes_per_element,
                        "calibrated_from": source}
        if profile.memory_bandwidth_gbs is not None:
            update |= {"memory_bandwidth_gbs": profile.memory_bandwidth_gbs, "memory_efficiency": 1.0}
        if profile.launch_overhead_us is not None:
            update["launch_overhead_us"] = profile.launch_overhead_us
        if profile.prefetch_overlap is not None:
            update["prefetch_overlap"] = profile.prefetch_overlap
        if profile.sync_overhead_us is not None:
            update["sync_overhead_us"] = profile.sync_overhead_us
        if profile.spread is not None:
            update["prediction_spread"] = profile.spread
        return self.model_copy(update=update)


def _interpolate_log(curve: Sequence[GemmSample], rows: float) -> float:
    """Throughput at ``rows`` by linear interpolation in log(rows); flat beyond the measured range."""
    if rows <= curve[0].rows:
        return curve[0].tflops
    for lo, hi in zip(curve, curve[1:]):
        if rows <= hi.rows:
            w = math.log(rows / lo.rows) / math.log(hi.rows / lo.rows)
            return lo.tflops + w * (hi.tflops - lo.tflops)
    return curve[-1].tflops


def _read_entries(path: Path) -> dict[str, Hardware]:
    try:
        raw = json.loads(Path(path).read_text())
        return {name: Hardware(name=name, **{k: v for k, v in spec.items() if not k.startswith("_")})
                for name, spec in raw["devices"].items()}
    except FileNotFoundError:
        raise HardwareError(f"hardware file {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValidationError) as e:
        raise HardwareError(f"hardware file {path} is not a valid catalog ({{\"devices\": {{NAME: {{...}}}}}}): {e}") from e


def load_catalog(extra_files: Sequence[str | Path] = ()) -> dict[str, Hardware]:
    """Built-in entries, then those of ``DYNPART_HARDWARE`` (os.pathsep-separated), then ``extra_files``."""
    env = [p for p in os.environ.get("DYNPART_HARDWARE", "").split(os.pathsep) if p]
    catalog: dict[str, Hardware] = {}
    for path in [CATALOG_FILE, *env, *extra_files]:
        catalog.update(_read_entries(Path(path)))
    return catalog


def profile_dir() -> Path:
    """Where calibration profiles live: ``DYNPART_PROFILE_DIR``, else ~/.cache/dynpart/profiles."""
    return Path(os.environ.get("DYNPART_PROFILE_DIR") or Path.home() / ".cache" / "dynpart" / "profiles")


def profile_path(hardware_name: str) -> Path:
    return profile_dir() / f"{hardware_name}.json"


def load_profile(hardware_name: str) -> CalibrationProfile | None:
    path = profile_path(hardware_name)
    if not path.is_file():
        return None
    try:
        return CalibrationProfile.model_validate_json(path.read_text())
    except ValidationError as e:
        raise HardwareError(f"calibration profile {path} is invalid (re-run `dynpart calibrate`): {e}") from e


def save_profile(profile: CalibrationProfile) -> Path:
    """Write a profile where ``get_hardware`` will find it (for ``dynpart calibrate``)."""
    path = profile_path(profile.hardware)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=2))
    return path


def get_hardware(name: str, extra_files: Sequence[str | Path] = (), use_profile: bool = True) -> Hardware:
    """A catalog entry by name (case-insensitive), calibrated by its profile when one exists."""
    catalog = load_catalog(extra_files)
    by_lower = {k.lower(): v for k, v in catalog.items()}
    hw = by_lower.get(name.lower())
    if hw is None:
        raise HardwareError(f"unknown hardware {name!r}: use one of {sorted(catalog)} or add it in a catalog file "
                            f"named by DYNPART_HARDWARE (or --hardware-file for the plan commands)")
    profile = load_profile(hw.name) if use_profile else None
    return hw.calibrated(profile, source=str(profile_path(hw.name))) if profile else hw
