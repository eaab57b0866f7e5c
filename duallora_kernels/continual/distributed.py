"""Multi-process training (torchrun + DistributedDataParallel) for the trainer: who this process is,
how each global batch is shared between the processes, and the checks made before anything runs.

How batches are assigned (so a run over W processes equals a one-process run over the same global
batches): every rank draws the *same* global batches as a one-process run does (it iterates the same seeded
one-process loader of ``--batch-size`` samples, :func:`data.make_loader`), and
rank r takes the r-th contiguous part of each global batch (``torch.tensor_split`` into W parts, so
parts differ by at most one sample). The trainer scales each rank's summed loss by
``W / global batch size``; DDP's gradient average then equals the gradient of the global batch's mean
loss whatever the parts' sizes. torch's ``DistributedSampler`` is not used: it pads the data with
repeated samples and draws its own order, so its runs cannot equal a one-process run.

The same rule shards the passes without gradients (input statistics, evaluation); their sums
(Gram matrices, sample counts, hit counts) are all-reduced. Every part of every batch must hold at
least one sample: :func:`check_world_size` refuses a world size larger than the smallest batch.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

__all__ = ["rank", "world_size", "is_main", "barrier", "init_from_env", "ShardedLoader", "sharded_loader",
           "check_world_size", "all_reduce_sum", "global_batch_sizes"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (one GPU per process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): nccl on GPUs, gloo on
    CPUs. Returns whether a group was started here (the caller then ends it with :func:`destroy`)."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch has no torch.distributed: run a single process")
    device = device_for_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedLoader:
    """This rank's part of each global batch of ``loader`` (a one-process loader): ``tensor_split`` into
    ``world`` contiguous parts along the batch dimension, part ``rank`` of each.

    Every rank iterates the one-process loader itself, so the global batches are those of a one-process run
    by construction (the same seeded order: a DataLoader draws its workers' base seed from the shuffle
    generator before the order, which a separate sampler would not repeat). Each rank loads the whole
    global batch and keeps its part: the data sets here are in-memory tensors, so that costs a copy."""

    def __init__(self, loader: DataLoader, rank: int = 0, world: int = 1) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        # iter() of the loader now, not at the first batch, as iter() of a DataLoader does: each one draws a
        # seed from the shuffle generator, and a caller that calls iter() twice (tqdm.auto does) must move
        # the generator as it moves a one-process loader's, or the order would differ.
        batches = iter(self.loader)
        return ([t.tensor_split(self.world)[self.rank] for t in batch] for batch in batches)

    def __len__(self) -> int:
        return len(self.loader)


def sharded_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, workers: int = 0,
                   pin_memory: bool = False) -> ShardedLoader:
    """This rank's part of each global batch of the one-process loader (see the module's docstring)."""
    from .data import make_loader

    loader = make_loader(dataset, batch_size, shuffle=shuffle, seed=seed, workers=workers, pin_memory=pin_memory)
    return ShardedLoader(loader, rank(), world_size())


def smallest_batch(n: int, batch_size: int) -> int:
    return min(batch_size, n % batch_size or batch_size)


def check_world_size(world: int, datasets: Sequence[tuple[str, int, int]]) -> None:
    """ValueError unless every global batch of every (what, samples, batch size) gives each of ``world``
    processes at least one sample."""
    if world <= 1:
        return
    what, n, b = min(datasets, key=lambda d: smallest_batch(d[1], d[2]))
    small = smallest_batch(n, b)
    if small < world:
        raise ValueError(
            f"world size {world} is larger than the {small} sample(s) of the smallest batch of {what} ({n} samples in "
            f"batches of {b}): each global batch is shared between the processes and every process needs at least "
            f"one sample. Run torchrun with --nproc-per-node {small} or fewer, or change --batch-size / "
            "--train-per-class / --test-per-class")


def all_reduce_sum(values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The elementwise sums over every rank of ``values`` (one collective; dtype and device kept)."""
    if world_size() <= 1 or not values:
        return list(values)
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in values])
    dist.all_reduce(flat)
    out, at = [], 0
    for v in values:
        out.append(flat[at:at + v.numel()].view(v.shape).to(v.dtype))
        at += v.numel()
    return out


def global_batch_sizes(n: int, batch_size: int) -> Iterator[int]:
    """The sizes of the global batches of n samples (all ``batch_size`` but a smaller last one)."""
    for start in range(0, n, batch_size):
        yield min(batch_size, n - start)
