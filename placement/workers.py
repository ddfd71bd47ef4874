"""Shard workers: one per device, all in one placement group, joined in one torch.distributed group.

``ShardGroup`` is the small API the engine and the Serve deployments use (``placement.group.Group``): start p
ranks (all at once, since ``init_process_group`` blocks until every rank has joined), run a step on all ranks and
take rank 0's answer, tear down. Ranks are Ray actors, except that the process driving an engine (an engine
replica, holding bundle 0 of its placement group, or ``dynpart generate``) is rank 0 itself (``local_rank0``): one
process fewer per replica, and rank 0's answer (the logits) never goes through the object store. ``LocalGroup`` is
the same API for one device in the calling process (no Ray, no process group).

A rank that dies leaves the others blocked in a collective until the process group's timeout; so the group's calls
raise as soon as any rank fails (``gather``: rank 0, when local, runs on a thread of its own so the caller keeps
watching the others) and the collective timeout is short and configurable, which bounds how long a request on a
broken replica can wait.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from placement.bundles import COLLECTIVE_TIMEOUT_S, actor_resources, default_bundle
from placement.collectives import destroy_process_group, device_and_backend, init_process_group, is_loopback
from placement.cores import pin_device
from placement.group import Group, RunnerSettings
from placement.hardware import fast_dtype, replica_budget_bytes
from strategies.comm import Comm, SingleDevice
from strategies.runner import ShardRunner

POLL_S = 0.5  # how often a step that has not finished checks its ranks for a failure


def check_ranks(prefill_ranks: int, decode_ranks: int) -> None:
    """K/V slices line up rank for rank only between groups of the same size."""
    if prefill_ranks != decode_ranks:
        raise ValueError(f"K/V from {prefill_ranks} ranks cannot feed {decode_ranks} decode ranks")


def max_devices() -> int:
    """How many devices this machine can give one replica: its GPUs, or emulated CPU devices (threads share cores)."""
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return int(os.environ.get("DYNPART_MAX_CPU_DEVICES", max(4, 2 * (os.cpu_count() or 1))))


LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` ("": on every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous(bundle_nodes: list[str], rank0_endpoint) -> tuple[str, int]:
    """Where a group's ranks meet (rank 0 listens there), given the node of each rank's bundle: when they are all on
    one node, loopback and a port free here (the caller, an engine replica in bundle 0 or a local process, runs on that
    node), as gloo then never touches an external interface; else ``rank0_endpoint()``: rank 0's node address and a
    port free there (``placement_strategy: PACK`` may span nodes)."""
    if len(set(bundle_nodes)) <= 1:
        return LOOPBACK, free_port()
    return rank0_endpoint()


def node_endpoint() -> tuple[str, int]:
    """This node's address as Ray knows it and a port free on all its interfaces (run on rank 0's node)."""
    import ray

    return ray.util.get_node_ip_address(), free_port("")


def threads_per_device(devices: int, bundle: dict | None = None) -> int:
    """Torch threads for one CPU device: the whole cores its bundle reserves, else the machine's cores shared by the
    p devices (tools that start groups outside Serve)."""
    if bundle is None:
        return max(1, (os.cpu_count() or 1) // devices)
    return max(1, int(bundle.get("CPU", 0)))


def make_runner(comm: Comm, settings: RunnerSettings) -> ShardRunner:
    """This rank's ``ShardRunner`` on this process's device; ``shared_weights`` maps the node's one copy of the
    rank's shards (object store) instead of loading them. ``replica_budget_bytes`` None: measured here, once the
    shards are loaded, less ``kv_reserve_bytes`` (``placement.hardware.replica_budget_bytes``)."""
    device, _ = device_and_backend()
    if device.type == "cpu" and settings.pin_cpus:  # before the weights load: first touched from the pinned core
        pin_device(settings.pin_cpus)
    dtype = fast_dtype(device) if settings.dtype == "auto" else settings.dtype
    weights = None
    if settings.shared_weights:
        from placement.weight_store import shared_rank_weights

        weights = shared_rank_weights(settings.model, comm.world_size, comm.rank, dtype, device)
    runner = ShardRunner(settings.model, comm, dtype=dtype, device=device,
                         replica_budget_bytes=settings.replica_budget_bytes or 0, weights=weights,
                         block_size=settings.block_size, num_blocks=settings.num_blocks, balanced=settings.balanced,
                         pack_weights=settings.pack_weights)
    if settings.replica_budget_bytes is None:
        runner.sources.budget_bytes = replica_budget_bytes(comm.world_size, device, settings.kv_reserve_bytes)
    return runner


def use_threads(threads: int) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)


class ShardWorker:
    """One rank: joins the process group and holds a ``ShardRunner``. Runs as a Ray actor, or as rank 0 in the
    process that drives the group (see ``ShardGroup``)."""

    def __init__(self, rank: int, devices: int, master_addr: str, master_port: int, settings: RunnerSettings,
                 collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, threads: int = 1):
        use_threads(threads)
        self.rank = rank
        self.node_addr = None if is_loopback(master_addr) else node_endpoint()[0]  # ranks on several nodes
        self.comm = init_process_group(rank, devices, master_addr, master_port, timeout_s=collective_timeout_s,
                                       node_addr=self.node_addr)
        self.load(settings)

    def load(self, settings: RunnerSettings) -> None:
        """(Re)build the runner, e.g. for another model, keeping the process group."""
        self.runner = None  # free the old shards first
        self.runner = make_runner(self.comm, settings)

    def put_kv(self, tables: list[tuple[list[int], int]]) -> list:
        """This rank's head-sharded K/V of sequences into the object store, for the same rank of a decode replica.
        The reference comes back wrapped in a list so Ray hands over the reference, not the tensors."""
        import ray

        return [ray.put(self.runner.export_kv(tables))]

    def take_kv(self, tables: list[list[int]], refs_by_rank: list[list]) -> None:
        """Adopt the K/V slice that the same rank of a prefill replica put: fetched rank to rank, not via a driver."""
        import ray

        self.runner.import_kv(tables, ray.get(refs_by_rank[self.rank][0]))

    def run(self, method: str, *args: Any) -> Any:
        out = getattr(self.runner, method)(*args)
        if isinstance(out, torch.Tensor):
            return out.cpu() if self.rank == 0 else None  # every rank holds the same result; ship one
        return out

    def calibrate(self, spec: dict) -> dict:
        """Measure GEMMs on this rank's own layer shards, attention, memory and collectives (``dynpart calibrate``);
        every rank must be called at once, like a step."""
        from placement.calibrate import calibrate_runner

        return calibrate_runner(self.runner, spec)

    def ready(self) -> int:
        return self.rank

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        destroy_process_group()


class LocalGroup(Group):
    """p = 1 in the calling process: no actor hop per step and no logits through the object store. A Serve replica
    of a one-device pool is its own device (it holds the bundle's resources, ``PoolConfig.replica_actor_options``).
    ``fields``: the ``RunnerSettings`` fields, when no ``settings`` are given."""

    devices = 1

    def __init__(self, threads: int | None = None, settings: RunnerSettings | dict | None = None, **fields: Any):
        if threads is not None:
            use_threads(threads)
        self.runner = make_runner(SingleDevice(), RunnerSettings.of(settings if settings is not None else fields))

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.runner, method)(*args)

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return [self.call(method, *args)]

    def put_kv(self, tables: list[tuple[list[int], int]]) -> list[list]:
        import ray

        return [[ray.put(self.runner.export_kv(tables))]]

    def take_kv(self, tables: list[list[int]], refs_by_rank: list[list]) -> None:
        import ray

        check_ranks(len(refs_by_rank), self.devices)
        self.runner.import_kv(tables, ray.get(refs_by_rank[0][0]))

    def calibrate(self, spec: dict) -> list[dict]:
        from placement.calibrate import calibrate_runner

        return [calibrate_runner(self.runner, spec)]

    def pids(self) -> list[int]:
        return []

    def shutdown(self) -> None:
        pass


class ShardGroup(Group):
    """p ranks in a placement group of p device bundles (PACK: one node if possible), rank r in bundle r. On one
    node the ranks meet on loopback; across nodes at rank 0's node address (``rendezvous``).

    Pass ``placement_group`` to use one that already exists (a Serve replica's own, from ``placement_group_bundles``),
    otherwise one is created and removed with the group. Each bundle needs one device: a GPU where the cluster has
    them, else the ``dynpart_device`` custom resource or just a slice of a CPU. Ranks are Ray actors; with
    ``local_rank0`` the caller is rank 0 itself, run on a thread of this process, in bundle 0 (a Serve replica of
    the pool holds it: ``replica_actor_options``; a process outside Ray, the CLI, keeps it reserved for itself). One
    process group per process: a process is rank 0 of one such group at a time.
    """

    def __init__(self, devices: int, settings: RunnerSettings | dict, placement_group=None, bundle: dict | None = None,
                 start_timeout_s: float = 300.0, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
                 local_rank0: bool = False):
        import ray
        from ray.util.placement_group import placement_group as make_pg
        from ray.util.placement_group import placement_group_table, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.devices = devices
        settings = RunnerSettings.of(settings)
        self._own_pg = placement_group is None
        bundle = bundle or default_bundle()
        if self._own_pg:
            placement_group = make_pg([dict(bundle)] * devices, strategy="PACK")
            try:
                ray.get(placement_group.ready(), timeout=start_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                remove_placement_group(placement_group)
                raise RuntimeError(f"the cluster cannot place {devices} devices of {bundle} "
                                   f"within {start_timeout_s:.0f} s") from e
        self.pg = placement_group
        bundle_nodes = list(placement_group_table(placement_group)["bundles_to_node_id"].values())
        on_rank0 = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=0)
        self.master_addr, port = rendezvous(bundle_nodes, node_endpoint if local_rank0 else lambda: ray.get(
            ray.remote(num_cpus=0)(node_endpoint).options(scheduling_strategy=on_rank0).remote()))
        actor = ray.remote(ShardWorker)
        threads = threads_per_device(devices, bundle if not self._own_pg else None)
        args = (devices, self.master_addr, port, settings, collective_timeout_s, threads)
        self.workers = [  # each rank takes its whole bundle: Ray then never places more devices than there are
            actor.options(
                **actor_resources(bundle),
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=r),
            ).remote(r, *args)
            for r in range(1 if local_rank0 else 0, devices)
        ]
        self.local: ShardWorker | None = None
        self._rank0 = ThreadPoolExecutor(1, thread_name_prefix="rank0") if local_rank0 else None
        self._last: Future | None = None  # rank 0's latest call (local)
        try:
            local = self._on_rank0(ShardWorker, 0, *args) if local_rank0 else None
            gather([w.ready.remote() for w in self.workers], local, timeout_s=start_timeout_s)
            self.local = local.result() if local is not None else None
        except Exception:
            self.shutdown()
            raise

    def _on_rank0(self, fn, *args: Any) -> Future:
        self._last = self._rank0.submit(fn, *args)
        return self._last

    def load(self, settings: RunnerSettings | dict) -> None:
        """Swap the model the workers hold, without restarting them or their process group."""
        self.call_workers("load", RunnerSettings.of(settings))

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method`` on every rank (SPMD) and return rank 0's result."""
        return self.call_all(method, *args)[0]

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Run ``method`` on every rank (SPMD); every rank's result (a tensor from rank 0 only: they are equal)."""
        return self.call_workers("run", method, *args)

    def call_workers(self, method: str, *args: Any) -> list[Any]:
        """Call a ``ShardWorker`` method (not a runner method) on every rank; results in rank order. The actors'
        calls are sent first, then rank 0's runs here (when local)."""
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        local = self._on_rank0(getattr(self.local, method), *args) if self.local is not None else None
        return gather(refs, local)

    def put_kv(self, tables: list[tuple[list[int], int]]) -> list[list]:
        """Each rank's K/V slices of sequences as object references ([rank][0]), for ``take_kv`` elsewhere."""
        return self.call_workers("put_kv", tables)

    def take_kv(self, tables: list[list[int]], refs_by_rank: list[list]) -> None:
        check_ranks(len(refs_by_rank), self.devices)
        self.call_workers("take_kv", tables, refs_by_rank)

    def calibrate(self, spec: dict) -> list[dict]:
        return self.call_workers("calibrate", spec)

    def pids(self) -> list[int]:
        return self.call_workers("pid")

    def shutdown(self, wait_rank0_s: float = 5.0) -> None:
        """Kill the actor ranks; a local rank 0 leaves the process group once its last call returned (a call stuck
        in a collective fails once its peers are gone; one still stuck after ``wait_rank0_s`` is left behind)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._rank0 is not None:
            if self._last is None or wait_futures([self._last], timeout=wait_rank0_s).done:
                destroy_process_group()
            self._rank0.shutdown(wait=False)
            self._rank0, self.local = None, None
        if self._own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def gather(refs: list, local: Future | None = None, timeout_s: float | None = None) -> list[Any]:
    """``ray.get(refs)`` (with ``local``, rank 0's call on this process, first), but a rank's failure (its actor
    died, its step raised) is raised as soon as it is known, not after the surviving ranks give up on their
    collective. ``timeout_s``: ``GetTimeoutError`` once it passed with a rank still running."""
    import ray

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    results, pending = {}, list(refs)
    while pending or (local is not None and not local.done()):
        if pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            results.update(zip(done, ray.get(done)))  # raises the first failure among the finished ranks
        else:
            wait_futures([local], timeout=POLL_S)
        if local is not None and local.done() and local.exception() is not None:
            raise local.exception()
        if deadline is not None and time.monotonic() > deadline:
            raise ray.exceptions.GetTimeoutError(f"a rank did not answer within {timeout_s:g} s")
    ranks = [results[r] for r in refs]
    return ranks if local is None else [local.result(), *ranks]


def start_group(devices: int, settings: RunnerSettings | dict, placement_group=None, bundle: dict | None = None,
                collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, rank0_here: bool | None = None) -> Group:
    """One device runs in the calling process (``LocalGroup``: in a placement group, the caller holds its bundle);
    p devices are a ``ShardGroup`` (Ray is started locally if needed), whose rank 0 is the calling process with
    ``rank0_here`` (by default: when it holds bundle 0 of ``placement_group``, an engine replica), else a Ray actor
    like the others (tests and tools that hold several groups at once)."""
    if devices == 1:
        return LocalGroup(threads=threads_per_device(1, bundle), settings=settings)
    import ray

    if not ray.is_initialized():
        ray.init(**local_ray_options())
    return ShardGroup(devices, settings, placement_group=placement_group, bundle=bundle,
                      collective_timeout_s=collective_timeout_s,
                      local_rank0=placement_group is not None if rank0_here is None else rank0_here)


def local_ray_options(**overrides) -> dict:
    """ray.init options for a single machine: no token auth (local tests and CLI), no dashboard, a small object
    store, and worker logs kept out of the caller's output."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    opts = dict(address="local", include_dashboard=False, log_to_driver=False,
                object_store_memory=512 * 2**20, configure_logging=False)
    opts.update(overrides)
    return opts
