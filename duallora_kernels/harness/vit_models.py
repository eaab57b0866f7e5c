"""Whole timm ViTs for ``duallora profile-memory``: a randomly initialised model (no download)
adapted as each variant, and one training step of it."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .problems import TORCH_DTYPES, seeded_generator, split_rank
from .variants import UnfusedDualLoRALinear

__all__ = ["VIT_TARGETS", "VIT_VARIANTS", "build_vit", "prepare_dual_lora", "build_vit_variant", "vit_images",
           "training_step"]

#: Linear layers of a timm ViT block that DualLoRA (and the PEFT baseline) adapt.
VIT_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
_PEFT_TARGET_REGEX = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
def build_vit(model_name: str = "vit_base_patch16_224", *, num_classes: int = 100, device: torch.device | str = "cpu",
              dtype: str | torch.dtype = "float32", seed: int = 0, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised timm ViT (no download) with every weight frozen but the head.
    ``timm_kwargs`` override its configuration (img_size, depth, embed_dim, num_heads, ...)."""
    import timm

    dt = TORCH_DTYPES[dtype] if isinstance(dtype, str) else dtype
    torch.manual_seed(seed)
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
    from ..nn import dual_lora_layers, inject

    r_o, r_r = split_rank(rank)
    inject(model, targets, rank_orth=r_o, rank_res=max(1, r_r), use_res=r_r > 0, backend=backend)
    for i, layer in enumerate(dual_lora_layers(model).values()):
        d, n = layer.in_features, layer.out_features
        g = torch.Generator().manual_seed(seed + 1009 * i)
        k = max(1, min(d - 1, round(basis_fraction * d)))
        raw = torch.randn(d, k + layer.score_rank, generator=g, dtype=torch.float64)
        basis = torch.linalg.qr(raw.to(layer.weight.device))[0]  # float64: orthonormal to the layer's check
        state = layer.state_dict()
        wdt = layer.weight.dtype
        rnd = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(wdt)  # noqa: E731
        state.update(
            basis=basis[:, :k], basis_sizes=torch.tensor([k]), task_bases=basis[None, :, k:],
            in_task=torch.tensor(True), res_active=torch.tensor(r_r > 0),
            orth_a=rnd(layer.rank_orth, d, s=d**-0.5), orth_b=rnd(n, layer.rank_orth, s=0.01),
            res_a=rnd(layer.rank_res, d, s=d**-0.5), res_b=rnd(n, layer.rank_res, s=0.01),
        )
        layer.load_state_dict(state)
        for p in (layer.orth_a, layer.orth_b) + ((layer.res_a, layer.res_b) if r_r else ()):
            p.requires_grad_(True)
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
#: trainable layer must save.
VIT_VARIANTS: tuple[str, ...] = ("fused", "unfused", "frozen", "peft", "full_ft")


def build_vit_variant(variant: str, model_name: str = "vit_base_patch16_224", *, rank: int = 16,
                      device: torch.device | str = "cpu", dtype: str = "bfloat16", seed: int = 0,
                      num_classes: int = 100, **timm_kwargs: Any) -> nn.Module:
    """A ViT (:func:`build_vit`) adapted as ``variant``: ``frozen`` (only the head trains),
    ``full_ft`` (everything trains), ``fused`` (DualLoRALinear, Triton backend), ``unfused``
    (:class:`UnfusedDualLoRALinear` twins of the same layers) or ``peft`` (LoRA rank ``rank`` on
    qkv/proj/fc1/fc2). The head trains in every variant."""
    if variant not in VIT_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VIT_VARIANTS}")
    model = build_vit(model_name, num_classes=num_classes, device=device, dtype=dtype, seed=seed, **timm_kwargs)
    if variant == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant in ("fused", "unfused"):
        prepare_dual_lora(model, rank, backend="triton" if variant == "fused" else "torch", seed=seed)
        if variant == "unfused":
            from ..nn import DualLoRALinear

            _replace_modules(model, DualLoRALinear, UnfusedDualLoRALinear.from_dual_lora)
    elif variant == "peft":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=_PEFT_TARGET_REGEX, bias="none")
        model = inject_adapter_in_model(cfg, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("head."))
        model = model.to(device=device, dtype=TORCH_DTYPES[dtype])
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
