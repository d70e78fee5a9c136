"""Data-parallel training under ``torch.distributed`` (DDP): the process group, the sampler, the batch gather.

The training loop (``models.training.train``) runs unchanged in one process; started by ``torchrun`` (each rank
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in its environment) it trains one model on N
processes:

- every rank gets its share of each global batch from a distributed sampler that draws the one-process loader's
  permutation, so the N shares of step k are exactly the one-process batch k (:class:`GlobalBatchSampler`);
- the model outputs of the shares are gathered before the loss (:func:`gather_items`, in the one-process order),
  because the losses mine pairs and triplets across the whole batch: a loss per share would miss the pairs between
  shares. Each rank computes the whole batch's loss; its gradient flows to its own share only, and DDP's mean of the
  ranks' gradients is then the one-process gradient once the loss is scaled by the world size (``loss_scale``);
- rank 0 alone validates (and broadcasts the verdict), checkpoints and reports; every rank keeps the same weights.

Backend: ``nccl`` on CUDA (one GPU a rank, ``LOCAL_RANK``), ``gloo`` on CPU. No prefect or mlflow here: the launch
from a Prefect task is ``pipelines.ddp``'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> DistributedContext | None:
    """The process group this process belongs to, when it spans more than one process; else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistributedContext(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), str(dist.get_backend())
    )


def backend_for(device: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` for the CPU."""
    return "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"


def init_from_env(device: str = "auto") -> DistributedContext | None:
    """Join the process group ``torchrun`` described in the environment (no-op in a plain process); on CUDA each
    rank takes the GPU of its ``LOCAL_RANK``."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(ctx: DistributedContext, device: torch.device) -> torch.device:
    """The device of this rank: its own GPU on CUDA, the CPU otherwise."""
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" else device


class GlobalBatchSampler(Sampler[int]):
    """Rank r's positions r, r + W, r + 2W … of the permutation the one-process loader draws for an epoch, so the
    ranks' shares of step k are exactly the one-process batch k.

    The one-process loader (``DataLoader(shuffle=True, generator=g)`` with ``g`` seeded ``seed + epoch``) first draws
    its workers' base seed from ``g``, then the permutation: this sampler draws the same two (``tests/test_ddp.py``
    checks the orders agree). Only whole global batches are shared out (a last partial batch is dropped, as the
    one-process loader drops it), so every rank runs the same number of steps."""

    def __init__(self, size: int, ctx: DistributedContext, batch_size: int, seed: int) -> None:
        self.size, self.ctx, self.batch_size, self.seed, self.epoch = size, ctx, batch_size, seed, 0
        whole = (size // batch_size) * batch_size if size > batch_size else (size // ctx.world_size) * ctx.world_size
        self.usable = whole

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.usable // self.ctx.world_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the one-process loader's base-seed draw
        order = torch.randperm(self.size, generator=g)[: self.usable]
        return iter(order[self.ctx.rank :: self.ctx.world_size].tolist())


def rank_loader(
    dataset: Dataset, ctx: DistributedContext, batch_size: int, seed: int, loader_options: dict[str, Any]
) -> tuple[DataLoader, GlobalBatchSampler]:
    """This rank's loader: a share of ``batch_size // world_size`` of each global batch of ``batch_size``
    (:class:`GlobalBatchSampler`; ``seed``: the one-process loader's generator seed less the epoch)."""
    if batch_size % ctx.world_size:
        raise ValueError(
            f"train.batch_size {batch_size} does not split evenly over {ctx.world_size} processes; "
            "use a multiple of train.devices"
        )
    sampler = GlobalBatchSampler(len(dataset), ctx, batch_size, seed)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size // ctx.world_size, sampler=sampler, **loader_options)
    return loader, sampler


def gather_items(local: Tensor, ctx: DistributedContext, *, grad: bool = False) -> Tensor:
    """Every rank's ``local`` (the same shape on each, items on dim 0) joined in the one-process batch order: item
    j of rank r is item ``j * W + r`` of the global batch (:func:`rank_loader`). With ``grad``, this rank's own
    share stays in the autograd graph (the others arrive as constants)."""
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local.detach().contiguous())
    if grad:
        parts[ctx.rank] = local
    return torch.stack(parts, dim=1).flatten(0, 1)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects: the validation verdict)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
