"""The GPUs the memory planner knows, by name: memory from the vendor's page (the figure and where
it is written), and what a training process cannot use of it (driver reservation, CUDA context),
which are estimates (said so in every output that uses them).

Memory sizes: NVIDIA writes GDDR and HBM capacities in GB meaning 2^30 bytes (a 24 GB RTX 4090
carries twelve 16 Gbit chips), so ``memory_gb`` is taken as GiB.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GiB", "MiB", "GpuSpec", "GPUS", "DRIVER_RESERVED_FRACTION", "CONTEXT_MIB", "cublas_workspace_bytes",
           "gpu", "parse_gpus"]

GiB = 1 << 30
MiB = 1 << 20

#: Part of the memory the driver keeps (page tables, ECC and firmware areas): cudaMemGetInfo's
#: total is below the marketed size by about this much on the cards we have figures from
#: (e.g. an RTX 4090 reports about 23.65 GiB of 24, an A100 40GB about 39.4 GiB of 40). An estimate.
DRIVER_RESERVED_FRACTION = 0.015

#: The CUDA context of a PyTorch process per compute capability (x10), in MiB: the driver's context
#: with lazy module loading (CUDA 12's default) plus the kernels PyTorch, cuBLAS and Triton load for
#: a ViT step. An estimate (a few hundred MiB, larger on Hopper); the GPU check measures it on the
#: GPU it runs on (total - free - reserved after a step).
CONTEXT_MIB = {80: 500, 86: 400, 89: 400, 90: 600}
_CONTEXT_MIB_OTHER = 600

def cublas_workspace_bytes(arch: int) -> int:
    """The cuBLAS workspace PyTorch allocates through its caching allocator per (handle, stream):
    aten/src/ATen/cuda/CublasHandlePool.cpp, parseChosenWorkspaceSize(): 4096 * 8 * 1024 bytes
    (32 MiB) on compute capability 9.x, 10.x and 12.x, 4096 * 1024 * 2 + 16 * 1024 * 8 otherwise.
    A training step uses two handles (the forward's thread and the autograd engine's)."""
    return 4096 * 8 * 1024 if arch // 10 in (9, 10, 12) else 4096 * 1024 * 2 + 16 * 1024 * 8


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    memory_gb: float
    arch: int  # compute capability x10
    source: str  # where the memory figure is written

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GiB)

    @property
    def driver_reserved_bytes(self) -> int:
        return int(self.memory_bytes * DRIVER_RESERVED_FRACTION)

    @property
    def context_bytes(self) -> int:
        return CONTEXT_MIB.get(self.arch, _CONTEXT_MIB_OTHER) * MiB

    @property
    def usable_bytes(self) -> int:
        """What PyTorch's allocator can get: memory less the driver's part and the CUDA context."""
        return self.memory_bytes - self.driver_reserved_bytes - self.context_bytes

    def as_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "memory_gb": self.memory_gb, "arch": f"sm_{self.arch}",
                "source": self.source, "memory_bytes": self.memory_bytes,
                "driver_reserved_bytes": self.driver_reserved_bytes, "context_bytes": self.context_bytes,
                "usable_bytes": self.usable_bytes}


_GEFORCE = "https://www.nvidia.com/en-us/geforce/graphics-cards/"
GPUS: dict[str, GpuSpec] = {g.key: g for g in (
    GpuSpec("rtx3060-12gb", "GeForce RTX 3060 12GB", 12, 86,
            f"{_GEFORCE}30-series/rtx-3060-3060ti/ (specs: 12 GB GDDR6)"),
    GpuSpec("rtx3090", "GeForce RTX 3090", 24, 86, f"{_GEFORCE}30-series/rtx-3090-3090ti/ (specs: 24 GB GDDR6X)"),
    GpuSpec("rtx4060-8gb", "GeForce RTX 4060", 8, 89, f"{_GEFORCE}40-series/rtx-4060-4060ti/ (specs: 8 GB GDDR6)"),
    GpuSpec("rtx4060ti-16gb", "GeForce RTX 4060 Ti 16GB", 16, 89,
            f"{_GEFORCE}40-series/rtx-4060-4060ti/ (specs: 16 GB GDDR6)"),
    GpuSpec("rtx4070", "GeForce RTX 4070", 12, 89, f"{_GEFORCE}40-series/rtx-4070-family/ (specs: 12 GB GDDR6X)"),
    GpuSpec("rtx4080", "GeForce RTX 4080", 16, 89, f"{_GEFORCE}40-series/rtx-4080-family/ (specs: 16 GB GDDR6X)"),
    GpuSpec("rtx4090", "GeForce RTX 4090", 24, 89, f"{_GEFORCE}40-series/rtx-4090/ (specs: 24 GB GDDR6X)"),
    GpuSpec("a100-40gb", "A100 40GB", 40, 80,
            "https://www.nvidia.com/en-us/data-center/a100/ (specifications: GPU memory 40GB HBM2)"),
    GpuSpec("a100-80gb", "A100 80GB", 80, 80,
            "https://www.nvidia.com/en-us/data-center/a100/ (specifications: GPU memory 80GB HBM2e)"),
    GpuSpec("h100-80gb", "H100 SXM 80GB", 80, 90,
            "https://www.nvidia.com/en-us/data-center/h100/ (specifications, H100 SXM: GPU memory 80GB)"),
    GpuSpec("h200", "H200 141GB", 141, 90,
            "https://www.nvidia.com/en-us/data-center/h200/ (specifications: GPU memory 141GB HBM3e)"),
)}


def gpu(name: str) -> GpuSpec:
    """The known GPU ``name`` (case and spaces ignored); a clear error listing the known ones."""
    key = name.strip().lower().replace(" ", "")
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def parse_gpus(spec: list[str]) -> list[GpuSpec]:
    if not spec:
        raise ValueError(f"--gpus needs at least one GPU; known: {', '.join(GPUS)}")
    return list(dict.fromkeys(gpu(s) for s in spec))
