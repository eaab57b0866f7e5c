"""The memory of DualLoRA (docs/method.md, "Memory" and "Dynamic memory"): input statistics, bases,
projections, task scores and gates.

Nothing here knows about layers or training loops: functions take Gram matrices and bases
and return bases, scores and gates.

* :class:`GramAccumulator` streams a layer's inputs into two d x d Gram matrices (all tokens,
  for the memory basis M; one summary vector per sample, for the per-task bases U_t), so any
  number of tokens fits in d x d memory.
* :func:`extend_basis` is GPM's energy criterion: append the fewest new directions (orthogonal
  to M) that bring the captured energy of the task's inputs to the threshold.
* :func:`principal_directions` gives the adapters' initial rows (InfLoRA-style) and U_t.
* :func:`task_gates` turns task scores into gates (temperature softmax, or hard one-hot).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _checks as check
from .ops import gram as _gram
from .ops import task_scores as _task_scores
from .ops.reference import project_onto, project_out

__all__ = [
    "GramAccumulator",
    "InputStats",
    "check_finite_stats",
    "all_reduce_stats",
    "threshold_schedule",
    "threshold_for_task",
    "principal_directions",
    "extend_basis",
    "captured_energy",
    "project_out",
    "project_onto",
    "summarize",
    "task_scores",
    "task_gates",
]

SUMMARIES = ("cls", "mean")


def summarize(x: Tensor, how: str = "cls") -> Tensor:
    """One summary vector per sample: the class token (``"cls"``) or the mean token (``"mean"``)
    of x (B, N, d); rows of a 2-D x are samples already; a 1-D x is one sample."""
    check.choice("how", how, SUMMARIES)
    if x.dim() <= 2:
        return x.reshape(-1, x.shape[-1])
    x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    return x3[:, 0] if how == "cls" else x3.mean(1)


class InputStats:
    """Gram matrices of one layer's inputs over a task: ``tokens`` = sum of x x^T over every
    token row, ``summary`` = sum of z z^T over per-sample summaries; float64, d x d."""

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        self.dim = check.rank("dim", dim)
        self.tokens = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.summary = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.token_count = 0
        self.summary_count = 0

    def __repr__(self) -> str:
        return f"InputStats(dim={self.dim}, tokens={self.token_count}, samples={self.summary_count})"


def all_reduce_stats(stats: "dict[str, InputStats]") -> None:
    """Sum the statistics of every process (``torch.distributed`` all-reduce, in place), so that each rank
    holds the statistics of the whole data and builds identical bases; nothing happens without a process
    group of more than one rank. One collective for every layer, in the order of the sorted names (the
    same on every rank); counts travel as float64 (exact below 2**53)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not stats:
        return
    names = sorted(stats)
    device = stats[names[0]].tokens.device
    parts = [t.reshape(-1) for n in names for t in (stats[n].tokens, stats[n].summary)]
    counts = torch.tensor([c for n in names for c in (stats[n].token_count, stats[n].summary_count)],
                          dtype=torch.float64, device=device)
    flat = torch.cat([*(p.to(device) for p in parts), counts])
    dist.all_reduce(flat)
    at = 0
    for n in names:
        s = stats[n]
        for attr in ("tokens", "summary"):
            size = s.dim * s.dim
            setattr(s, attr, flat[at:at + size].view(s.dim, s.dim).to(getattr(s, attr).device).clone())
            at += size
    for n in names:
        s = stats[n]
        s.token_count, s.summary_count = int(flat[at].item()), int(flat[at + 1].item())
        at += 2


def check_finite_stats(stats: InputStats, *, layer: str, task: int | None = None, when: str = "") -> None:
    """Raise ValueError naming ``layer`` (and ``task``) when ``stats`` hold NaN or inf.

    A non-finite Gram has no eigen-decomposition (``linalg.eigh`` fails as "ill-conditioned"), and
    a basis built from it would corrupt every later task, so callers check every layer's statistics
    before changing any basis."""
    bad = [name for name in ("tokens", "summary") if not bool(torch.isfinite(getattr(stats, name)).all())]
    if not bad:
        return
    where = f"layer {layer!r}" + (f", task {task}" if task is not None else "") + (f" ({when})" if when else "")
    raise ValueError(
        f"non-finite input statistics (NaN or inf in the {' and '.join(bad)} Gram matrix) at {where}: the "
        "layer's inputs over the task's data hold NaN/inf. Check the task's data for NaN/inf values, or, if "
        "the data is finite, training diverged (lower the learning rate). No basis was changed."
    )


class GramAccumulator(InputStats):
    """Streaming accumulation of :class:`InputStats` from batches of a layer's inputs.

    Each batch's Gram is computed in float32 by the ``gram`` op (one pass over x, Triton on a
    GPU) and added into float64 totals, so long streams lose no precision to the running sum.
    """

    def __init__(self, dim: int, summary: str = "cls", backend: str = "auto", device=None) -> None:
        super().__init__(dim, device)
        self.how = check.choice("summary", summary, SUMMARIES)
        self.backend = backend

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        check.tensor("x", x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be {self.dim}, got shape {tuple(x.shape)}")
        if self.tokens.device != x.device:
            self.tokens = self.tokens.to(x.device)
            self.summary = self.summary.to(x.device)
        self.tokens += _gram(x, backend=self.backend).to(torch.float64)
        self.token_count += x.numel() // self.dim
        z = summarize(x, self.how)
        self.summary += _gram(z, backend=self.backend).to(torch.float64)
        self.summary_count += z.shape[0]


def threshold_schedule(num_tasks: int, start: float = 0.95, end: float = 0.99) -> list[float]:
    """GPM's rising energy thresholds: ``num_tasks`` values linearly from ``start`` to ``end``."""
    check.rank("num_tasks", num_tasks)
    start, end = check.threshold("start", start), check.threshold("end", end)
    if num_tasks == 1:
        return [start]
    return [start + (end - start) * t / (num_tasks - 1) for t in range(num_tasks)]


def threshold_for_task(thresholds: Sequence[float], task: int) -> float:
    """Task ``task``'s threshold; tasks beyond the schedule reuse its last value."""
    return float(thresholds[min(task, len(thresholds) - 1)])


def _check_gram(gram: Tensor, name: str = "gram") -> Tensor:
    check.tensor(name, gram, ndim=2)
    if gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{name} must be square (d, d), got {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"{name} holds NaN or inf: the inputs it was accumulated from are not finite "
                         "(check the data for NaN/inf, or whether training diverged)")
    return gram.to(torch.float64)


def _check_basis(basis: Tensor | None, d: int) -> Tensor | None:
    if basis is None or basis.shape[-1] == 0:
        return None
    check.tensor("basis", basis, ndim=2)
    check.shape("basis", basis, (d, None), "(d, k)")
    check.orthonormal("basis", basis)
    return basis.to(torch.float64)


def _top_eigvecs(sym: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix, top k."""
    vals, vecs = torch.linalg.eigh(0.5 * (sym + sym.T))
    order = torch.argsort(vals, descending=True)[:k]
    return vals[order].clamp_min(0), vecs[:, order]


def principal_directions(
    gram: Tensor, rank: int, *, exclude: Tensor | None = None, within: Tensor | None = None
) -> Tensor:
    """Top-``rank`` principal directions (d, rank), orthonormal columns, of the inputs whose
    Gram is ``gram``; with ``exclude`` = M after projecting span(M) out (the orthogonal
    adapter's start), with ``within`` = M after projecting onto span(M) (the residual's)."""
    rank = check.rank("rank", rank)
    g = _check_gram(gram)
    d = g.shape[0]
    if rank > d:
        raise ValueError(f"rank must be <= d={d}, got {rank}")
    if exclude is not None and within is not None:
        raise ValueError("give at most one of exclude= and within=")
    m = _check_basis(exclude if exclude is not None else within, d)
    if m is not None:
        p = m @ m.T
        if exclude is not None:
            p = torch.eye(d, dtype=g.dtype, device=g.device) - p
        g = p @ g @ p
    _, vecs = _top_eigvecs(g, rank)
    if m is not None:
        # eigh's vectors for (near-)zero eigenvalues may leave the target subspace: project back.
        vecs = project_out(vecs.T, m).T if exclude is not None else project_onto(vecs.T, m).T
    return vecs


def captured_energy(gram: Tensor, basis: Tensor | None) -> float:
    """Fraction of the inputs' energy ``||M^T R||^2 / ||R||^2`` that span(basis) explains."""
    g = _check_gram(gram)
    total = torch.trace(g).item()
    m = _check_basis(basis, g.shape[0])
    if m is None or total <= 0:
        return 0.0
    return torch.trace(m.T @ g @ m).item() / total


def extend_basis(basis: Tensor | None, gram: Tensor, threshold: float, max_new: int | None = None) -> Tensor:
    """GPM's basis extension (Saha et al., 2021) from a task's input Gram ``gram`` = R R^T.

    Removes what M explains (R' = R - M M^T R), then appends the fewest top left singular
    vectors of R' (eigenvectors of R' R'^T) that bring the captured energy of R to
    ``threshold``. Returns the new orthonormal basis (d, k + added) in float64, the old columns
    first and unchanged; nothing is appended when M already meets the threshold.
    """
    threshold = check.threshold("threshold", threshold)
    g = _check_gram(gram)
    d = g.shape[0]
    m = _check_basis(basis, d)
    k = 0 if m is None else m.shape[1]
    old = torch.zeros(d, 0, dtype=torch.float64, device=g.device) if m is None else m
    total = torch.trace(g).item()
    if total <= 0 or k >= d:
        return old.clone()
    captured = 0.0 if m is None else torch.trace(m.T @ g @ m).item()
    if captured / total >= threshold:
        return old.clone()
    p = torch.eye(d, dtype=g.dtype, device=g.device) - (old @ old.T)
    vals, vecs = _top_eigvecs(p @ g @ p, d - k)
    need = threshold * total - captured
    cum = torch.cumsum(vals, 0)
    hit = torch.nonzero(cum >= need * (1 - 1e-12))
    if hit.numel():
        add = int(hit[0].item()) + 1
    else:  # the threshold is out of rounding's reach: take every direction with energy
        add = int((vals > vals[0] * 1e-12).sum().item()) if vals[0] > 0 else 0
    if max_new is not None:
        add = min(add, check.nonneg_int("max_new", max_new))
    if add == 0:
        return old.clone()
    new = vecs[:, :add]
    # Re-orthogonalise against M (twice is enough, Kahan) so rounding cannot accumulate over tasks.
    for _ in range(2):
        new = new - old @ (old.T @ new)
        new, _ = torch.linalg.qr(new)
    return torch.cat([old, new], 1)


def task_scores(z: Tensor, task_bases: Tensor, backend: str = "auto") -> Tensor:
    """``||U_t^T z||^2 / ||z||^2`` for every task t: (b, T). See :func:`duallora_kernels.task_scores`."""
    return _task_scores(z, task_bases, backend=backend)


def task_gates(scores: Tensor, temperature: float = 0.1, hard: bool = False) -> Tensor:
    """Gates g_t(x) in [0, 1] over tasks from scores (b, T): ``softmax(scores / temperature)``,
    or with ``hard`` the one-hot of the best-scoring task. Rows sum to one."""
    check.tensor("scores", scores, ndim=2)
    temperature = check.positive("temperature", temperature)
    if scores.shape[1] == 0:
        return scores.clone()
    if hard:
        return torch.nn.functional.one_hot(scores.argmax(1), scores.shape[1]).to(scores.dtype)
    return torch.softmax(scores.float() / temperature, dim=1).to(scores.dtype)
