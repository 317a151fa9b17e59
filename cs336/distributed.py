"""Data-parallel helpers for ``torchrun --nproc_per_node=N -m cs336.train``.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_distributed``
reads them and joins the process group (nccl for CUDA devices, gloo for CPU). Without WORLD_SIZE
(or with WORLD_SIZE=1) everything here is a no-op, so the training loop calls these helpers
unconditionally. Every rank draws the same global batch from an identically seeded generator and
keeps its own contiguous slice of rows (``rank_rows``), so N ranks see exactly the batch one
process would, and DistributedDataParallel's gradient average equals the single-process gradient.
With gradient accumulation each rank's rows are split further into equal micro-batches
(``micro_batches``).

The collective timeout is two hours because the other ranks wait at a barrier while rank 0
prepares the data, which for a first TinyStories or OWT run includes the download, tokenizer
training and encoding of gigabytes of text.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cs336.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The ranks torchrun (or a test) put in the environment."""
    try:
        return DistInfo(rank=int(os.environ.get("RANK", "0")),
                        world_size=int(os.environ.get("WORLD_SIZE", "1")),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc}); launch with torchrun") from None


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when WORLD_SIZE > 1; ``device_type`` picks nccl (cuda) or gloo."""
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(hours=2))
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def rank_rows(batch_size: int, info: DistInfo) -> slice:
    """This rank's rows of a global batch of ``batch_size`` sequences."""
    if batch_size % info.world_size:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the {info.world_size} "
                          "data-parallel ranks; pick a multiple of the rank count")
    per_rank = batch_size // info.world_size
    return slice(info.rank * per_rank, (info.rank + 1) * per_rank)


def micro_batches(rows: slice, steps: int) -> list[slice]:
    """``rows`` split into ``steps`` equal consecutive slices (gradient accumulation)."""
    n = rows.stop - rows.start
    if n % steps:
        raise ConfigError(f"train.grad_accum_steps={steps} does not divide the {n} rows each rank trains "
                          "on per step (train.batch_size / ranks); pick a divisor of it")
    size = n // steps
    return [slice(rows.start + i * size, rows.start + (i + 1) * size) for i in range(steps)]


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a scalar tensor over ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop request)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
