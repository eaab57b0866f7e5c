"""The Triton designs of the fused DualLoRA linear (the contract of
:func:`duallora_kernels.ops.dual_lora_linear`; the method in docs/method.md) and how a call picks one.

The op is ``Y = X W0^T + b + ((X A^T) .* S) B^T`` with ``A = [A_o; A_frozen; A_r]`` (r, d), ``B``
(n, r) and the per-row, per-column scale ``S`` (orth_scale on the orthogonal columns,
``res_scale * gate[row, block]`` on the residual ones). ``A`` and ``B^T`` are assembled, with the
memory projections, by the small kernels of :mod:`.adapter_prep`; the gate is read inside the
kernels through its own strides (a per-sample gate broadcast over tokens is never copied).

Three designs, one contract (:class:`.launchers.Launchers`), all tested against the float64 spec:

* ``"single"`` (:mod:`.fused_linear_single`): one kernel per pass. The forward's K-loop also
  accumulates ``T = X A^T`` beside the output tile, the backward's N-loop ``dY B``: X and dY are
  each read once, but every n-tile (d-tile) recomputes its row block's T (dY B) -- R_PAD/BLOCK_N
  more tensor-core work -- and the second accumulator crowds the tile down (64-row tiles at R_PAD
  >= 128, short K-steps on sm_8x).
* ``"split"`` (:mod:`.fused_linear_split`): the low-rank products first, in skinny memory-bound
  passes (S = (X A^T) .* scale; U = (dY B) .* scale), then GEMMs whose main loop is a plain GEMM
  with the low-rank term as a K-extension (``[X | S] [W0 | B]^T``, ``[dY | U] [W0 ; A]``): the
  arch's GEMM-class tiles fit at every rank, at the price of one more read of X (forward) and
  of dY (backward) and one more launch each way.
* ``"tma"`` (:mod:`.fused_linear_tma`): the split design with its two GEMMs loading tiles through
  Hopper's tensor descriptors (TMA) on a persistent grid, where the call allows (row-major
  operands, dims and rank multiples of 8, bf16/fp16, sm_90); the split design's pointer GEMMs elsewhere.

What each design pays, on paper (:mod:`.fused_linear_cost`: an estimate from the tiles the sm_90
lists keep, not a measurement; ``python -m duallora_kernels.ops.fused_linear_cost`` prints the
table and tests/test_design_choice.py holds it to the code). ViT-B/16 at batch 64 (m = 12,608),
bf16, costed on an H100 SXM; r = the stacked rank; times in microseconds for one training step.
The split design pays in bytes (one more read of X forward and of dY backward: MB, and us at 85%
of the bandwidth); the single design in tensor-core work (the recomputed low-rank products: GFLOP,
and us at its tiles' efficiency) and in the smaller tiles its second accumulator leaves room for
(the first kept tile, forward then backward); then each design's whole step and the one "auto"
takes:

    =====  ==  ===============  ================  =====================  =====================  =========  ========  ======
    layer  r   split pays (us)  single pays (us)  single tiles           split tiles            single us  split us  auto
    =====  ==  ===============  ================  =====================  =====================  =========  ========  ======
    qkv    16  77 MB, 27.2      7.1 GF, 10.3      128x256x64 128x128x64  128x256x64 128x256x64  170        177       single
    qkv    64  77 MB, 27.2      28.5 GF, 41.2     128x256x64 128x128x64  128x256x64 128x256x64  229        193       split
    proj   16  39 MB, 13.6      2.2 GF, 3.1       128x256x64 128x128x64  128x256x64 128x256x64  73         80        single
    proj   64  39 MB, 13.6      8.7 GF, 12.5      128x256x64 128x128x64  128x256x64 128x256x64  98         89        split
    fc1    16  97 MB, 34.0      9.6 GF, 13.9      128x256x64 128x128x64  128x256x64 128x256x64  219        225       single
    fc1    64  97 MB, 34.0      38.4 GF, 55.5     128x256x64 128x128x64  128x256x64 128x256x64  294        245       split
    fc2    16  97 MB, 34.0      9.6 GF, 13.9      128x256x64 128x128x64  128x256x64 128x256x64  223        225       single
    fc2    64  97 MB, 34.0      38.4 GF, 55.5     128x256x64 128x128x64  128x256x64 128x256x64  312        245       split
    =====  ==  ===============  ================  =====================  =====================  =========  ========  ======

Which one runs (``design="auto"``, the default; ``DUALLORA_DESIGN`` overrides it, the ``design``
argument of :func:`duallora_kernels.ops.dual_lora_linear` overrides both): a design measured faster
on the device's compute capability (:data:`MEASURED`, empty until a GPU run has compared them --
bench/run_gpu.sh's headline step does), else the one the estimate of
:mod:`.fused_linear_cost` favours for this layer's shape and padded rank. float64 runs the torch
launchers whatever the design.

Device operations of one training step (the cost contract; tests/test_cost_contract.py counts
them): single = 3 forward (coefficients ``[C_o; C_r] M``, assembly of A and B^T, the fused kernel)
+ 4 backward (the B^T rebuild that also clears the float32 gradient sums, the fused kernel,
coefficients ``[dA_o; dA_r] M``, the projection/cast of every adapter gradient): 7; split and tma
= 4 forward (coefficients, assembly, the low-rank pass, the GEMM) + 4 backward (the low-rank pass
that also clears the sums, the GEMM, coefficients, projection; B^T is kept from forward): 8.
Without a basis (task 1) each has one coefficients launch fewer each way. Nothing reads a device
value on the host.
"""
from __future__ import annotations

import os

import torch

from .launchers import Launchers

__all__ = ["DESIGNS", "DESIGN_ENV", "MEASURED", "resolve_design", "launchers_for"]

DESIGNS = ("auto", "single", "split", "tma")
#: Environment variable that sets the design of every call that leaves ``design="auto"``.
DESIGN_ENV = "DUALLORA_DESIGN"
#: (compute capability x10, padded-rank bucket) -> the design a GPU run measured fastest there
#: (bench/run_gpu.sh's headline step times fused_single / fused_split / fused_tma side by side;
#: ``run_gpu.sh --collect`` regenerates ops/fused_linear_measured.py from what came back). Empty
#: until one has run: :mod:`.fused_linear_cost`'s estimate decides meanwhile.
from .fused_linear_measured import MEASURED  # noqa: E402


def resolve_design(design: str, *, n: int, d: int, r: int, dtype: torch.dtype, device: torch.device) -> str:
    """The concrete design ("single", "split" or "tma") of a call; ``design`` is one of
    :data:`DESIGNS`. Depends only on static facts (the layer's shape, the stacked rank, the
    dtype, the device), never on the batch, so forward and backward agree and a compiled graph
    does not specialise on the token count."""
    from .. import _checks as check

    check.choice("design", design, DESIGNS)
    if design == "auto":
        env = os.environ.get(DESIGN_ENV, "").strip() or "auto"
        check.choice(DESIGN_ENV, env, DESIGNS)
        design = env
    if design != "auto":
        return design
    from ._kernel_utils import current_arch
    from .fused_linear_cost import favoured_design

    from ._kernel_utils import pow2_at_least
    from .fused_linear_tiles import rank_bucket

    cap = current_arch()  # the device's (CPU tensors: the interpreter; costed as Hopper)
    measured = MEASURED.get((cap, rank_bucket(pow2_at_least(r))))
    if measured is not None and dtype != torch.float32:  # measured in bf16: float32 runs other tiles
        return measured
    return favoured_design(n=n, d=d, r=r, dtype=dtype, cap=cap)


def launchers_for(design: str) -> Launchers:
    """The Triton launchers of a concrete design."""
    if design == "single":
        from .fused_linear_single import TRITON_SINGLE

        return TRITON_SINGLE
    if design == "split":
        from .fused_linear_split import TRITON_SPLIT

        return TRITON_SPLIT
    if design == "tma":
        from .fused_linear_tma import TRITON_TMA

        return TRITON_TMA
    raise ValueError(f"design must be 'single', 'split' or 'tma', got {design!r}")
