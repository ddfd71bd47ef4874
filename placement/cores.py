"""Which cores a CPU device computes on: cores claimed on the node, so the OS does not time-slice an engine with the
service's other processes.

Ray counts the cores each device reserves (``cpus_per_device``) but does not say which ones, and the OS moves every
process across every core. On the shipped 2-core config, while the ``long`` pool's two ranks served long prompts, the
``short`` replica's 4-sequence decode step took 199-217 ms unpinned and 130-152 ms pinned (``make bench-cores``, 3
rounds; BENCHMARKS.md "Cores"); with ``long`` idle pinning changed nothing measurable. vLLM's CPU backend binds
its engine the same way (``VLLM_CPU_OMP_THREADS_BIND``).

A claim is a lock file per core on the node (``core<i>.lock`` under ``claims_dir()``), held as long as the device's
process lives, so a replica that dies or is scaled down frees its cores without anyone cleaning up:

- a device of whole cores (``cpus_per_device`` >= 1) locks that many cores *exclusively*, highest index first;
- a device of a fraction of a core (ranks that share one, e.g. the shipped ``long`` pool's 0.45 each) takes a
  *shared* lock on the lowest core no device holds whole, so fractional devices share cores with each other and
  with the service's processes, not with a whole-core device;
- the device's process (every thread it has, and those it starts later) is pinned to what it claimed. With nothing
  left to claim it runs unpinned, as before, and says so once.

``service_cores`` is the other half: the cores a config leaves to the rest of the service (Ray, Serve's proxy and
controller, the ingresses), which ``dynpart serve`` moves every process of the Ray it started to once the engines
have started (``pin_unpinned``; start-up itself uses every core), so they stay off the engines' cores. Linux only
(``sched_setaffinity``); elsewhere nothing is pinned.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CLAIMS_DIR_ENV = "DYNPART_CORES_DIR"  # where the node's claims live (default: one folder per user in the temp dir)
_held: list = []  # this process's open lock files: a claim lasts as long as the process


def node_cores() -> list[int]:
    """Every core this node lets its processes use (the cgroup's cpuset, not only this process's affinity, which
    ``dynpart serve`` may have narrowed)."""
    for path in ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/devices/system/cpu/online"):
        try:
            return parse_cpu_list(Path(path).read_text())
        except (OSError, ValueError):
            continue
    return sorted(os.sched_getaffinity(0))


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,6`` -> [0, 1, 2, 3, 6] (the kernel's cpu-list format)."""
    cores: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cores.extend(range(int(lo), int(hi or lo) + 1))
    if not cores:
        raise ValueError(f"no cores in {text!r}")
    return cores


def claims_dir() -> Path:
    return Path(os.environ.get(CLAIMS_DIR_ENV) or Path(tempfile.gettempdir()) / f"dynpart-cores-{os.getuid()}")


def _try_lock(core: int, exclusive: bool) -> bool:
    folder = claims_dir()
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / f"core{core}.lock", "a")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    _held.append(f)
    return True


def claim_cores(cpus: float) -> list[int]:
    """Claim cores for one device reserving ``cpus`` cores: ``floor(cpus)`` whole cores exclusively, highest first, or
    for a fraction a shared hold on the lowest core no device holds whole. [] when none is free."""
    cores = node_cores()
    if cpus >= 1:
        want, got = math.floor(cpus), []
        for core in reversed(cores):
            if len(got) < want and _try_lock(core, exclusive=True):
                got.append(core)
        return sorted(got)
    return next(([core] for core in cores if _try_lock(core, exclusive=False)), [])


def pin_process(cores: list[int], pid: int | str = "self") -> None:
    """Every thread of a process (this one by default) on ``cores`` (threads started later inherit it from their
    creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended; one we may not move
            continue


def pin_unpinned(pids: list[int], cores: list[int]) -> int:
    """Pin each of ``pids`` that may still run on every core of the node to ``cores``; processes that claimed their
    cores (devices) keep them. How many moved."""
    everywhere, moved = set(node_cores()), 0
    for pid in pids:
        try:
            if set(os.sched_getaffinity(pid)) == everywhere:
                pin_process(cores, pid)
                moved += 1
        except (ProcessLookupError, FileNotFoundError, PermissionError):  # ended meanwhile, or not ours
            continue
    return moved


def pin_device(cpus: float) -> list[int]:
    """Claim cores for this process's device and pin the process to them; the cores (none: left unpinned)."""
    if cpus <= 0 or not hasattr(os, "sched_setaffinity"):
        return []
    cores = claim_cores(cpus)
    if not cores:
        logger.warning("no free core to pin a device of %g cores to (all claimed on this node): it runs unpinned",
                       cpus)
        return []
    pin_process(cores)
    return cores


def service_cores(whole_core_devices: int) -> list[int]:
    """The cores left to the service's other processes when ``whole_core_devices`` cores go to devices of whole
    cores (claimed from the highest index down): the lowest ones; every core when that would leave none."""
    cores = node_cores()
    rest = cores[:len(cores) - whole_core_devices] if whole_core_devices > 0 else cores
    return rest or cores
