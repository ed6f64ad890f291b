"""Process-group setup and the few collective helpers the trainer needs.

``setup_distributed()`` reads what torchrun exports (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) and works as
a plain single process without them:

    env = setup_distributed()            # NCCL + cuda:LOCAL_RANK with GPUs, gloo on CPU
    print0(env, "hello from rank 0")
    ...
    cleanup()                            # after the DDP model and optimizer are gone (see cleanup)
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from core.hardware import cpu_cores
from core.logs import get_logger
from distributed.round_store import join_round, node_replacement_warning

LOG = get_logger("train")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    is_main: bool
    round_id: str = ""  # the process group's store namespace in this torchrun round (round_store)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(backend: str | None = None, threads: int = 0, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun set up (if any) and pick this process's device.

    CUDA: NCCL, device cuda:LOCAL_RANK. CPU: gloo, and the cores are shared out between the local processes
    (``torch.set_num_threads(max(1, cores // LOCAL_WORLD_SIZE))``). ``backend`` overrides the choice ("gloo" on a
    GPU machine runs on the CPU). ``threads`` > 0 sets the CPU thread count explicitly (more threads than free
    cores is very slow: the threads spin waiting for each other). ``timeout_s`` bounds every wait for the other
    ranks (meeting them, each collective): a rank that hangs ends the round with an error, and torchrun restarts it.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, cpu_cores() // local_world_size))
    round_id = ""
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        store, round_id = join_round(store, rank, world_size, timeout)  # why: distributed/round_store.py
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if use_cuda else None,
        )
    return DistEnv(rank, local_rank, world_size, local_world_size, device, rank == 0, round_id)


def print0(env: DistEnv, message: str) -> None:
    """An info line of the run, from rank 0 only (the ranks share one story)."""
    if env.is_main:
        LOG.info(message)


def warn0(env: DistEnv, message: str) -> None:
    if env.is_main:
        LOG.warning(f"warning: {message}")


def log_round(env: DistEnv) -> None:
    """Rank 0 says which round of a torchrun job this is (its store namespace), and what a replaced node needs."""
    if env.round_id:
        print0(env, f"process group: {env.world_size} processes, store namespace {env.round_id} of this round "
                    f"(this node's restarts: {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')})")
        if warning := node_replacement_warning():
            warn0(env, warning)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is left alone). Identity in a single process."""
    out = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each forward, but the forward then updates each rank's copy with its own
    batch: after the last step they differ slightly. Call this before evaluating or saving.
    """
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def cleanup(*holders: Any, barrier: bool = True) -> None:
    """Leave the process group so that torchrun sees exit code 0 every time.

    With a DistributedDataParallel model still alive at ``destroy_process_group()``, about half of the runs
    aborted at exit ("terminate called without an active exception"). So: drop the DDP model and the optimizer
    first, collect them, then barrier and destroy the group. Python cannot delete the caller's variables: the
    trainer keeps them in a dict (or another container) that is passed here and emptied, or lets them go out
    of scope before calling this. ``barrier=False`` after an error that not every rank shares (the others may
    never reach a barrier).
    """
    for holder in holders:
        if hasattr(holder, "clear"):
            holder.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
