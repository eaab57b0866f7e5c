"""Replay-free task identity from class-prototype statistics (docs/method.md, "Task scores").

A run's ``task_score`` says where the model's task scores come from:

* ``"subspace"``: each adapted layer's ``||U_t^T z||^2 / ||z||^2`` against its task bases, averaged over
  the layers (:mod:`.calibration`, the first version's score).
* ``"prototype-means"``: nearest class mean. Per class, the mean of the sample's feature f(x) (below);
  a class's score is ``-||f - mu_c||^2 / 2``.
* ``"prototype-lda"``: class means and one covariance shared by all classes, i.e. linear discriminant
  analysis (streaming LDA, Hayes & Kanan 2020). A class's score is its Gaussian log-likelihood up to a
  constant shared by all classes, ``f^T P mu_c - mu_c^T P mu_c / 2`` with P the inverse of the shrunk
  within-class covariance.

f(x) is the concatenation, over every adapted layer, of the mean and the standard deviation of the tokens
of the layer's input. ``prototype_features="pretrained"`` reads them from a frozen copy of the pre-trained
backbone (taken before the adapters went in), so a task's statistics stay valid however later tasks adapt
the model; ``"adapted"`` reads them from the adapted model with its residual blocks off (the global gate's
first pass), whose features drift as later tasks train. Either pass replaces the subspace score's first
pass, so the gate costs no extra forward. A task's score
is ``logsumexp`` of its classes' scores (log p(task | x) up to a shared constant, equal class priors),
and the gate is ``softmax(scores / prototype_temperature)``.

Only statistics are kept, never images: per class the sum of f and its count, and over all samples
seen the sum of f f^T (float64, D x D with D twice the summed input widths; 5,376 for the shipped
backbone; prototype-lda only, the means score does not use it).
Each task's statistics are taken after its ``end_task``, from the model every later test sees for it.

Checkpoints (:meth:`ClassPrototypes.state_tensors`) keep each in its smallest exact form: while tasks
remain, the statistics a later task adds to, the D x D sum of f f^T as its upper triangle (it is exactly
symmetric: half the bytes, 116 MB instead of 231 MB at D = 5,376); after the last task, only the class
weights and biases the score applies (classes x D: 0.4 MB for 10 classes), since no task adds to them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..inject import call_fused_qkv_layers
from ..memory import task_gates
from ..nn import dual_lora_layers, residual_off
from . import distributed
from .config import PROTOTYPE_SOURCES, TASK_SCORES

__all__ = ["PROTOTYPE_SCORES", "PROTOTYPE_SOURCES", "ClassPrototypes", "PrototypeFeatures", "summarize_tokens",
           "input_summaries", "collect_task_prototypes", "prototype_gate"]

PROTOTYPE_SCORES = tuple(s for s in TASK_SCORES if s.startswith("prototype-"))


def summarize_tokens(x: Tensor, samples: int | None = None) -> Tensor:
    """A layer input's per-sample summary for prototypes: the tokens' mean and standard deviation, (B, 2d).
    ``samples``: the batch's images B, when x's first dimension holds several rows per image, each image's
    consecutive (Swin's windows: (B * windows, N, d)); default x.shape[0]."""
    x3 = x.reshape(samples or x.shape[0], -1, x.shape[-1]).to(torch.float64)
    return torch.cat([x3.mean(1), x3.std(1, correction=0)], 1)


@contextlib.contextmanager
def input_summaries(layers: dict[str, nn.Module], samples: int | None = None) -> Iterator[Callable[[], Tensor]]:
    """Within the block, every forward through ``layers`` records each one's input summary
    (:func:`summarize_tokens`, per image of a batch of ``samples``); the yielded function returns the last
    forward's summaries concatenated in the order of ``layers`` (B, D)."""
    seen: dict[str, Tensor] = {}
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, name=name: seen.__setitem__(name, summarize_tokens(args[0].detach(), samples)))
        for name, layer in layers.items()]

    def features() -> Tensor:
        missing = [n for n in layers if n not in seen]
        if missing:
            raise RuntimeError(f"no forward reached the layers {missing[:3]} since their summaries were read")
        out = torch.cat([seen[n] for n in layers], 1)
        seen.clear()
        return out

    try:
        yield features
    finally:
        for h in handles:
            h.remove()


class PrototypeFeatures:
    """f(x) of a model: its adapted layers' input summaries, read from the frozen pre-trained backbone
    (``source="pretrained"``: a copy taken before the adapters went in, so f never drifts) or from the
    adapted model with its residual blocks off (``source="adapted"``)."""

    def __init__(self, model: nn.Module, source: str, reference: nn.Module | None = None) -> None:
        if source not in PROTOTYPE_SOURCES:
            raise ValueError(f"source must be one of {', '.join(PROTOTYPE_SOURCES)}, got {source!r}")
        if source == "pretrained" and reference is None:
            raise ValueError("source='pretrained' needs the reference backbone (a copy made before the adapters)")
        self.model, self.source, self.reference = model, source, reference
        layers = dual_lora_layers(model)
        if source == "adapted":
            self.layers: dict[str, nn.Module] = dict(layers)
        else:  # the same layers' names inside the copy: "backbone.blocks.0.attn.qkv" -> "blocks.0.attn.qkv"
            inside = {name: name.split(".", 1)[1] if name.startswith("backbone.") else name for name in layers}
            self.layers = {name: reference.get_submodule(inner) for name, inner in inside.items()}
            # the copy's fused-qkv attention (beit, eva) must call its qkv layer for the hooks to see it, as
            # inject made the adapted model's do
            call_fused_qkv_layers(reference, list(inside.values()))

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        with input_summaries(self.layers, x.shape[0]) as features:
            if self.source == "pretrained":
                self.reference(x)
            else:
                with residual_off(self.model):
                    self.model.features(x)
            return features()


class ClassPrototypes:
    """Per-class sums and counts of a feature f (D,) and the sum of f f^T over every sample (float64)."""

    def __init__(self, score: str = "prototype-lda", shrinkage: float = 1e-4) -> None:
        if score not in PROTOTYPE_SCORES:
            raise ValueError(f"score must be one of {', '.join(PROTOTYPE_SCORES)}, got {score!r}")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
        self.score, self.shrinkage = score, float(shrinkage)
        self.sums: Tensor | None = None  # (classes, D)
        self.counts: Tensor | None = None  # (classes,)
        self.gram: Tensor | None = None  # (D, D): sum of f f^T over all samples seen (prototype-lda)
        self.task_of_class: list[int] = []
        self._weights: tuple[Tensor, Tensor] | None = None
        self.final = False  # restored from a last task's checkpoint: the score's weights, no statistics

    @property
    def num_tasks(self) -> int:
        return max(self.task_of_class) + 1 if self.task_of_class else 0

    def add_task(self, features: Tensor, labels: Tensor, classes: range) -> None:
        """Add task ``num_tasks``'s statistics from its features (N, D) and global labels (N,) in ``classes``
        (summed over ranks under torchrun: every rank passes its own part of the data)."""
        if self.final:
            raise RuntimeError("these statistics were restored from a run's last checkpoint, which keeps only the "
                               "class weights the score applies: no task can be added to them")
        f = features.to(torch.float64)
        if f.dim() != 2 or labels.shape != (f.shape[0],):
            raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(f.shape)} and {tuple(labels.shape)}")
        onehot = torch.stack([labels == c for c in classes], 1).to(f.dtype)  # (N, classes)
        lda = self.score == "prototype-lda"  # the means score needs no second moment
        sums, counts, *gram = distributed.all_reduce_sum([onehot.T @ f, onehot.sum(0), *([f.T @ f] if lda else [])])
        gram = gram[0] if lda else None
        if bool((counts == 0).any()):
            raise ValueError(f"every class of the task needs samples; counts {counts.tolist()} for classes {list(classes)}")
        if self.sums is not None and self.sums.shape[1] != f.shape[1]:
            raise ValueError(f"features have {f.shape[1]} dimensions, earlier tasks' {self.sums.shape[1]}")
        task = self.num_tasks
        self.sums = sums if self.sums is None else torch.cat([self.sums, sums])
        self.counts = counts if self.counts is None else torch.cat([self.counts, counts])
        self.gram = gram if self.gram is None or gram is None else self.gram + gram
        self.task_of_class += [task] * len(classes)
        self._weights = None

    def _class_weights(self) -> tuple[Tensor, Tensor]:
        """(W, b) with class scores ``f @ W.T + b``."""
        if self._weights is None:
            means = self.sums / self.counts[:, None]
            if self.score == "prototype-means":
                w, b = means, -0.5 * (means * means).sum(1)
            else:
                # within-class scatter = sum f f^T - sum_c n_c mu_c mu_c^T; shrunk towards its mean eigenvalue
                within = (self.gram - (means.T * self.counts) @ means) / self.counts.sum()
                d = within.shape[0]
                scale = torch.trace(within) / d
                shrunk = (1 - self.shrinkage) * within + self.shrinkage * scale * torch.eye(d, dtype=within.dtype,
                                                                                            device=within.device)
                w = torch.linalg.solve(shrunk, means.T).T  # P mu_c, rows
                b = -0.5 * (w * means).sum(1)
            self._weights = (w, b)
        return self._weights

    def task_scores(self, features: Tensor) -> Tensor:
        """log p(task | f) up to a constant shared by the tasks: (B, tasks)."""
        if not self.task_of_class:
            raise RuntimeError("no task's statistics yet: add_task first")
        w, b = self._class_weights()
        scores = features.to(torch.float64) @ w.T + b
        owner = torch.tensor(self.task_of_class, device=scores.device)
        return torch.stack([scores[:, owner == t].logsumexp(1) for t in range(self.num_tasks)], 1)

    # ------------------------------------------------------------------ checkpoints
    def state_tensors(self, prefix: str = "task_identity.", *, final: bool = False) -> dict[str, Tensor]:
        """What a checkpoint keeps, exactly (float64 as computed). While tasks remain (``final`` False): the
        statistics the next task adds to, the sum of f f^T as its upper triangle (``gram_upper``, row by
        row; the full matrix only if it were not exactly symmetric). After the last task (``final``): the
        class weights and biases the score applies, which :meth:`task_scores` reads as they are."""
        if self.sums is None and self._weights is None:
            return {}
        out = {prefix + "task_of_class": torch.tensor(self.task_of_class)}
        if final or self.final:
            w, b = self._class_weights()
            return {**out, prefix + "class_weights": w, prefix + "class_bias": b}
        out.update({prefix + "sums": self.sums, prefix + "counts": self.counts})
        if self.gram is not None:
            if torch.equal(self.gram, self.gram.T):
                out[prefix + "gram_upper"] = self.gram[_upper(self.gram.shape[0])]
            else:
                out[prefix + "gram"] = self.gram
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor], prefix: str = "task_identity.") -> None:
        """Restore from :meth:`state_tensors`' keys (popped from ``tensors``); checkpoints written before the
        compact forms (a full ``gram``) read as well."""
        if prefix + "task_of_class" not in tensors:
            return
        self.task_of_class = [int(t) for t in tensors.pop(prefix + "task_of_class").tolist()]
        self.sums = self.counts = self.gram = self._weights = None
        self.final = prefix + "class_weights" in tensors
        if self.final:
            self._weights = (tensors.pop(prefix + "class_weights"), tensors.pop(prefix + "class_bias"))
            return
        self.sums = tensors.pop(prefix + "sums").to(torch.float64)
        self.counts = tensors.pop(prefix + "counts").to(torch.float64)
        if prefix + "gram_upper" in tensors:
            d = self.sums.shape[1]
            upper = _upper(d)
            gram = torch.zeros(d, d, dtype=torch.float64)
            gram[upper] = tensors.pop(prefix + "gram_upper").to(torch.float64)
            self.gram = torch.where(upper, gram, gram.T)  # the lower triangle copied, not computed: exact
        elif prefix + "gram" in tensors:
            self.gram = tensors.pop(prefix + "gram").to(torch.float64)


def _upper(d: int) -> Tensor:
    """The mask of a (d, d) matrix's upper triangle, diagonal included."""
    return torch.ones(d, d, dtype=torch.bool).triu()


@torch.no_grad()
def collect_task_prototypes(features: PrototypeFeatures, prototypes: ClassPrototypes, batches: Iterable,
                            classes: range, device: torch.device) -> None:
    """One pass over a finished task's labelled batches into its class statistics."""
    feats, labels = [], []
    for x, y in batches:
        feats.append(features(x.to(device)).cpu())
        labels.append(y.cpu())
    prototypes.add_task(torch.cat(feats), torch.cat(labels), classes)


def prototype_gate(features: PrototypeFeatures, x: Tensor, prototypes: ClassPrototypes, num_tasks: int,
                   temperature: float, hard: bool = False) -> Tensor | None:
    """The global gate from class-prototype scores; None before the statistics cover ``num_tasks`` tasks."""
    if prototypes.num_tasks != num_tasks or num_tasks == 0:
        return None
    return task_gates(prototypes.task_scores(features(x)).float().to(x.device), temperature, hard=hard)
