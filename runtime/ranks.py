"""Several processes under `torchrun`: which one this is, and the process group they share.

Harvest and train use it (`torchrun --nproc_per_node=R -m harvest|train ...`). torchrun sets WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (one process) nothing is joined.
"""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td
import torch.multiprocessing as mp


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank in 0..world-1, its index on its machine, its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files and logs."""
        return self.rank == 0


def _destroy() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def join(device: torch.device) -> Ranks:
    """This process's Ranks, joining the process group if torchrun started several.

    device: the device asked for; with several ranks, a CUDA device without an index becomes
    cuda:LOCAL_RANK (one GPU per process) and the backend is NCCL, otherwise gloo. A process group
    that already exists (a second run in the same processes, as in a sweep) is reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not td.is_initialized():
        return Ranks(0, 1, 0, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        cuda = device.type == "cuda"
        td.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ["RANK"]), world_size=world,
                              device_id=device if cuda else None)
        atexit.register(_destroy)
    return Ranks(td.get_rank(), td.get_world_size(), local_rank, device)


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (nothing with one process)."""
    if ranks.world > 1:
        td.barrier()


def spawn_local(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run fn(*args) in `world` new processes on this machine, each with the environment torchrun
    gives its workers (rendezvous on a free loopback port) and one thread: torchrun's stand-in for
    tests and benchmarks. fn must be importable (defined at a module's top level)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_local_worker, args=(world, port, fn, args), nprocs=world, join=True)


def _local_worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    fn(*args)
