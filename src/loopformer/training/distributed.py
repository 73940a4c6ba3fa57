"""Multi-process training: process-group setup from torchrun's environment, model wrapping, collectives.

Launch with ``torchrun --nproc_per_node=N -m loopformer.train ...`` (or ``torchrun ... $(which loopformer) train``).
Without torchrun's variables everything degrades to a single process and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from loopformer.errors import InputError

CPU = torch.device("cpu")


@dataclass
class DistributedContext:
    """This process's place in the job: rank, world size and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (identity for one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def init_distributed(device: str) -> DistributedContext:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was requested but no CUDA device is visible.")
        torch.cuda.set_device(local_rank)
        compute = torch.device("cuda", local_rank)
    else:
        compute = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if compute.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=compute)


def wrap_model(model: nn.Module, ctx: DistributedContext, strategy: str) -> nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (``fully_shard``: sharded weights and state)."""
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers():
            fully_shard(layer)
        return fully_shard(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
