"""Helpers shared by the Triton kernels' launchers, in plain Python and torch.

Kept in one place so that every op agrees on things that are easy to get subtly different: how
a strided input is addressed, how outputs are allocated (poisoned on request, so a test sees an
element no program wrote), which ``tl.dot`` mode a dtype takes (TF32 policy; the interpreter's
bfloat16 gap), how launches are observed and which GPU arch configs are pruned for. Nothing here
imports triton: the torch backend (launchers.py, registered.py) uses it where triton is not
installed. The device functions the kernels call are :mod:`._triton_functions`.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

#: Set to "1" (the tests do) to fill every output buffer a kernel stores into with NaN before the
#: launch: an element no program writes then fails the comparison instead of passing by luck.
#: Off by default because the fill is one more full write of each output.
POISON_ENV = "DUALLORA_POISON_OUTPUTS"


#: Set to "0" to give every kernel one fixed config on a GPU instead of autotuning over its list
#: of configs (each op module's ``_configs`` names the fixed one), or to N >= 1 to autotune over the
#: first N configs that the per-arch pruning keeps (the GPU script's "at most two configs per
#: kernel"); unset: every config the pruning keeps. Autotuning compiles and times every config for
#: each new autotuning key, which is right for real runs and far too slow for a test suite of many
#: small shapes (bench/run_gpu.sh sets it). Read when the op modules are imported (the config
#: lists are fixed when the kernels are decorated) and when configs are pruned.
AUTOTUNE_ENV = "DUALLORA_AUTOTUNE"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (one small fixed config then)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotuning() -> bool:
    """False when ``DUALLORA_AUTOTUNE=0``: compiled kernels run their one fixed config."""
    return autotune_limit() != 0


def autotune_limit() -> int | None:
    """``DUALLORA_AUTOTUNE`` as a number of configs: 0 = the fixed one, N = the first N kept by
    pruning, None (unset or empty) = all of them."""
    raw = os.environ.get(AUTOTUNE_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"{AUTOTUNE_ENV}={raw!r}: use 0 (one fixed config), N >= 1 (the first N configs) or leave it unset")
    return int(raw)


def first_configs(configs: list) -> list:
    """The first ``DUALLORA_AUTOTUNE=N`` of a pruner's configs (all of them when it is unset)."""
    n = autotune_limit()
    return configs[:n] if n else configs


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output buffer that a kernel writes in full: empty, or NaN-filled when poisoning is on."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_mode(dtype: torch.dtype) -> str:
    """The ``MODE`` of :func:`._triton_functions.mma` for operands of ``dtype``.

    fp32 operands use TF32 only where torch's own matmuls may
    (``torch.set_float32_matmul_precision("high")``), so the kernels keep cuBLAS's contract.
    Under the interpreter bfloat16 tiles are multiplied in float32 ("upcast"): the interpreter
    keeps bfloat16 as raw uint16 bits and its ``tl.dot`` multiplies those bits
    (triton-lang/triton#11584, not supported upstream). The products of bfloat16 values are
    exact in float32, so this matches a GPU's bf16 MMA with float32 accumulation.
    """
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def pow2_at_least(value: int, floor: int = 16) -> int:
    """The padded block extent for a small dimension: ``tl.dot`` wants powers of two >= 16."""
    p = floor
    while p < value:
        p *= 2
    return p


def size_bucket(value: int) -> int:
    """A coarse autotuning key for the row count, so every batch size does not retune."""
    return pow2_at_least(max(value, 1), 16) if value <= 4096 else 8192


class RowsView(NamedTuple):
    """A tensor (..., d) seen as m rows: ``t`` is what the kernel gets, ``addressing`` the four
    ints :func:`._triton_functions.row_offsets` and the column stride need (see :func:`rows_view`)."""

    t: Tensor
    m: int
    rows_per_batch: int
    stride_batch: int
    stride_row: int
    stride_col: int

    @property
    def addressing(self) -> tuple[int, int, int, int]:
        return self.rows_per_batch, self.stride_batch, self.stride_row, self.stride_col


def rows_view(x: Tensor) -> RowsView:
    """Address the rows of ``x`` (..., d) without copying it.

    Element ``(i, k)`` of ``x.reshape(-1, d)`` sits at ``t.data_ptr()`` plus
    ``(i // rows_per_batch) * stride_batch + (i % rows_per_batch) * stride_row + k * stride_col``
    elements. This covers every 2-D view and every view whose leading dimensions collapse into
    one (a transposed (B, L, d) tensor, a token slice, an expanded gradient); anything else is
    copied once into a contiguous tensor.
    """
    d = x.shape[-1]
    m = math.prod(x.shape[:-1])
    try:
        v = x.view(-1, d) if d else x.reshape(m, 0)
        return RowsView(v, m, max(m, 1), 0, v.stride(0), v.stride(1))
    except RuntimeError:
        pass
    if x.dim() >= 3:
        try:
            v = x.view(-1, x.shape[-2], d)
            return RowsView(v, m, max(v.shape[1], 1), v.stride(0), v.stride(1), v.stride(2))
        except RuntimeError:
            pass
    v = x.reshape(m, d).contiguous()
    return RowsView(v, m, max(m, 1), 0, v.stride(0), v.stride(1))


# ---------------------------------------------------------------------------------- launches
#: Every Triton launch of the op modules goes through :func:`launch`, so that a launch can be
#: observed without a GPU: :mod:`duallora_kernels.opcount` counts them (the cost contract's
#: device-op budget), and the ahead-of-time compile check captures a launch's real arguments
#: instead of running it. An observer is ``fn(kernel, grid, args, kwargs) -> bool``; it returns
#: True to skip the launch (capture).
_launch_observers: list = []


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, seen by the observers registered in :func:`observe_launches`."""
    skip = False
    for observe in list(_launch_observers):
        skip = bool(observe(kernel, grid, args, kwargs)) or skip
    if skip:
        return
    if interpreting():
        from .._versions import check_interpreter_numpy

        check_interpreter_numpy()  # one clear line instead of a TypeError at the kernel's first loop
    if _launch_observers and interpreting():
        # The interpreter copies arguments with torch ops of its own; those are not the op's
        # device work (a compiled kernel is one launch), so an observing dispatch mode must not see them.
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            kernel[grid](*args, **kwargs)
        return
    kernel[grid](*args, **kwargs)


class observe_launches:
    """Context manager: ``observer(kernel, grid, args, kwargs)`` sees every :func:`launch` within.

    ``capture=True`` declares that the observer skips launches (returns True): the ops then accept
    CPU tensors for ``backend="triton"`` without the interpreter, since nothing runs (used to
    record real launch arguments for the ahead-of-time compile check)."""

    def __init__(self, observer, capture: bool = False) -> None:
        self.observer = observer
        self.capture = capture

    def __enter__(self):
        _launch_observers.append(self.observer)
        if self.capture:
            _capturing.append(self.observer)
        return self.observer

    def __exit__(self, *exc) -> None:
        _launch_observers.remove(self.observer)
        if self.capture:
            _capturing.remove(self.observer)


_capturing: list = []


def capturing() -> bool:
    """True inside ``observe_launches(..., capture=True)``: launches are recorded, not run."""
    return bool(_capturing)


# ---------------------------------------------------------------------------------- GPU archs
#: Opt-in shared memory per block (bytes) by compute capability (CUDA programming guide, table
#: "Technical Specifications per Compute Capability"): A100 163 KB, RTX 3090/4090 99 KB, H100/H200 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: The archs every kernel is compiled and resource-checked for (tests/test_aot_compile.py).
ARCHS = (90, 89, 86, 80)
_arch_override: list[int] = []


class target_arch:
    """Context manager: the kernels' config pruners (``prune_configs_by``) target compute capability ``cap``
    (e.g. 86) instead of the current CUDA device; how the compile check prunes for a GPU it lacks."""

    def __init__(self, cap: int) -> None:
        self.cap = int(cap)

    def __enter__(self) -> int:
        _arch_override.append(self.cap)
        return self.cap

    def __exit__(self, *exc) -> None:
        _arch_override.pop()


def current_arch() -> int:
    """The compute capability configs are pruned for: :class:`target_arch`'s, else the current
    CUDA device's, else 90 (Hopper)."""
    if _arch_override:
        return _arch_override[-1]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def smem_limit(cap: int) -> int:
    """Shared memory a block may use on compute capability ``cap`` (the nearest known arch below)."""
    known = [c for c in sorted(SMEM_LIMIT) if c <= cap]
    return SMEM_LIMIT[known[-1]] if known else 48 * 1024


def kernel_name(kernel) -> str:
    """The Python name of a (possibly autotuned / interpreted) Triton kernel."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", type(kernel).__name__)
