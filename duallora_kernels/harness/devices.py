"""The device a run measures: ``--device`` resolved, its name, slug and sizes for the JSON header,
the data-sheet peaks that turn times into percentages, and what the CPU can do in bfloat16."""
from __future__ import annotations

import os
import platform
import re
from typing import Any

import torch

from ..ops.fused_linear_cost import DevicePeaks, device_peaks

__all__ = ["DevicePeaks", "device_peaks", "peak_key", "resolve_device", "device_info", "device_slug",
           "triton_interpreting", "cpu_bf16_matmul"]


def peak_key(dtype: str) -> str:
    if dtype == "float32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return dtype


def resolve_device(spec: str | None = "auto") -> torch.device:
    """``auto`` -> the current CUDA device if there is one, else the CPU. A CUDA device always
    comes back with its index."""
    if spec in (None, "", "auto"):
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, slug, ceilings and sizes of ``device`` for the JSON header."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        name = props.name
        peaks = device_peaks(name)
        return {
            "type": "cuda",
            "name": name,
            "slug": device_slug(name),
            "capability": f"{props.major}.{props.minor}",
            "total_memory": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
            "l2_cache_bytes": int(getattr(props, "L2_cache_size", 0)) or None,
            "peaks": None if peaks is None else {"source": peaks.name, "flops": peaks.flops, "bandwidth": peaks.bandwidth},
        }
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]  # other work on the machine skews CPU timings
    except OSError:
        load = None
    return {"type": "cpu", "name": cpu, "slug": "cpu", "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "loadavg_at_start": load, "peaks": None}


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    s = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I).lower()
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "device"



def triton_interpreting() -> bool:
    """Whether Triton runs through its CPU interpreter (TRITON_INTERPRET=1, set before launch)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpu_bf16_matmul() -> tuple[bool, str]:
    """Whether this CPU multiplies bfloat16 matrices in hardware, and how that was decided.

    Without it, bfloat16 matmuls run through a float32 emulation 100-400x slower than float32,
    which is why ``--quick`` leaves bfloat16 out there. Decided without timing anything: on x86
    the CPU flags torch (and oneDNN) read, ``avx512_bf16`` or AMX tiles
    (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``); on ARM the ``bf16``
    feature in /proc/cpuinfo; anything else counts as no support.
    """
    cpu = getattr(torch, "cpu", None)
    for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True, f"the CPU has {flag}"
        except Exception:  # a probe that fails says nothing either way
            pass
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as f:
                if any(line.startswith("Features") and "bf16" in line.split(":", 1)[-1].split() for line in f):
                    return True, "the CPU has the ARM bf16 feature"
        except OSError:
            pass
    return False, "the CPU has no bfloat16 matmul instructions (no avx512_bf16, AMX or ARM bf16)"

