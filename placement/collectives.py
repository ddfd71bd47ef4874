"""Collectives between the shard workers of one engine replica, over torch.distributed.

``ProcessGroupComm`` implements ``strategies.comm.Comm`` (the interface the model math calls) with nccl on GPUs and
gloo on CPU; ``init_process_group`` joins a replica's ranks, or returns ``SingleDevice`` for one device.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from strategies.comm import Comm, PendingGather, SingleDevice


class _PendingWork:
    def __init__(self, work, out: torch.Tensor):
        self.work, self.out = work, out

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.out


class ProcessGroupComm:
    """Collectives over the default torch.distributed process group.

    Gathers return ``[p, *x.shape]`` (rank-major); ``reduce_scatter`` takes ``[p, *shape]`` and returns this rank's
    summed ``shape`` block; ``all_to_all`` exchanges the blocks of ``[p, *shape]``. Inputs must have the same shape
    on every rank.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather_async(x).wait()

    def all_gather_async(self, x: torch.Tensor, out: torch.Tensor | None = None) -> PendingGather:
        x = x.contiguous()
        if out is None:
            out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        work = dist.all_gather_single(out.view(-1), x.view(-1), async_op=True)
        return _PendingWork(work, out)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
        dist.reduce_scatter_single(out.view(-1), x.contiguous().view(-1))
        return out

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [p, ...]: block j goes to rank j; returns [p, ...] whose block j came from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x)
        return out


def device_and_backend() -> tuple[torch.device, str]:
    """nccl on a CUDA device where one is visible, gloo on the CPU otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), "nccl"
    return torch.device("cpu"), "gloo"


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def interface_of(addr: str) -> str | None:
    """The name of this machine's network interface holding ``addr`` (None if none does, or psutil is missing)."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == addr for a in addrs):
            return name
    return None


def gloo_interface(master_addr: str, node_addr: str | None) -> str | None:
    """The interface gloo must use: loopback when the ranks meet at a loopback address (every rank on one node: never
    an external interface), else the one holding this rank's own node address (gloo's default, the hostname's
    address, is often 127.0.1.1 and unreachable from other nodes)."""
    if is_loopback(master_addr):
        return "lo"
    return interface_of(node_addr) if node_addr else None


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int,
                       timeout_s: float = 120.0, node_addr: str | None = None) -> Comm:
    """Join the replica's process group; blocks until all ranks have joined (start them all at once). ``master_addr``
    is where rank 0 listens; ``node_addr`` this rank's own node address (needed when the ranks span nodes)."""
    if world_size == 1:
        return SingleDevice()
    _, backend = device_and_backend()
    if (interface := gloo_interface(master_addr, node_addr)) is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return ProcessGroupComm(rank, world_size)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
