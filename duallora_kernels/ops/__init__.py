"""Public functional ops: validate, pick a backend, run.

Backends: ``"torch"`` (torch ops, :data:`.launchers.TORCH`; the CPU path), ``"triton"`` (fused
kernels; on CPU tensors only under ``TRITON_INTERPRET=1``), ``"cuda"`` (the optional extension
built from csrc/) and ``"auto"`` (Triton for CUDA tensors -- or the CUDA backend on the compute
capabilities of :data:`CUDA_FASTER_ON`, none yet -- torch otherwise). Every backend of the
linear op runs through one op registered with ``torch.library`` (:mod:`.registered`), so
torch.compile, torch.export, autocast and meta tensors see it like an aten op; the spec all of
them are tested against is :mod:`.reference`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import torch
from torch import Tensor

from .. import _checks as check
from .reference import gram_reference, task_scores_reference
from .saved_input import SAVED_X

__all__ = ["BACKENDS", "resolve_backend", "autocast_dtype", "autocast_off", "dual_lora_linear", "gram", "task_scores"]

BACKENDS = ("auto", "triton", "torch", "cuda")
#: Compute capabilities (major, minor) on which ``backend="auto"`` takes the CUDA C++ backend: those
#: where a measurement (``duallora bench``'s cuda variant) found it faster than Triton. Empty until
#: one has run: Triton everywhere meanwhile, and Triton stays Hopper's (sm_90) default regardless.
CUDA_FASTER_ON: frozenset[tuple[int, int]] = frozenset()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"cuda"``) for tensors on ``device``."""
    check.choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type != "cuda" or not _triton_available():
            return "torch"
        if CUDA_FASTER_ON and torch.cuda.get_device_capability(device) in CUDA_FASTER_ON:
            return "cuda"
        return "triton"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        from ._kernel_utils import capturing

        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1" and not capturing():
            raise RuntimeError(
                f"backend='triton' got tensors on {device}: Triton runs on CUDA tensors, or on the CPU "
                "when TRITON_INTERPRET=1 is set before triton is first imported"
            )
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    return backend


def _backend_for(backend: str, device: torch.device) -> str:
    """:func:`resolve_backend`, except that meta tensors run the torch ops under any valid backend name:
    they carry shapes and dtypes, no data, and torch's ops (the registered op's fake implementation for
    the linear op) compute exactly those."""
    if device.type == "meta":
        check.choice("backend", backend, BACKENDS)
        return "torch"
    return resolve_backend(backend, device)


def _check_basis(basis: Tensor, d: int, ref: Tensor, on_device: bool) -> Tensor | None:
    check.tensor("basis", basis, ndim=2)
    check.shape("basis", basis, (d, None), "(d, k): k orthonormal columns in the input space")
    check.same_device("basis", basis, ref, "x")
    if basis.shape[1] == 0:
        return None
    if basis.shape[1] > d:
        raise ValueError(f"basis has {basis.shape[1]} columns but can span at most d={d} dimensions")
    if on_device:
        check.orthonormal_once("basis", basis)
    return basis


#: What autocast casts (float64 is left alone, as autocast leaves it for F.linear).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes linear layers in on ``device`` right now, or None when it is off."""
    try:
        on = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        return None
    return torch.get_autocast_dtype(device.type) if on else None


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device`` (nothing to do when it is off already).

    The memory's arithmetic -- Gram matrices, task scores, M^T M, projections onto span(M) -- runs in
    its own float32/float64 whatever the caller's autocast state: in bfloat16 an orthonormal basis
    moves by ~1e-3 and fails its own check."""
    return torch.autocast(device.type, enabled=False) if autocast_dtype(device) else contextlib.nullcontext()


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if t is None or t.dtype == dtype or t.dtype not in _AUTOCAST_ELIGIBLE:
        return t
    return t.to(dtype)


def _check_pair(prefix: str, a: Tensor | None, b: Tensor | None, x: Tensor, n: int, d: int,
                own_dtype: bool = False) -> int:
    """Check an (A, B) adapter pair; returns its rank (0 when absent). ``own_dtype`` (under
    autocast): the factors may keep a dtype autocast would cast instead of x's."""
    if (a is None) != (b is None):
        raise ValueError(f"{prefix}_a and {prefix}_b must be given together (got only one of them)")
    if a is None:
        return 0
    check.tensor(f"{prefix}_a", a, ndim=2)
    check.tensor(f"{prefix}_b", b, ndim=2)
    for name, t in ((f"{prefix}_a", a), (f"{prefix}_b", b)):
        check.same_device(name, t, x, "x")
        if not (own_dtype and t.dtype in _AUTOCAST_ELIGIBLE):
            check.same_dtype(name, t, x, "x")
    r = a.shape[0]
    if r < 1 and prefix != "frozen":
        raise ValueError(f"{prefix}_a must have at least one row (rank >= 1), got shape {tuple(a.shape)}")
    check.shape(f"{prefix}_a", a, (r, d), f"(rank, d) with d={d} the input features")
    check.shape(f"{prefix}_b", b, (n, r), f"(n, rank) with n={n} the output features and rank={r} from {prefix}_a")
    return r


def dual_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    orth_a: Tensor | None = None,
    orth_b: Tensor | None = None,
    res_a: Tensor | None = None,
    res_b: Tensor | None = None,
    frozen_a: Tensor | None = None,
    frozen_b: Tensor | None = None,
    gate: Tensor | None = None,
    basis: Tensor | None = None,
    orth_scale: float = 1.0,
    res_scale: float = 1.0,
    backend: str = "auto",
    check_basis: bool = True,
    design: str = "auto",
    saved_x: str = "exact",
) -> Tensor:
    """One DualLoRA linear layer (docs/method.md)::

        Y = x W0^T + b + s_o (x A_o^T) B_o^T + s_r ((x A_R^T) .* G) B_R^T

    Args:
        x: input (..., d); any float dtype; need not be contiguous.
        weight: the frozen pre-trained weight W0 (n, d), same dtype and device as x.
        bias: (n,) or None.
        orth_a: C_o (r_o, d), the trainable tensor of the orthogonal adapter. The op uses
            A_o = C_o (I - M M^T), so its gradient is projected out of span(M).
        orth_b: B_o (n, r_o).
        res_a: C_r (r_r, d), the residual block being trained. The op uses A_r = C_r M M^T,
            so its gradient is projected onto span(M). Needs a non-empty ``basis``.
        res_b: B_r (n, r_r).
        frozen_a: earlier tasks' residual blocks stacked (F * r_r, d), used as stored. They
            must not require grad: frozen blocks get no gradient and cost nothing in backward.
        frozen_b: (n, F * r_r).
        gate: per-row task gates, shape broadcastable to x.shape[:-1] + (G,) with G the number
            of residual blocks (frozen blocks in order, then the training block). Block j's
            r_r columns are scaled by ``res_scale * gate[..., j]``. None means all ones. Gates
            are not differentiated.
        basis: the memory M (d, k) with orthonormal columns; None or k = 0 means empty
            (task 1). Any float dtype; projections are formed in at least float32. It is a
            constant of the op: it gets no gradient (in every backend), even if it requires one.
        orth_scale: s_o. res_scale: s_r.
        backend: "auto" | "triton" | "torch" | "cuda" (see :func:`resolve_backend`).
        check_basis: verify ``M^T M = I`` on the device (``torch._assert_async``: no host
            synchronisation; on a GPU a failure is a device-side assert, on the CPU a RuntimeError)
            once per version of the basis tensor: the first call that sees it pays the check's
            eight small device ops, later calls with the same unchanged tensor pay nothing. A new
            tensor, an in-place change (on it, a view or a ``.detach()`` of it) or a ``.data = ...``
            swap is checked again; a write through ``basis.data`` bypasses the version counter
            (as it does autograd's checks) and is not seen. Under torch.compile / FakeTensors the
            check is part of every traced call. Callers that validate the basis where it is made
            pass False: :class:`duallora_kernels.nn.DualLoRALinear` checks it in ``end_task`` and
            ``load_state_dict``.
        design: which Triton design runs (backend "triton"): "auto" (a design measured faster on
            this GPU, else the one :mod:`.fused_linear_cost`'s estimate favours; the
            ``DUALLORA_DESIGN`` environment variable sets it for every call left at "auto"),
            "single" (one kernel per pass), "split" (skinny low-rank passes, then plain GEMMs with a
            K-extension) or "tma" (split, its GEMMs on Hopper's tensor descriptors where the call
            allows). Same numbers, different speed: :mod:`duallora_kernels.ops.fused_linear`.
        saved_x: how x is kept for backward when only the gradient of A needs it: ``"exact"`` (default)
            or ``"float8"`` (e4m3 codes and a float32 scale per row: 1 byte per element plus 4 per row;
            dA sees the rounding, Y, dX and dB do not; :mod:`duallora_kernels.ops.saved_input`). With A
            factors that do not require grad x is not kept at all, whatever this says.

    Returns:
        Y (..., n) in x's dtype.

    Under ``torch.autocast`` the op computes as ``F.linear`` is cast: x, weight and bias
    (float32/float16/bfloat16) are cast to the autocast dtype, the kernels run on low-precision
    operands and Y comes out in the autocast dtype. The adapter factors are not cast by separate
    ops: the step that assembles A and B^T anyway reads them in their own dtype and writes A and
    B^T in the autocast dtype (one rounding, after the projections), and the gradient projection
    writes each factor's gradient in its own dtype -- one rounding where casting first makes two,
    and none of the 4 cast launches forward and 4 backward that casting the factors would add. The gate and the basis
    are not cast (the kernels read them in float32). Outside autocast every tensor but the gate
    and the basis must share x's dtype, the rule of ``nn.Linear``, which raises for a bfloat16
    input and float32 weights: a TypeError that names the tensor.
    """
    check.choice("saved_x", saved_x, SAVED_X)
    cast = autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if cast is not None:
        x, weight, bias = (_autocast(t, cast) for t in (x, weight, bias))
        # The adapters stay as given (the docstring); a float64 factor is left to fail the dtype
        # check, as autocast leaves float64 to fail F.linear.
        with torch.autocast(x.device.type, enabled=False):
            return _checked_op(x, weight, bias, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis,
                               orth_scale, res_scale, backend, check_basis, design, adapters_own_dtype=True,
                               saved_x=saved_x)
    return _checked_op(x, weight, bias, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis, orth_scale,
                       res_scale, backend, check_basis, design, adapters_own_dtype=False, saved_x=saved_x)


def _checked_op(x, weight, bias, orth_a, orth_b, res_a, res_b, frozen_a, frozen_b, gate, basis, orth_scale,
                res_scale, backend, check_basis, design, *, adapters_own_dtype: bool, saved_x: str) -> Tensor:
    """:func:`dual_lora_linear` after autocast: validate, then run the registered op."""
    check.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d)")
    check.tensor("weight", weight, ndim=2)
    check.same_device("weight", weight, x, "x")
    check.same_dtype("weight", weight, x, "x")
    n, d = weight.shape
    if x.shape[-1] != d:
        raise ValueError(f"x's last dimension must equal weight's in_features {d}, got x of shape {tuple(x.shape)}")
    if bias is not None:
        check.tensor("bias", bias, ndim=1)
        check.shape("bias", bias, (n,), f"(n,) with n={n} the output features")
        check.same_device("bias", bias, x, "x")
        check.same_dtype("bias", bias, x, "x")
    orth_scale = check.finite("orth_scale", orth_scale)
    res_scale = check.finite("res_scale", res_scale)
    _check_pair("orth", orth_a, orth_b, x, n, d, adapters_own_dtype)
    r_train = _check_pair("res", res_a, res_b, x, n, d, adapters_own_dtype)
    r_frozen = _check_pair("frozen", frozen_a, frozen_b, x, n, d, adapters_own_dtype)
    if frozen_a is not None and (frozen_a.requires_grad or frozen_b.requires_grad):
        raise ValueError("frozen_a / frozen_b must not require grad: pass the training block as res_a / res_b")
    if basis is not None:
        basis = _check_basis(basis, d, x, on_device=check_basis and x.device.type != "meta")
        if basis is not None:
            basis = basis.detach()
    if res_a is not None and basis is None:
        raise ValueError("res_a (a training residual block) needs a non-empty basis: it lives in span(M)")
    gate2 = None
    r_resid = r_train + r_frozen
    if gate is not None:
        check.tensor("gate", gate)
        check.same_device("gate", gate, x, "x")
        if gate.dim() < 1:
            raise ValueError("gate must have a last dimension G (one column per residual block)")
        blocks = gate.shape[-1]
        if r_resid == 0 and blocks == 0:
            gate = None
        else:
            if blocks < 1 or r_resid % blocks or (r_train and r_train != r_resid // blocks):
                raise ValueError(
                    f"gate has {blocks} columns but the residual blocks have {r_frozen} frozen + {r_train} training "
                    f"rows: gate needs one column per block of equal rank"
                )
            try:
                # A broadcast view, never a copy: the kernels read it through its strides.
                gate2 = gate.detach().expand(*x.shape[:-1], blocks)
            except RuntimeError:
                raise ValueError(
                    f"gate of shape {tuple(gate.shape)} does not broadcast to x's rows {tuple(x.shape[:-1])} + ({blocks},)"
                ) from None
    from .fused_linear import DESIGNS

    check.choice("design", design, DESIGNS)
    impl = _dual_lora_impl(_backend_for(backend, x.device), design)
    return impl(
        x, weight, bias,
        orth_a=orth_a, orth_b=orth_b, res_a=res_a, res_b=res_b, frozen_a=frozen_a, frozen_b=frozen_b,
        gate=gate2, basis=basis, orth_scale=orth_scale, res_scale=res_scale, saved_x=saved_x,
    )


def _dual_lora_impl(backend: str, design: str) -> Callable[..., Tensor]:
    # Every backend runs the one registered op (its argument list: ops/registered.py); the
    # backend (and, for Triton, the design) only picks the launchers inside it.
    from .registered import dual_lora_linear_op

    return functools.partial(dual_lora_linear_op, backend=backend, design=design)


def gram(x: Tensor, *, backend: str = "auto") -> Tensor:
    """``x^T x`` (d, d) over all rows of x (..., d): one streaming pass, float32 accumulation
    (float64 for float64 input). Used to collect a layer's input statistics for its bases."""
    check.tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., d)")
    with autocast_off(x.device):  # statistics for the memory bases stay in float32 under autocast
        return _gram(x, _backend_for(backend, x.device))


def _gram(x: Tensor, b: str) -> Tensor:
    if b == "torch":
        return gram_reference(x)
    if b == "triton":
        from .fused_gram import gram_triton

        return gram_triton(x)
    from .cuda import gram_cuda

    return gram_cuda(x)


def task_scores(z: Tensor, task_bases: Tensor, *, backend: str = "auto") -> Tensor:
    """Normalised projection energies ``||U_t^T z||^2 / ||z||^2`` of summaries z (b, d) against
    every task's orthonormal basis U_t, stacked as ``task_bases`` (T, d, u). Returns (b, T)
    in [0, 1], float32 (float64 for float64 input); all tasks in one launch."""
    check.tensor("z", z, ndim=2)
    check.tensor("task_bases", task_bases, ndim=3)
    check.same_device("task_bases", task_bases, z, "z")
    if task_bases.shape[1] != z.shape[1]:
        raise ValueError(
            f"task_bases must have shape (T, d, u) with d={z.shape[1]} matching z, got {tuple(task_bases.shape)}"
        )
    with autocast_off(z.device):  # the scores feed a softmax over tasks: float32 under autocast too
        return _task_scores(z, task_bases, _backend_for(backend, z.device))


def _task_scores(z: Tensor, task_bases: Tensor, b: str) -> Tensor:
    if b == "torch":
        return task_scores_reference(z, task_bases)
    if b == "triton":
        from .fused_scores import task_scores_triton

        return task_scores_triton(z, task_bases)
    from .cuda import task_scores_cuda

    return task_scores_cuda(z, task_bases)
