"""Core claims (placement/cores.py): each device process claims cores on the node and is pinned to them; a claim
lasts exactly as long as its process. Real processes, real file locks, real CPU affinity (Linux)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from placement.cores import CLAIMS_DIR_ENV, node_cores, parse_cpu_list, service_cores

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")

HOLD = textwrap.dedent("""
    import json, os, sys, threading
    from placement.cores import pin_device
    cores = pin_device(float(sys.argv[1]))
    later = []
    t = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
    t.start(); t.join()
    print(json.dumps({"claimed": cores, "affinity": sorted(os.sched_getaffinity(0)), "thread": later[0]}), flush=True)
    sys.stdin.read()  # hold the claim until the test closes stdin
""")


class Holder:
    """A device process that claimed cores for ``cpus`` and holds them until ``release``."""

    def __init__(self, cpus: float, folder):
        env = {**os.environ, CLAIMS_DIR_ENV: str(folder)}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(cpus)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.seen = json.loads(self.proc.stdout.readline())

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def holders(tmp_path):
    started: list[Holder] = []

    def start(cpus: float) -> Holder:
        started.append(Holder(cpus, tmp_path))
        return started[-1]

    yield start
    for h in started:
        if h.proc.poll() is None:
            h.release()


def test_a_whole_core_device_is_pinned_to_a_core_of_its_own_and_frees_it_when_it_exits(holders):
    cores = node_cores()
    first = holders(1)
    assert first.seen["claimed"] == [cores[-1]]  # the highest core
    assert first.seen["affinity"] == first.seen["thread"] == [cores[-1]]  # threads started later too
    others = [holders(1) for _ in cores[:-1]]
    assert sorted(c for h in [first, *others] for c in h.seen["claimed"]) == cores  # one each, no core twice
    late = holders(1)
    assert late.seen["claimed"] == [] and late.seen["affinity"] == sorted(os.sched_getaffinity(0))  # unpinned
    first.release()
    assert holders(1).seen["claimed"] == [cores[-1]]  # its core is free again once its process is gone


def test_fractional_devices_share_a_core_that_no_whole_core_device_holds(holders):
    cores = node_cores()
    halves = [holders(0.45), holders(0.45)]
    assert [h.seen["claimed"] for h in halves] == [[cores[0]], [cores[0]]]  # together, on the lowest core
    whole = holders(1)
    assert whole.seen["claimed"] == ([cores[-1]] if len(cores) > 1 else [])  # never the shared one


def test_the_service_keeps_the_cores_whole_core_devices_do_not_claim():
    cores = node_cores()
    assert service_cores(0) == cores
    assert service_cores(1) == (cores[:-1] or cores)
    assert service_cores(len(cores)) == cores  # nothing left: the service shares every core rather than none


def test_cpu_lists_parse_as_the_kernel_writes_them():
    assert parse_cpu_list("0-3,6\n") == [0, 1, 2, 3, 6]
    assert parse_cpu_list("5") == [5]
    with pytest.raises(ValueError):
        parse_cpu_list("\n")
