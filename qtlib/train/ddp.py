"""Multi-process data parallelism: spawn, process groups, and the rank's view of the world.

``train.gpus > 1`` runs one process per GPU with ``torch.multiprocessing``
(NCCL on CUDA). On a machine without CUDA the same code runs with the gloo
backend on CPU processes, which is how the tests check it. Rank 0 owns the EMA
teacher, the checkpoints and the logs; the other ranks only compute gradients.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class World:
    """This process's place: rank, world size and device."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def free_port() -> int:
    """A TCP port that is free right now on localhost (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(rank: int, size: int, device: torch.device, port: int) -> None:
    """Join the group: NCCL for CUDA devices, gloo otherwise; rendezvous on localhost:port."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=size)


def _entry(rank: int, size: int, port: int, fn: Callable[..., Any], args: tuple, threads: int) -> None:
    torch.set_num_threads(threads)
    from qtlib.runtime import resolve_device

    device = resolve_device(args[0], rank) if isinstance(args[0], str) else args[0]
    init_process_group(rank, size, device, port)
    try:
        fn(World(rank, size, device), *args[1:])
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], size: int, device: str, *args: Any) -> None:
    """Run ``fn(World, *args)`` in ``size`` spawned processes and wait for all of them.

    Args:
        fn: a picklable (module-level) function; its first argument is the :class:`World`.
        size: number of processes (one per GPU).
        device: ``cpu``, ``cuda`` or ``auto``, resolved per rank (``cuda:rank``).
        *args: picklable arguments passed on.

    Raises:
        RankFailed: a rank raised (its traceback is in the message) or died (killed, out of memory):
            ``torch.multiprocessing`` notices the first rank to exit abnormally, stops the others and
            this names that rank, so a dead rank fails the job instead of leaving the others waiting in
            a collective.
    """
    threads = max(1, torch.get_num_threads() // size)
    try:
        mp.spawn(_entry, args=(size, free_port(), fn, (device, *args), threads), nprocs=size, join=True)
    except mp.ProcessExitedException as e:
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        raise RankFailed(f"data-parallel rank {e.error_index} of {size} (pid {e.error_pid}) {how}; the other ranks "
                         "were stopped") from e
    except mp.ProcessRaisedException as e:
        raise RankFailed(f"data-parallel rank {e.error_index} of {size} (pid {e.error_pid}) failed:\n{e}") from e


class RankFailed(RuntimeError):
    """A process of a data-parallel run failed or died; the message names its rank."""


def all_reduce_mean(values: torch.Tensor, world: World) -> torch.Tensor:
    """Average a tensor over ranks (a no-op in a single process)."""
    if not world.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world.size


def barrier(world: World) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world.distributed:
        dist.barrier()


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's picklable ``obj`` on every rank (returned as is in a single process)."""
    if not world.distributed:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
