"""Whole timm ViTs for ``duallora profile-memory``: a randomly initialised model (no download)
adapted as each variant, and one training step of it."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .problems import TORCH_DTYPES, seeded_generator, split_rank
from .variants import UnfusedDualLoRALinear

__all__ = ["VIT_TARGETS", "VIT_VARIANTS", "build_vit", "prepare_dual_lora", "inject_dual_lora", "basis_columns",
           "load_training_state",
           "build_vit_variant", "vit_images",
           "training_step"]

#: Linear layers of a timm ViT block that DualLoRA (and the PEFT baseline) adapt.
VIT_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")


def _peft_target_regex(targets: Sequence[str]) -> str:
    """PEFT's target_modules for the blocks' linear layers named ``targets`` (qkv, proj, fc1, fc2)."""
    return r".*blocks\.\d+\.(attn|mlp)\.(" + "|".join(targets) + ")"


def build_vit(model_name: str = "vit_base_patch16_224", *, num_classes: int = 100, device: torch.device | str = "cpu",
              dtype: str | torch.dtype = "float32", seed: int = 0, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised timm ViT (no download) with every weight frozen but the head.
    ``timm_kwargs`` override its configuration (img_size, depth, embed_dim, num_heads, ...).
    ``device="meta"``: built on the meta device (shapes only, no init arithmetic)."""
    import timm

    dt = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
    with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    model = model.to(device=device, dtype=dt)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
    return model


def vit_images(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
                requires_grad: bool = True) -> Tensor:
    size = model.patch_embed.img_size
    chans = model.patch_embed.proj.in_channels
    g = seeded_generator(device, seed)
    img = torch.randn(batch, chans, *size, generator=g, device=device, dtype=torch.float32).to(dtype)
    return img.requires_grad_(requires_grad)


def prepare_dual_lora(model: nn.Module, rank: int, *, backend: str = "triton", basis_fraction: float = 0.25,
                      targets: Sequence[str] = VIT_TARGETS, seed: int = 0) -> nn.Module:
    """Inject DualLoRA layers of total rank ``rank`` and load each with the state of a layer in
    the middle of task 2 (through ``load_state_dict``, as when resuming a checkpoint): one task
    done, a memory basis M of ``round(basis_fraction * d)`` orthonormal columns, orthogonal adapter
    and residual block trainable, with random values (B != 0, so every product is real work)."""
    inject_dual_lora(model, rank, backend=backend, targets=targets)
    return load_training_state(model, rank, basis_fraction=basis_fraction, seed=seed)


def inject_dual_lora(model: nn.Module, rank: int, *, backend: str = "triton",
                     targets: Sequence[str] = VIT_TARGETS, train_a: bool = True) -> nn.Module:
    """The first half of :func:`prepare_dual_lora`: DualLoRA layers of total rank ``rank`` in place
    of ``targets`` (on the meta device too); ``train_a=False``: B-only training (A fixed)."""
    from ..nn import inject

    r_o, r_r = split_rank(rank)
    inject(model, targets, rank_orth=r_o, rank_res=max(1, r_r), use_res=r_r > 0, backend=backend, train_a=train_a)
    return model


def basis_columns(d: int, *, tasks: int = 1, basis_fraction: float = 0.25, basis_per_task: float | None = None) -> int:
    """Columns of the memory basis M of a d-input layer after ``tasks`` finished tasks: ``basis_fraction * d``,
    or with ``basis_per_task`` that fraction of d per finished task; at least 1, at most d - 1."""
    fraction = basis_fraction if basis_per_task is None else tasks * basis_per_task
    return max(1, min(d - 1, round(fraction * d)))


def load_training_state(model: nn.Module, rank: int, *, basis_fraction: float = 0.25, seed: int = 0,
                        random_values: bool = True, tasks: int = 1, basis_per_task: float | None = None) -> nn.Module:
    """The second half of :func:`prepare_dual_lora`: every layer ``tasks`` finished tasks in (default 1)
    and training the next: a basis of :func:`basis_columns` columns split over the finished tasks, their
    task bases, ``tasks - 1`` frozen residual blocks (task 1 had none: M was empty then) and a training
    orthogonal adapter and residual block. ``random_values=False``: the same shapes and task state with
    identity columns for the bases and uninitialised adapters (no QR, no random numbers, no
    orthonormality check): for a model whose values do not matter, the memory planner's."""
    from ..nn import dual_lora_layers

    if tasks < 1:
        raise ValueError(f"tasks must be >= 1 (a layer with a memory basis), got {tasks}")
    _, r_r = split_rank(rank)
    for i, layer in enumerate(dual_lora_layers(model).values()):
        d, n = layer.in_features, layer.out_features
        g = torch.Generator().manual_seed(seed + 1009 * i)
        k = basis_columns(d, tasks=tasks, basis_fraction=basis_fraction, basis_per_task=basis_per_task)
        cols = min(d, k + layer.score_rank)
        if random_values:
            raw = torch.randn(d, cols, generator=g, dtype=torch.float64)
            q = torch.linalg.qr(raw.to(layer.weight.device))[0]  # float64: orthonormal to the layer's check
        else:
            q = torch.eye(d, cols, dtype=torch.float64, device=layer.weight.device)
        u = q[:, cols - layer.score_rank:]  # each task's U_t: orthonormal (the same columns for every task)
        frozen = (tasks - 1) * r_r
        state = layer.state_dict()
        wdt = layer.weight.dtype
        rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(wdt)  # noqa: E731
        state.update(basis_sizes=torch.tensor([k // tasks + (t < k % tasks) for t in range(tasks)]),
                     task_bases=u[None].expand(tasks, d, layer.score_rank).contiguous(),
                     frozen_tasks=torch.arange(1, tasks) if frozen else torch.zeros(0, dtype=torch.int64),
                     in_task=torch.tensor(True), res_active=torch.tensor(r_r > 0))
        if random_values:
            state.update(orth_a=rnd(layer.rank_orth, d, s=d**-0.5), orth_b=rnd(n, layer.rank_orth, s=0.01),
                         res_a=rnd(layer.rank_res, d, s=d**-0.5), res_b=rnd(n, layer.rank_res, s=0.01),
                         frozen_a=rnd(frozen, d, s=d**-0.5), frozen_b=rnd(n, frozen, s=0.01), basis=q[:, :k])
            layer.load_state_dict(state)
        else:  # the basis set as the buffer it is: load_state_dict would check it (seconds for ViT-L)
            state.update(frozen_a=torch.empty(frozen, d, dtype=wdt), frozen_b=torch.empty(n, frozen, dtype=wdt))
            layer.load_state_dict({k_: v for k_, v in state.items() if k_ != "basis"}, strict=False)
            layer.basis = q[:, :k].to(layer.basis.dtype).contiguous()
        for a, b in ((layer.orth_a, layer.orth_b),) + (((layer.res_a, layer.res_b),) if r_r else ()):
            a.requires_grad_(layer.train_a)  # as begin_task leaves them
            b.requires_grad_(True)
    return model


def _replace_modules(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, make(child))
                count += 1
    return count


#: Whole-model variants of profile-memory: the timed ones but the compiled one (torch.compile changes
#: no saved tensor's lifetime) and ``full_ft`` (every weight trains), a reference for what a
#: trainable layer must save. ``fused_fixed_a``: the fused layers with B-only training (``train_a=False``).
VIT_VARIANTS: tuple[str, ...] = ("fused", "fused_fixed_a", "unfused", "frozen", "peft", "full_ft")


def build_vit_variant(variant: str, model_name: str = "vit_base_patch16_224", *, rank: int = 16,
                      device: torch.device | str = "cpu", dtype: str = "bfloat16", seed: int = 0,
                      num_classes: int = 100, empty: bool = False, targets: Sequence[str] = VIT_TARGETS,
                      tasks: int = 1, basis_per_task: float | None = None, **timm_kwargs: Any) -> nn.Module:
    """A ViT (:func:`build_vit`) adapted as ``variant``: ``frozen`` (only the head trains),
    ``full_ft`` (everything trains), ``fused`` (DualLoRALinear, Triton backend), ``fused_fixed_a``
    (the same with ``train_a=False``: A fixed, B-only training), ``unfused``
    (:class:`UnfusedDualLoRALinear` twins of the same layers) or ``peft`` (LoRA rank ``rank`` on
    the same ``targets``, default qkv/proj/fc1/fc2). The head trains in every variant. ``empty``: built on the meta device and
    given uninitialised storage on ``device`` (the same modules and state, no init arithmetic:
    for the memory planner, which needs shapes and dtypes, not values). ``tasks``, ``basis_per_task``: the
    DualLoRA layers' task state (:func:`load_training_state`; default: one task done, a quarter of d in M)."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VIT_VARIANTS}")
    model = build_vit(model_name, num_classes=num_classes, device="meta" if empty else device, dtype=dtype, seed=seed,
                      **timm_kwargs)
    if variant == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant in ("fused", "fused_fixed_a", "unfused"):
        inject_dual_lora(model, rank, backend="torch" if variant == "unfused" else "triton", targets=targets,
                         train_a=variant != "fused_fixed_a")
    elif variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=_peft_target_regex(targets), bias="none")
        model = inject_adapter_in_model(cfg, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("head."))
    if empty:
        model = model.to_empty(device=device)
    if variant == "peft":  # PEFT makes its factors in float32 (DualLoRA layers keep their bases in >= float32)
        model = model.to(device=device, dtype=TORCH_DTYPES[dtype])
    if variant in ("fused", "fused_fixed_a", "unfused"):
        load_training_state(model, rank, seed=seed, random_values=not empty, tasks=tasks,
                            basis_per_task=basis_per_task)
        if variant == "unfused":
            from ..nn import DualLoRALinear

            _replace_modules(model, DualLoRALinear, UnfusedDualLoRALinear.from_dual_lora)
    return model.train()

def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int, num_classes: int,
                  seed: int = 0) -> float:
    """One step: random images (requiring grad, as in :func:`vit_saved_bytes`) and labels,
    cross-entropy, backward, optimizer step, gradients set to None."""
    p = next(model.parameters())
    images = vit_images(model, batch, p.device, p.dtype, seed)
    labels = torch.randint(0, num_classes, (batch,), device=p.device)
    loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
